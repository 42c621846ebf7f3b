"""Create the catalog: state, services, instances and clients.

Revision ID: 0001
Revises:
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "catalog_state",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("change_index", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "services",
        sa.Column("code", sa.String(63), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("created_index", sa.BigInteger, nullable=False),
        sa.Column("modify_index", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "instances",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column(
            "service_code",
            sa.String(63),
            sa.ForeignKey("services.code", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("host_key", sa.String(255), nullable=False),
        sa.Column("port", sa.Integer, nullable=False),
        sa.Column("address_kind", sa.String(16), nullable=False),
        sa.Column("protocol", sa.String(16), nullable=False),
        sa.Column("check_type", sa.String(16), nullable=False),
        sa.Column("check_ttl", sa.Float, nullable=True),
        sa.Column("tags", sa.Text, nullable=False),
        sa.Column("metadata", sa.Text, nullable=False),
        sa.Column("weight", sa.Integer, nullable=False),
        sa.Column("health", sa.String(16), nullable=False),
        sa.Column("output", sa.Text, nullable=False),
        sa.Column("created_index", sa.BigInteger, nullable=False),
        sa.Column("modify_index", sa.BigInteger, nullable=False),
        sa.Column("registered_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.UniqueConstraint("service_code", "host_key", "port", "protocol", name="uq_instances_registration_key"),
    )
    op.create_index("ix_instances_service_code", "instances", ["service_code"])
    op.create_table(
        "clients",
        sa.Column("common_name", sa.String(128), primary_key=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("services", sa.Text, nullable=False),
        sa.Column("secret_hash", sa.String(255), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("clients")
    op.drop_index("ix_instances_service_code", table_name="instances")
    op.drop_table("instances")
    op.drop_table("services")
    op.drop_table("catalog_state")
