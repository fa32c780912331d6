"""Full output, cancel, expiry: `execution_outputs`, `executions.cancel_requested_at`,
`runs.expires_at` and `executions.expires_at`.

Each step's output (stdout and stderr, cut at the agent's cap) gets a row of its own, read only by
the output route, so listing runs never loads it. An execution an operator cancelled after its
agent pulled it keeps the time of the request until the agent reports how it ended; a run may
carry the time its executions expire if not started by then (kept on each execution too, so a
work pull hands it to the agent without a join). Existing rows have neither.

Revision ID: 0007_output_cancel
Revises: 0006_history_liveness
Create Date: 2026-11-30 13:30:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0007_output_cancel"
down_revision: str | Sequence[str] | None = "0006_history_liveness"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the output table and the cancel and expiry columns."""
    op.create_table(
        "execution_outputs",
        sa.Column("execution_id", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("stdout", sa.Text(), nullable=False),
        sa.Column("stderr", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["execution_id"], ["executions.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("execution_id", "step"),
    )
    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cancel_requested_at", sa.Double(), nullable=True))
        batch_op.add_column(sa.Column("expires_at", sa.Double(), nullable=True))
        batch_op.create_index(
            "ix_executions_cancel_requested_at", ["cancel_requested_at"], unique=False
        )
        batch_op.create_index("ix_executions_expires_at", ["expires_at"], unique=False)
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("expires_at", sa.Double(), nullable=True))
        batch_op.create_index("ix_runs_expires_at", ["expires_at"], unique=False)


def downgrade() -> None:
    """Drop them."""
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_index("ix_runs_expires_at")
        batch_op.drop_column("expires_at")
    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.drop_index("ix_executions_expires_at")
        batch_op.drop_index("ix_executions_cancel_requested_at")
        batch_op.drop_column("expires_at")
        batch_op.drop_column("cancel_requested_at")
    op.drop_table("execution_outputs")
