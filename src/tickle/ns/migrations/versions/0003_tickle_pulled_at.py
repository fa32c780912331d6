"""Tickle-caused work pulls: `task_servers.tickle_pulled_at`.

Only a pull a tickle caused acknowledges a tasks tickle; a task server's periodic check or its pull
at start stamps `last_pull_at` only. The dispatcher in another NS process reads this column to see
the acknowledgement. Existing rows start with none: no tickle of a process before the upgrade is
still waiting for one.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-09 10:00:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add `task_servers.tickle_pulled_at` (NULL: no tickle-caused pull yet)."""
    with op.batch_alter_table("task_servers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("tickle_pulled_at", sa.Double(), nullable=True))


def downgrade() -> None:
    """Drop `task_servers.tickle_pulled_at`."""
    with op.batch_alter_table("task_servers", schema=None) as batch_op:
        batch_op.drop_column("tickle_pulled_at")
