"""The unfinished executions of a computer by index: `ix_executions_computer_status`.

A work pull reads the unfinished executions of its task server's clients; through
`ix_executions_computer_id` alone it read every execution each computer ever had and dropped the
finished ones, so a pull cost more with every run (one agent after 200 runs: 200 rows for one).

Revision ID: 0010_unfinished_by_computer
Revises: 0009_long_poll
Create Date: 2026-12-01 14:50:00.000000

"""

from collections.abc import Sequence

from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0010_unfinished_by_computer"
down_revision: str | Sequence[str] | None = "0009_long_poll"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Index executions by computer and status."""
    op.create_index(
        "ix_executions_computer_status", "executions", ["computer_id", "status"], unique=False
    )


def downgrade() -> None:
    """Drop the index."""
    op.drop_index("ix_executions_computer_status", table_name="executions")
