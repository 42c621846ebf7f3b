"""Persistence of the catalog with SQLAlchemy 2 (async): SQLite file or PostgreSQL.

The store knows nothing of HTTP or DNS; the registry is its only caller besides
the authenticator's client records.
"""

from logpose.store.sql import SqlStore, database_url_for

__all__ = ["SqlStore", "database_url_for"]
