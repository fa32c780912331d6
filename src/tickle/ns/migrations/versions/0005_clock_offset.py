"""Clock offsets: `task_servers.clock_offset_s` and `computers.clock_offset_s`.

How far each task server's clock is ahead of the NS's (measured by the NS from its requests), and
each agent's ahead of its task server's (measured by the task server, reported to the NS). NULL:
not measured yet (rows of before the upgrade until the next request).

Revision ID: 0005_clock_offset
Revises: 0004_registration_approval
Create Date: 2026-11-30 13:30:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0005_clock_offset"
down_revision: str | Sequence[str] | None = "0004_registration_approval"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add `clock_offset_s` to task servers and computers (NULL: unmeasured)."""
    for table in ("task_servers", "computers"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("clock_offset_s", sa.Double(), nullable=True))


def downgrade() -> None:
    """Drop both `clock_offset_s` columns."""
    for table in ("task_servers", "computers"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("clock_offset_s")
