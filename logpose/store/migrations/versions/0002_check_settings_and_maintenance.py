"""Keep each instance's full check settings and its maintenance (drain) state.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        # JSON object of the check fields beyond type and ttl (interval, timeout, path...).
        batch.add_column(sa.Column("check_settings", sa.Text, nullable=False, server_default="{}"))
        batch.add_column(sa.Column("maintenance_reason", sa.Text, nullable=True))
        batch.add_column(sa.Column("maintenance_since", sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("maintenance_since")
        batch.drop_column("maintenance_reason")
        batch.drop_column("check_settings")
