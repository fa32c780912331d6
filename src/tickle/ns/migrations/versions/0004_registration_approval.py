"""Stable identities and registration approval: `identity_sha256` on task servers and computers,
and the `registrations` an operator approves or rejects.

A registration under a registered name must bring the identity kept there; existing rows start
with none, so each keeps the identity of its next registration (as after `tickle computers
rekey`). Registrations of new names wait in `registrations` while registration_approval is
manual.

Revision ID: 0004_registration_approval
Revises: 0003
Create Date: 2026-11-30 13:20:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0004_registration_approval"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the identity columns (NULL: not known yet) and the `registrations` table."""
    for table in ("task_servers", "computers"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("identity_sha256", sa.String(length=64), nullable=True))
    op.create_table(
        "registrations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("identity_sha256", sa.String(length=64), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("task_server", sa.String(length=64), nullable=True),
        sa.Column("address", sa.String(length=255), nullable=True),
        sa.Column("requested_at", sa.Double(), nullable=False),
        sa.Column("last_seen_at", sa.Double(), nullable=False),
        sa.Column("decided_at", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("kind", "name"),
    )


def downgrade() -> None:
    """Drop the `registrations` table and the identity columns."""
    op.drop_table("registrations")
    for table in ("computers", "task_servers"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("identity_sha256")
