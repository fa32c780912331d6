"""Long-poll: the central settings that let agents which cannot be tickled hold a long-poll open.

`long_poll` (off by default: CEM agents poll, as in the original) and `long_poll_timeout_s`
(how long a long-poll waits before it returns empty).

Revision ID: 0009_long_poll
Revises: 0008_console_audit
Create Date: 2026-11-30 14:30:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0009_long_poll"
down_revision: str | Sequence[str] | None = "0008_console_audit"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add `settings.long_poll` and `settings.long_poll_timeout_s`."""
    with op.batch_alter_table("settings", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("long_poll", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.add_column(
            sa.Column("long_poll_timeout_s", sa.Integer(), nullable=False, server_default="55")
        )


def downgrade() -> None:
    """Drop them."""
    with op.batch_alter_table("settings", schema=None) as batch_op:
        batch_op.drop_column("long_poll_timeout_s")
        batch_op.drop_column("long_poll")
