"""The SQLAlchemy store: one class for SQLite (aiosqlite) and PostgreSQL (asyncpg)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from logpose.errors import ConfigError, ConflictError, LogPoseError, StoreUnavailableError
from logpose.log import store_log
from logpose.model import (
    Address,
    AddressKind,
    Check,
    CheckType,
    ClientRecord,
    Health,
    Instance,
    Protocol,
    Service,
)
from logpose.registry import CatalogSnapshot, CatalogWrite, ChangeRecord
from logpose.store import schema

MIGRATIONS_PATH = Path(__file__).with_name("migrations")
NOTIFY_CHANNEL = "logpose_changes"
# The change log keeps this many indexes; a node further behind reloads everything.
CHANGE_LOG_LENGTH = 10000
CHANGE_LOG_PRUNE_EVERY = 100
MAX_BATCH = 256
CLIENT_CHANGE = "client"  # change-log kind for any change to the clients table  # writes committed in one transaction at most
DATABASE_FILE_NAME = "logpose.db"


def database_url_for(data_dir: Path, database_url: str | None) -> str:
    """Return the SQLAlchemy async URL: the given one with its async driver, or SQLite in ``data_dir``."""
    if not database_url:
        return f"sqlite+aiosqlite:///{(data_dir / DATABASE_FILE_NAME).resolve()}"
    try:
        url = make_url(database_url)
    except ArgumentError as exc:
        raise ConfigError(f"database_url: {database_url!r} is not a database URL ({exc})") from exc
    drivers = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg", "postgres": "postgresql+asyncpg"}
    if url.drivername in drivers:
        url = url.set(drivername=drivers[url.drivername])
    if url.drivername not in ("sqlite+aiosqlite", "postgresql+asyncpg"):
        raise ConfigError(
            f"database_url: driver {url.drivername!r} is not supported; "
            "use sqlite:///PATH or postgresql://USER@HOST/DB"
        )
    return url.render_as_string(hide_password=False)


class SqlStore:
    """Catalog persistence; every ``commit`` is one transaction, durable when it returns.

    SQLite runs in WAL mode with ``synchronous=FULL`` on every connection, so a
    committed write survives power loss and not only a killed process.
    """

    def __init__(self, url: str) -> None:
        self._url = url
        self._engine: AsyncEngine | None = None
        self.available = True
        self._queue: list[tuple[CatalogWrite, asyncio.Future[int]]] = []
        self._queue_ready = asyncio.Event()
        self._batcher: asyncio.Task[None] | None = None
        self.batch_timer = lambda size: contextlib.nullcontext()  # metrics hook: times one commit of ``size`` writes

    def note_available(self, available: bool, detail: str) -> None:
        """Log once per change between reachable and unreachable, not once per failed request."""
        if available == self.available:
            return
        self.available = available
        if available:
            store_log.info("Database %s is reachable again: writes are accepted", self.safe_url)
        else:
            store_log.warning(
                "Database %s is unreachable: writes are rejected with 503, reads answer from memory: %s",
                self.safe_url, detail,
            )

    @property
    def is_sqlite(self) -> bool:
        return self._url.startswith("sqlite")

    @property
    def url(self) -> str:
        return self._url

    @property
    def safe_url(self) -> str:
        """The URL without its password, for logs."""
        return make_url(self._url).render_as_string(hide_password=True)

    async def open(self) -> None:
        """Connect and bring the schema to the newest migration."""
        try:
            # Bounded connect and statement times, so a write fails with 503 instead
            # of hanging while PostgreSQL is down.
            connect_args = {} if self.is_sqlite else {"timeout": 5, "command_timeout": 15}
            self._engine = create_async_engine(
                self._url,
                pool_pre_ping=not self.is_sqlite,
                connect_args=connect_args,
                # Every connection here ends its transaction before it returns to the pool,
                # because the context commits it or Connection.close() rolls it back. A
                # ROLLBACK by the pool would add a round trip to aiosqlite's thread per commit.
                pool_reset_on_return=None if self.is_sqlite else "rollback",
            )
        except (NoSuchModuleError, ModuleNotFoundError) as exc:
            raise ConfigError(f"database_url: the driver for {self.safe_url} is not installed ({exc})") from exc
        if self.is_sqlite:
            event.listen(self._engine.sync_engine, "connect", _configure_sqlite_connection)
            event.listen(self._engine.sync_engine, "begin", _begin_sqlite_transaction)
        try:
            async with self._engine.begin() as connection:
                await connection.run_sync(_upgrade_schema)
        except (SQLAlchemyError, OSError) as exc:
            await self._engine.dispose()
            raise StoreUnavailableError(f"cannot open database {self.safe_url}: {_describe(exc)}") from exc
        store_log.info("Opened database %s", self.safe_url)

    async def close(self) -> None:
        if self._batcher is not None:
            self._batcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._batcher
            self._batcher = None
        for _write, future in self._queue:
            if not future.done():
                future.set_exception(StoreUnavailableError("the database was closed before the write"))
        self._queue.clear()
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None
            store_log.info("Closed database %s", self.safe_url)

    # ----- catalog -------------------------------------------------------

    async def load(self) -> CatalogSnapshot:
        async with self._connect() as connection:
            index = (await connection.execute(sa.select(schema.catalog_state.c.change_index))).scalar() or 0
            service_rows = (await connection.execute(sa.select(schema.services))).mappings().all()
            instance_rows = (
                await connection.execute(sa.select(schema.instances).order_by(schema.instances.c.created_index))
            ).mappings().all()
        services = [_service_from_row(row) for row in service_rows]
        instances = [_instance_from_row(row) for row in instance_rows]
        store_log.info("Loaded %d service(s) and %d instance(s) at index %d", len(services), len(instances), index)
        return CatalogSnapshot(services, instances, index)

    async def commit(self, write: CatalogWrite) -> int:
        """Commit ``write`` and return its change index once it is durable.

        Writes that arrive while a transaction is committing wait and then
        commit together in the next one (group commit), each in its own
        savepoint, so one conflicting write fails alone. Results are delivered
        in index order. Raise StoreUnavailableError or ConflictError.
        """
        if self._engine is None:
            raise StoreUnavailableError("the database is not open")
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.append((write, future))
        self._queue_ready.set()
        if self._batcher is None or self._batcher.done():
            self._batcher = asyncio.get_running_loop().create_task(self._commit_batches(), name="store-commits")
        return await future

    async def _commit_batches(self) -> None:
        while True:
            await self._queue_ready.wait()
            self._queue_ready.clear()
            while self._queue:
                batch = self._queue[:MAX_BATCH]
                del self._queue[: len(batch)]
                with self.batch_timer(len(batch)):
                    await self._commit_batch(batch)

    async def _commit_batch(self, batch: list[tuple[CatalogWrite, asyncio.Future[int]]]) -> None:
        writes = [write for write, _future in batch]
        outcomes: list[int | LogPoseError]
        try:
            try:
                async with self._transaction() as connection:
                    outcomes = list(await self._write_grouped(connection, writes))
            except (ConflictError, _GroupMismatch):
                # Some write conflicts: redo them one at a time, each in a savepoint,
                # so only the conflicting ones fail.
                outcomes = []
                async with self._transaction() as connection:
                    for write in writes:
                        try:
                            async with connection.begin_nested():
                                outcomes.append(await self._write(connection, write))
                        except IntegrityError as exc:
                            outcomes.append(
                                ConflictError(f"the write conflicts with the stored catalog: {_describe(exc)}")
                            )
        except LogPoseError as exc:
            outcomes = [exc] * len(batch)
        except Exception as exc:  # a bug must fail these writes, not stop every later one
            store_log.exception("Committing a batch of %d write(s) failed", len(batch))
            outcomes = [StoreUnavailableError(f"the write failed: {exc!r}")] * len(batch)
        for (_write, future), outcome in zip(batch, outcomes):
            if future.done():
                continue
            if isinstance(outcome, LogPoseError):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    async def _write_grouped(self, connection: Any, writes: list[CatalogWrite]) -> list[int]:
        """Apply a batch with one statement per kind of row; return each write's index.

        Grouping changes the order of statements inside the transaction. That
        is safe because the registry updates, deletes or reports only on rows
        committed before (they are in its memory), never on rows that a write
        of the same batch inserts. A conflict raises ConflictError, and the
        caller then redoes the batch write by write.
        """
        first = await self._claim_indexes(connection, len(writes))
        indexes = list(range(first, first + len(writes)))
        plan = _GroupedWrites()
        for index, write in zip(indexes, writes):
            plan.add(index, write)

        for code in plan.deleted_services:
            await connection.execute(sa.delete(schema.instances).where(schema.instances.c.service_code == code))
            await connection.execute(sa.delete(schema.services).where(schema.services.c.code == code))
        if plan.deleted_instances:
            await connection.execute(sa.delete(schema.instances).where(schema.instances.c.id.in_(plan.deleted_instances)))
        if plan.created_services:
            await connection.execute(sa.insert(schema.services), plan.created_services)
        for index, row in plan.upserted_services:
            await self._upsert(connection, schema.services, "code", row, index)
        if plan.inserted_instances:
            await connection.execute(_INSTANCE_INSERT, plan.inserted_instances)
        if plan.updated_instances:
            updated = await connection.execute(_INSTANCE_UPDATE, plan.updated_instances)
            if updated.rowcount not in (-1, len(plan.updated_instances)):
                raise _GroupMismatch("an updated instance is gone")
        if plan.health_updates:
            await connection.execute(_HEALTH_UPDATE, plan.health_updates)
        if plan.changes:
            await connection.execute(_CHANGE_INSERT, plan.changes)
        await self._finish_changes(connection, first, indexes[-1])
        return indexes

    async def _claim_indexes(self, connection: Any, count: int) -> int:
        """Advance the change index by ``count`` and return the first of them, holding its row until commit.

        The UPDATE locks the row as FOR UPDATE does, so concurrent writers on
        other nodes queue here and indexes follow commit order, and with
        RETURNING one statement both reads and stores the index.
        """
        last = (await connection.execute(_CLAIM_INDEXES, {"count": count})).scalar()
        if last is None:
            last = count
            await connection.execute(sa.insert(schema.catalog_state).values(id=1, change_index=last))
        return last - count + 1

    async def _lock_index(self, connection: Any) -> int:
        """Return the current change index, holding its row until commit."""
        # FOR UPDATE holds the row until commit, so concurrent writers on other
        # nodes queue here and indexes follow commit order; SQLite ignores it and
        # serialises writers with its database lock instead.
        current = (
            await connection.execute(
                sa.select(schema.catalog_state.c.change_index)
                .where(schema.catalog_state.c.id == 1)
                .with_for_update()
            )
        ).scalar()
        if current is None:
            await connection.execute(sa.insert(schema.catalog_state).values(id=1, change_index=0))
            current = 0
        return current

    async def _write(self, connection: Any, write: CatalogWrite) -> int:
        """Apply one write inside the batch's transaction; return its change index.

        The index is taken from ``catalog_state`` under a row lock, so indexes
        follow commit order across every node sharing the database.
        """
        index = await self._next_index(connection)
        changes: list[tuple[str, str, str | None]] = []
        for code in write.delete_services:
            await connection.execute(sa.delete(schema.instances).where(schema.instances.c.service_code == code))
            await connection.execute(sa.delete(schema.services).where(schema.services.c.code == code))
            changes.append(("service-delete", code, None))
        if write.delete_instances:
            doomed = [instance.id for instance in write.delete_instances]
            await connection.execute(sa.delete(schema.instances).where(schema.instances.c.id.in_(doomed)))
            changes += [("instance-delete", instance.service, instance.id) for instance in write.delete_instances]
        for service in write.create_services:
            row = {**_service_row(service), "created_index": index, "modify_index": index}
            await connection.execute(sa.insert(schema.services).values(**row))
            changes.append(("service-upsert", service.code, None))
        for service in write.upsert_services:
            await self._upsert(connection, schema.services, "code", _service_row(service), index)
            changes.append(("service-upsert", service.code, None))
        for instance in write.upsert_instances:
            await self._upsert(connection, schema.instances, "id", _instance_row(instance), index)
            changes.append(("instance-upsert", instance.service, instance.id))
        for update in write.health_updates:
            await connection.execute(
                sa.update(schema.instances)
                .where(schema.instances.c.id == update.instance_id)
                .values(health=update.health.value, output=update.output, updated_at=update.updated_at,
                        last_report_at=update.reported_at, modify_index=index)
            )
            changes.append(("health", update.service, update.instance_id))
        await self._record_changes(connection, index, changes)
        return index

    async def _next_index(self, connection: Any) -> int:
        index = await self._lock_index(connection) + 1
        await connection.execute(
            sa.update(schema.catalog_state).where(schema.catalog_state.c.id == 1).values(change_index=index)
        )
        return index

    async def _record_changes(self, connection: Any, index: int, changes: list[tuple[str, str, str | None]]) -> None:
        if changes:
            await connection.execute(sa.insert(schema.changes), _change_rows(index, changes, time.time()))
        await self._finish_changes(connection, index, index)

    async def _finish_changes(self, connection: Any, first: int, last: int) -> None:
        """Prune the change log now and then, and notify the other nodes of indexes up to ``last``."""
        if last // CHANGE_LOG_PRUNE_EVERY != (first - 1) // CHANGE_LOG_PRUNE_EVERY:
            await connection.execute(
                sa.delete(schema.changes).where(schema.changes.c.change_index <= last - CHANGE_LOG_LENGTH)
            )
        if not self.is_sqlite:
            # Delivered at commit, never for a rolled-back transaction. The payload
            # stays small: the index only; listeners read the rest from the log.
            await connection.execute(sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, str(last))))

    async def _upsert(self, connection: Any, table: sa.Table, key: str, row: dict[str, Any], index: int) -> None:
        row = {**row, "modify_index": index}
        values = {name: value for name, value in row.items() if name != "created_index"}
        updated = await connection.execute(sa.update(table).where(table.c[key] == row[key]).values(**values))
        if updated.rowcount == 0:
            await connection.execute(sa.insert(table).values(**{**row, "created_index": index}))

    async def changes_since(self, after: int) -> tuple[int, list[ChangeRecord] | None]:
        """Return the database's change index and the changes after ``after``, in order.

        The list is None when the log no longer reaches back to ``after``: the
        caller must reload the whole catalog.
        """
        async with self._connect() as connection:
            index = (await connection.execute(sa.select(schema.catalog_state.c.change_index))).scalar() or 0
            if index <= after:
                return index, []
            rows = (
                await connection.execute(
                    sa.select(schema.changes)
                    .where(schema.changes.c.change_index > after)
                    .order_by(schema.changes.c.change_index, schema.changes.c.position)
                )
            ).mappings().all()
        if not rows or rows[0]["change_index"] > after + 1:
            return index, None
        records = [
            ChangeRecord(row["change_index"], row["kind"], row["service"], row["instance_id"]) for row in rows
        ]
        return index, records

    async def fetch(self, codes: set[str], instance_ids: set[str]) -> tuple[dict[str, Service], dict[str, Instance]]:
        """Return the current rows of the named services and instances; absent ones are left out."""
        services: dict[str, Service] = {}
        instances: dict[str, Instance] = {}
        async with self._connect() as connection:
            if codes:
                rows = (await connection.execute(
                    sa.select(schema.services).where(schema.services.c.code.in_(codes)))).mappings().all()
                services = {row["code"]: _service_from_row(row) for row in rows}
            if instance_ids:
                rows = (await connection.execute(
                    sa.select(schema.instances).where(schema.instances.c.id.in_(instance_ids)))).mappings().all()
                instances = {row["id"]: _instance_from_row(row) for row in rows}
        return services, instances

    # ----- clients -------------------------------------------------------

    async def get_client(self, common_name: str) -> ClientRecord | None:
        async with self._connect() as connection:
            row = (
                await connection.execute(sa.select(schema.clients).where(schema.clients.c.common_name == common_name))
            ).mappings().first()
        return _client_from_row(row) if row else None

    async def list_clients(self) -> list[ClientRecord]:
        async with self._connect() as connection:
            rows = (await connection.execute(sa.select(schema.clients).order_by(schema.clients.c.common_name))).mappings().all()
        return [_client_from_row(row) for row in rows]

    async def create_client(self, client: ClientRecord) -> None:
        async with self._transaction() as connection:
            await self._record_client_change(connection)
            await connection.execute(
                sa.insert(schema.clients).values(
                    common_name=client.common_name,
                    role=client.role,
                    services=json.dumps(list(client.services)),
                    secret_hash=client.secret_hash,
                    created_at=client.created_at or time.time(),
                )
            )

    async def update_client(self, client: ClientRecord) -> bool:
        """Replace the role, services and secret hash of a client; return False when it does not exist."""
        async with self._transaction() as connection:
            await self._record_client_change(connection)
            updated = await connection.execute(
                sa.update(schema.clients)
                .where(schema.clients.c.common_name == client.common_name)
                .values(role=client.role, services=json.dumps(list(client.services)), secret_hash=client.secret_hash)
            )
        return updated.rowcount == 1

    async def delete_client(self, common_name: str) -> bool:
        """Delete a client; return False when it does not exist."""
        async with self._transaction() as connection:
            await self._record_client_change(connection)
            deleted = await connection.execute(sa.delete(schema.clients).where(schema.clients.c.common_name == common_name))
        return deleted.rowcount == 1

    async def _record_client_change(self, connection: Any) -> None:
        # Client rows travel through the change log like the catalog, so a
        # removal or rotation on one node revokes tokens on every node.
        index = await self._next_index(connection)
        await self._record_changes(connection, index, [(CLIENT_CHANGE, "", None)])

    # ----- schema revision and snapshots -----------------------------------

    async def schema_revision(self) -> str | None:
        """Return the Alembic revision the database is at; None before the first migration."""
        async with self._connect() as connection:
            return await connection.run_sync(_current_revision)

    async def dump(self) -> tuple[CatalogSnapshot, list[ClientRecord], str | None]:
        """Read the catalog, the clients and the schema revision in one read transaction.

        The three are consistent with each other even while a server writes:
        SQLite reads one WAL snapshot, PostgreSQL runs at REPEATABLE READ.
        """
        async with self._connect() as connection:
            if not self.is_sqlite:
                await connection.execution_options(isolation_level="REPEATABLE READ")
            revision = await connection.run_sync(_current_revision)
            index = (await connection.execute(sa.select(schema.catalog_state.c.change_index))).scalar() or 0
            service_rows = (
                await connection.execute(sa.select(schema.services).order_by(schema.services.c.code))
            ).mappings().all()
            instance_rows = (
                await connection.execute(sa.select(schema.instances).order_by(schema.instances.c.created_index))
            ).mappings().all()
            client_rows = (
                await connection.execute(sa.select(schema.clients).order_by(schema.clients.c.common_name))
            ).mappings().all()
        snapshot = CatalogSnapshot(
            [_service_from_row(row) for row in service_rows],
            [_instance_from_row(row) for row in instance_rows],
            index,
        )
        return snapshot, [_client_from_row(row) for row in client_rows], revision

    async def replace_catalog(self, snapshot: CatalogSnapshot, clients: list[ClientRecord]) -> int:
        """Replace every service, instance and client in one transaction; return the new change index.

        The rows keep the indexes they carry. The change index moves past both
        the stored one and the snapshot's, and the change log is emptied, so a
        node that follows this database finds a gap and reloads the whole
        catalog. Raise ConflictError when the rows contradict each other, such as
        two instances with one registration key or an instance of a missing
        service. Raise StoreUnavailableError when the database fails. Either way
        nothing changes.
        """
        async with self._transaction() as connection:
            index = max(await self._lock_index(connection), snapshot.index) + 1
            for table in (schema.changes, schema.instances, schema.services, schema.clients):
                await connection.execute(sa.delete(table))
            if snapshot.services:
                await connection.execute(sa.insert(schema.services), [_service_row(s) for s in snapshot.services])
            if snapshot.instances:
                await connection.execute(sa.insert(schema.instances), [_instance_row(i) for i in snapshot.instances])
            if clients:
                await connection.execute(sa.insert(schema.clients), [_client_row(client) for client in clients])
            await connection.execute(
                sa.update(schema.catalog_state).where(schema.catalog_state.c.id == 1).values(change_index=index)
            )
            if not self.is_sqlite:
                await connection.execute(sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, str(index))))
        store_log.info(
            "Replaced the catalog: %d service(s), %d instance(s), %d client(s), now at index %d",
            len(snapshot.services), len(snapshot.instances), len(clients), index,
        )
        return index

    # ----- connections and error mapping ------------------------------------

    def _connect(self) -> "_Guarded":
        return _Guarded(self, transactional=False)

    def _transaction(self) -> "_Guarded":
        return _Guarded(self, transactional=True)


class _Guarded:
    """A connection context that maps database errors to LogPose errors at the boundary."""

    def __init__(self, store: SqlStore, *, transactional: bool) -> None:
        self._store = store
        self._transactional = transactional
        self._context: Any = None

    async def __aenter__(self) -> Any:
        engine = self._store._engine
        if engine is None:
            raise StoreUnavailableError("the database is not open")
        self._context = engine.begin() if self._transactional else engine.connect()
        try:
            return await self._context.__aenter__()
        except (SQLAlchemyError, OSError) as exc:
            raise self._unavailable(f"cannot reach database {self._store.safe_url}: {_describe(exc)}") from exc

    async def __aexit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        try:
            await self._context.__aexit__(exc_type, exc, traceback)
        except IntegrityError as error:
            raise ConflictError(f"the write conflicts with the stored catalog: {_describe(error)}") from error
        except (SQLAlchemyError, OSError) as error:
            raise self._unavailable(f"database write failed: {_describe(error)}") from error
        if isinstance(exc, IntegrityError):
            raise ConflictError(f"the write conflicts with the stored catalog: {_describe(exc)}") from exc
        if isinstance(exc, (DBAPIError, SQLAlchemyError, OSError)):
            raise self._unavailable(f"database operation failed: {_describe(exc)}") from exc
        if exc is None:
            self._store.note_available(True, "")

    def _unavailable(self, detail: str) -> StoreUnavailableError:
        self._store.note_available(False, detail)
        return StoreUnavailableError(detail)


class _GroupMismatch(Exception):
    """The grouped statements did not touch the rows expected; redo the batch write by write."""


# Statements of every batch commit, built once, so SQLAlchemy also computes
# their cache keys once instead of per batch.
_CLAIM_INDEXES = (
    sa.update(schema.catalog_state)
    .where(schema.catalog_state.c.id == 1)
    .values(change_index=schema.catalog_state.c.change_index + sa.bindparam("count"))
    .returning(schema.catalog_state.c.change_index)
)
_INSTANCE_INSERT = sa.insert(schema.instances)
_CHANGE_INSERT = sa.insert(schema.changes)
_INSTANCE_UPDATE_COLUMNS = [
    column.name for column in schema.instances.columns if column.name not in ("id", "created_index")
]
_INSTANCE_UPDATE = (
    sa.update(schema.instances)
    .where(schema.instances.c.id == sa.bindparam("row_id"))
    .values({name: sa.bindparam(f"new_{name}") for name in _INSTANCE_UPDATE_COLUMNS})
)
_HEALTH_UPDATE = (
    sa.update(schema.instances)
    .where(schema.instances.c.id == sa.bindparam("row_id"))
    .values(
        health=sa.bindparam("new_health"),
        output=sa.bindparam("new_output"),
        updated_at=sa.bindparam("new_updated_at"),
        last_report_at=sa.bindparam("new_last_report_at"),
        modify_index=sa.bindparam("new_modify_index"),
    )
)


class _GroupedWrites:
    """The rows of a batch of writes, sorted by statement, each stamped with its write's index."""

    def __init__(self) -> None:
        self.deleted_services: list[str] = []
        self.deleted_instances: list[str] = []
        self.created_services: list[dict[str, Any]] = []
        self.upserted_services: list[tuple[int, dict[str, Any]]] = []
        self.inserted_instances: list[dict[str, Any]] = []
        self.updated_instances: list[dict[str, Any]] = []
        self.health_updates: list[dict[str, Any]] = []
        self.changes: list[dict[str, Any]] = []
        self._now = time.time()

    def add(self, index: int, write: CatalogWrite) -> None:
        changes: list[tuple[str, str, str | None]] = []
        for code in write.delete_services:
            self.deleted_services.append(code)
            changes.append(("service-delete", code, None))
        for instance in write.delete_instances:
            self.deleted_instances.append(instance.id)
            changes.append(("instance-delete", instance.service, instance.id))
        for service in write.create_services:
            self.created_services.append({**_service_row(service), "created_index": index, "modify_index": index})
            changes.append(("service-upsert", service.code, None))
        for service in write.upsert_services:
            self.upserted_services.append((index, _service_row(service)))
            changes.append(("service-upsert", service.code, None))
        for instance in write.upsert_instances:
            row = {**_instance_row(instance), "modify_index": index}
            if instance.created_index == 0:  # the registry's mark of a new instance
                self.inserted_instances.append({**row, "created_index": index})
            else:
                update = {f"new_{name}": row[name] for name in _INSTANCE_UPDATE_COLUMNS}
                self.updated_instances.append({"row_id": instance.id, **update})
            changes.append(("instance-upsert", instance.service, instance.id))
        for health in write.health_updates:
            self.health_updates.append({
                "row_id": health.instance_id,
                "new_health": health.health.value,
                "new_output": health.output,
                "new_updated_at": health.updated_at,
                "new_last_report_at": health.reported_at,
                "new_modify_index": index,
            })
            changes.append(("health", health.service, health.instance_id))
        self.changes += _change_rows(index, changes, self._now)


