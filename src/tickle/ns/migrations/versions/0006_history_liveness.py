"""Run history and liveness: `runs.label`, `computers.settings_version`, `computers.forgotten_at`.

A run keeps the name of what it ran (its task or job may be deleted later; an ad-hoc command has
neither and is named by its inline task); existing runs take their task's or job's name. A
computer keeps the settings version its agent reported, and when the operator forgot it (history
stays, credentials go).

Revision ID: 0006_history_liveness
Revises: 0005_clock_offset
Create Date: 2026-11-30 13:30:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0006_history_liveness"
down_revision: str | Sequence[str] | None = "0005_clock_offset"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the columns, name existing runs, index runs by creation time."""
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("label", sa.String(length=64), nullable=True))
        batch_op.create_index("ix_runs_created_at", ["created_at"], unique=False)
    with op.batch_alter_table("computers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("settings_version", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("forgotten_at", sa.Double(), nullable=True))
    op.execute(
        "UPDATE runs SET label = (SELECT name FROM tasks WHERE tasks.id = runs.task_id)"
        " WHERE task_id IS NOT NULL"
    )
    op.execute(
        "UPDATE runs SET label = (SELECT name FROM jobs WHERE jobs.id = runs.job_id)"
        " WHERE job_id IS NOT NULL"
    )


def downgrade() -> None:
    """Drop the columns and the index."""
    with op.batch_alter_table("computers", schema=None) as batch_op:
        batch_op.drop_column("forgotten_at")
        batch_op.drop_column("settings_version")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_index("ix_runs_created_at")
        batch_op.drop_column("label")
