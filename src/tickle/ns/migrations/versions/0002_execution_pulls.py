"""Execution pulls: which task servers a work pull gave each execution to.

A task server killed while it held a computer's events, the computer moved to another task
server meanwhile: when it comes back, its events are recorded because it pulled the execution.
Existing pulled executions are attributed to the task server their computer has now.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 10:00:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create `execution_pulls` and fill it from the executions pulled so far."""
    op.create_table(
        "execution_pulls",
        sa.Column("execution_id", sa.Integer(), nullable=False),
        sa.Column("task_server_id", sa.Integer(), nullable=False),
        sa.Column("pulled_at", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(["execution_id"], ["executions.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["task_server_id"], ["task_servers.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("execution_id", "task_server_id"),
    )
    op.execute(
        "INSERT INTO execution_pulls (execution_id, task_server_id, pulled_at)"
        " SELECT e.id, c.task_server_id, e.ts_pulled_at"
        " FROM executions e JOIN computers c ON c.id = e.computer_id"
        " WHERE e.ts_pulled_at IS NOT NULL AND c.task_server_id IS NOT NULL"
    )


def downgrade() -> None:
    """Drop `execution_pulls`."""
    op.drop_table("execution_pulls")