def _change_rows(index: int, changes: list[tuple[str, str, str | None]], now: float) -> list[dict[str, Any]]:
    return [
        {"change_index": index, "position": position, "kind": kind, "service": service,
         "instance_id": instance_id, "committed_at": now}
        for position, (kind, service, instance_id) in enumerate(changes)
    ]


def _describe(exc: BaseException) -> str:
    original = getattr(exc, "orig", None)
    return str(original or exc).splitlines()[0]


def _configure_sqlite_connection(dbapi_connection: Any, _record: Any) -> None:
    # The sqlite3 module's own transaction handling breaks SAVEPOINT; SQLAlchemy
    # documents taking it over: no implicit BEGIN here, an explicit one below.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=5000")  # milliseconds
    cursor.close()


def _begin_sqlite_transaction(connection: Any) -> None:
    # IMMEDIATE takes the write lock at once: a deferred BEGIN that reads, then
    # writes, fails at once with "database is locked" when another connection
    # committed in between, and busy_timeout does not help there.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _upgrade_schema(connection: Any) -> None:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_PATH))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


def _current_revision(connection: Any) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def _service_row(service: Service) -> dict[str, Any]:
    return {
        "code": service.code,
        "name": service.name,
        "created_index": service.created_index,
        "modify_index": service.modify_index,
    }


