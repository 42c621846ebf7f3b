"""SQLAlchemy Core tables of the catalog.

The schema itself is created by the Alembic migrations in ``migrations/``; these
table objects are what queries are written against and must match the newest one.
"""

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

catalog_state = Table(
    "catalog_state",
    metadata,
    Column("id", Integer, primary_key=True),  # always 1: a single-row table
    Column("change_index", BigInteger, nullable=False),
)

services = Table(
    "services",
    metadata,
    Column("code", String(63), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("created_index", BigInteger, nullable=False),
    Column("modify_index", BigInteger, nullable=False),
)

instances = Table(
    "instances",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("service_code", String(63), ForeignKey("services.code", ondelete="CASCADE"), nullable=False),
    Column("host", String(255), nullable=False),
    # The normalised host (lower case, IPv6 compressed) that re-registration matches on.
    Column("host_key", String(255), nullable=False),
    Column("port", Integer, nullable=False),
    Column("address_kind", String(16), nullable=False),
    Column("protocol", String(16), nullable=False),
    Column("check_type", String(16), nullable=False),
    Column("check_ttl", Float, nullable=True),
    Column("check_settings", Text, nullable=False, server_default="{}"),  # JSON object
    Column("tags", Text, nullable=False),  # JSON array
    Column("metadata", Text, nullable=False),  # JSON object
    Column("weight", Integer, nullable=False),
    Column("health", String(16), nullable=False),
    Column("output", Text, nullable=False),
    Column("created_index", BigInteger, nullable=False),
    Column("modify_index", BigInteger, nullable=False),
    Column("registered_at", Float, nullable=False),  # Unix time, seconds
    Column("updated_at", Float, nullable=False),
    Column("maintenance_reason", Text, nullable=True),  # NULL: not in maintenance
    Column("maintenance_since", Float, nullable=True),
    Column("last_report_at", Float, nullable=True),  # Unix time of the last health report
    UniqueConstraint("service_code", "host_key", "port", "protocol", name="uq_instances_registration_key"),
)

clients = Table(
    "clients",
    metadata,
    Column("common_name", String(128), primary_key=True),
    Column("role", String(16), nullable=False),
    Column("services", Text, nullable=False),  # JSON array of service codes, "*" for all
    Column("secret_hash", String(255), nullable=False),  # never the secret itself
    Column("created_at", Float, nullable=False),
)

# One row per entity a commit touched; the change feed of other nodes reads it.
changes = Table(
    "changes",
    metadata,
    Column("change_index", BigInteger, primary_key=True),
    Column("position", Integer, primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("service", String(63), nullable=False),
    Column("instance_id", String(36), nullable=True),
    Column("committed_at", Float, nullable=False),  # Unix time, seconds
)
