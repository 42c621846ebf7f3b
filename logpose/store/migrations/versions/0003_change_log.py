"""Add the change log that nodes sharing one database follow, and report times.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "changes",
        sa.Column("change_index", sa.BigInteger, primary_key=True),
        sa.Column("position", sa.Integer, primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("service", sa.String(63), nullable=False),
        sa.Column("instance_id", sa.String(36), nullable=True),
        sa.Column("committed_at", sa.Float, nullable=False),
    )
    with op.batch_alter_table("instances") as batch:
        # Kept so that whichever node runs the TTL deadlines sees reports sent to any node.
        batch.add_column(sa.Column("last_report_at", sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("last_report_at")
    op.drop_table("changes")