def _instance_row(instance: Instance) -> dict[str, Any]:
    return {
        "id": instance.id,
        "service_code": instance.service,
        "host": instance.address.host,
        "host_key": instance.address.normalized_host,
        "port": instance.address.port,
        "address_kind": instance.address.kind.value,
        "protocol": instance.protocol.value,
        "check_type": instance.check.type.value,
        "check_ttl": instance.check.ttl,
        "check_settings": json.dumps(_check_settings(instance.check)),
        "maintenance_reason": instance.maintenance_reason,
        "maintenance_since": instance.maintenance_since,
        "last_report_at": instance.last_report_at,
        "tags": json.dumps(list(instance.tags)),
        "metadata": json.dumps(dict(instance.metadata)),
        "weight": instance.weight,
        "health": instance.health.value,
        "output": instance.output,
        "created_index": instance.created_index,
        "modify_index": instance.modify_index,
        "registered_at": instance.registered_at,
        "updated_at": instance.updated_at,
    }


def _service_from_row(row: Any) -> Service:
    return Service(row["code"], row["name"], row["created_index"], row["modify_index"])


def _instance_from_row(row: Any) -> Instance:
    return Instance(
        id=row["id"],
        service=row["service_code"],
        address=Address(row["host"], row["port"], AddressKind(row["address_kind"])),
        protocol=Protocol(row["protocol"]),
        health=Health(row["health"]),
        check=Check(CheckType(row["check_type"]), row["check_ttl"], **_check_settings_from(row["check_settings"])),
        tags=tuple(json.loads(row["tags"])) if row["tags"] != "[]" else (),
        metadata=json.loads(row["metadata"]) if row["metadata"] != "{}" else {},
        weight=row["weight"],
        output=row["output"],
        created_index=row["created_index"],
        modify_index=row["modify_index"],
        registered_at=row["registered_at"],
        updated_at=row["updated_at"],
        maintenance_reason=row["maintenance_reason"],
        maintenance_since=row["maintenance_since"],
        last_report_at=row["last_report_at"],
    )


@functools.lru_cache(maxsize=1024)
def _check_settings_from(text: str) -> dict[str, Any]:
    """Parse a stored check-settings object; most instances share a few, so loading 100,000 parses each once.

    Callers must not mutate the returned dict: it is shared.
    """
    return json.loads(text)


def _check_settings(check: Check) -> dict[str, Any]:
    """Return the check fields stored as JSON: all but type and ttl, which have columns."""
    return {
        name: getattr(check, name)
        for name in ("interval", "timeout", "rise", "fall", "deregister_after",
                     "path", "scheme", "tls_verify", "expected_status")
    }


def _client_from_row(row: Any) -> ClientRecord:
    return ClientRecord(
        common_name=row["common_name"],
        role=row["role"],
        services=tuple(json.loads(row["services"])),
        secret_hash=row["secret_hash"],
        created_at=row["created_at"],
    )


def _client_row(client: ClientRecord) -> dict[str, Any]:
    return {
        "common_name": client.common_name,
        "role": client.role,
        "services": json.dumps(list(client.services)),
        "secret_hash": client.secret_hash,
        "created_at": client.created_at,
    }
