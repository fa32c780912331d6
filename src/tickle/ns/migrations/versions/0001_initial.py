"""Initial schema: inventory, tasks and jobs, runs, executions, status events, settings.

Revision ID: 0001
Revises:
Create Date: 2026-11-25 16:29:37.641075

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create every table and the single settings row."""
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "settings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("task_request_interval_s", sa.Integer(), nullable=False),
        sa.Column("poll_jitter_fraction", sa.Double(), nullable=False),
        sa.Column("ts_check_interval_s", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "task_servers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("tickle_key", sa.String(length=64), nullable=False),
        sa.Column("tickle_host", sa.String(length=255), nullable=False),
        sa.Column("tickle_port", sa.Integer(), nullable=False),
        sa.Column("api_url", sa.String(length=2048), nullable=False),
        sa.Column("tickle_state", sa.String(length=16), nullable=False),
        sa.Column("registered_at", sa.Double(), nullable=False),
        sa.Column("last_pull_at", sa.Double(), nullable=True),
        sa.Column("settings_pulled_at", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    with op.batch_alter_table("task_servers", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_task_servers_token_sha256"), ["token_sha256"], unique=False
        )

    op.create_table(
        "tasks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("command", sa.JSON(), nullable=True),
        sa.Column("script", sa.Text(), nullable=True),
        sa.Column("timeout_s", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "computers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("task_server_id", sa.Integer(), nullable=True),
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("tickle_key", sa.String(length=64), nullable=False),
        sa.Column("tickle_host", sa.String(length=255), nullable=True),
        sa.Column("tickle_port", sa.Integer(), nullable=False),
        sa.Column("cem", sa.Boolean(), nullable=False),
        sa.Column("groups", sa.JSON(), nullable=False),
        sa.Column("reported_address", sa.String(length=255), nullable=True),
        sa.Column("observed_address", sa.String(length=255), nullable=True),
        sa.Column("nat_detected", sa.Boolean(), nullable=False),
        sa.Column("tickle_state", sa.String(length=16), nullable=False),
        sa.Column("last_contact_at", sa.Double(), nullable=True),
        sa.ForeignKeyConstraint(["task_server_id"], ["task_servers.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    with op.batch_alter_table("computers", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_computers_task_server_id"), ["task_server_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_computers_token_sha256"), ["token_sha256"], unique=False
        )

    op.create_table(
        "job_tasks",
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(
            ["task_id"],
            ["tasks.id"],
        ),
        sa.PrimaryKeyConstraint("job_id", "position"),
    )
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=True),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["jobs.id"],
        ),
        sa.ForeignKeyConstraint(
            ["task_id"],
            ["tasks.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "executions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("computer_id", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=True),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("steps", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("via", sa.String(length=16), nullable=True),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("output_tail", sa.Text(), nullable=True),
        sa.Column("step_results", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("tickle_sent_at", sa.Double(), nullable=True),
        sa.Column("ts_pulled_at", sa.Double(), nullable=True),
        sa.Column("agent_tickled_at", sa.Double(), nullable=True),
        sa.Column("agent_pulled_at", sa.Double(), nullable=True),
        sa.Column("started_at", sa.Double(), nullable=True),
        sa.Column("finished_at", sa.Double(), nullable=True),
        sa.Column("cached_at_ts", sa.Double(), nullable=True),
        sa.Column("recorded_at", sa.Double(), nullable=True),
        sa.ForeignKeyConstraint(
            ["computer_id"],
            ["computers.id"],
        ),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["jobs.id"],
        ),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["runs.id"],
        ),
        sa.ForeignKeyConstraint(
            ["task_id"],
            ["tasks.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_executions_computer_id"), ["computer_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_executions_run_id"), ["run_id"], unique=False)
        batch_op.create_index(
            "ix_executions_status_tickle", ["status", "tickle_sent_at"], unique=False
        )

    op.create_table(
        "status_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("execution_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("at", sa.Double(), nullable=False),
        sa.Column("body", sa.JSON(), nullable=False),
        sa.Column("recorded_at", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(
            ["execution_id"],
            ["executions.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("event_id"),
    )
    with op.batch_alter_table("status_events", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_status_events_execution_id"), ["execution_id"], unique=False
        )
    settings = sa.table(
        "settings",
        sa.column("id", sa.Integer()),
        sa.column("version", sa.Integer()),
        sa.column("task_request_interval_s", sa.Integer()),
        sa.column("poll_jitter_fraction", sa.Double()),
        sa.column("ts_check_interval_s", sa.Integer()),
    )
    op.bulk_insert(
        settings,
        [
            {
                "id": 1,
                "version": 1,
                "task_request_interval_s": 1800,
                "poll_jitter_fraction": 0.1,
                "ts_check_interval_s": 60,
            }
        ],
    )


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("status_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_status_events_execution_id"))

    op.drop_table("status_events")
    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.drop_index("ix_executions_status_tickle")
        batch_op.drop_index(batch_op.f("ix_executions_run_id"))
        batch_op.drop_index(batch_op.f("ix_executions_computer_id"))

    op.drop_table("executions")
    op.drop_table("runs")
    op.drop_table("job_tasks")
    with op.batch_alter_table("computers", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_computers_token_sha256"))
        batch_op.drop_index(batch_op.f("ix_computers_task_server_id"))

    op.drop_table("computers")
    op.drop_table("tasks")
    with op.batch_alter_table("task_servers", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_task_servers_token_sha256"))

    op.drop_table("task_servers")
    op.drop_table("settings")
    op.drop_table("jobs")
