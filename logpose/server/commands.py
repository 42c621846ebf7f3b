"""Subcommands of ``logpose-server`` that work on the configuration or the database and exit.

``check-config FILE`` validates a TOML file. ``migrate`` brings the database
schema to the newest revision. ``snapshot save FILE`` and ``snapshot restore
FILE`` copy the catalog and its clients to and from a snapshot file (see
``logpose.server.snapshot``). Each prints its result on stdout, or one line on
stderr and exits with the code of ``logpose.server.lifecycle``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from logpose.config import Settings, load_settings
from logpose.errors import ConfigError, ConflictError, StoreUnavailableError
from logpose.server.lifecycle import EXIT_CONFIG, EXIT_STORE
from logpose.server.snapshot import SnapshotError, decode, encode, known_revisions, new_snapshot, write_file
from logpose.server.tls import server_ssl_context
from logpose.store import SqlStore, database_url_for

PROGRAM = "logpose-server"
SUBCOMMANDS = ("check-config", "migrate", "snapshot")


class CommandError(Exception):
    """A subcommand failed; ``message`` is the one line printed, ``exit_code`` the process's."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Commands that check the configuration or work on the database, then exit.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = commands.add_parser(
        "check-config", help="validate a TOML configuration file without starting the server",
        description="Validate a TOML configuration file on its own, over the defaults, without starting the "
                    "server. Environment variables are not read. Exit 0 when it is valid, 2 when it is not.",
    )
    check.add_argument("file", type=Path, metavar="FILE", help="TOML configuration file")

    migrate = commands.add_parser(
        "migrate", help="apply the database migrations and exit",
        description="Bring the database schema to the newest revision and print it. The server does the "
                    "same at every start.",
    )
    _add_database_options(migrate)

    snapshot = commands.add_parser("snapshot", help="save the catalog to a file, or restore it from one")
    actions = snapshot.add_subparsers(dest="action", required=True, metavar="ACTION")
    save = actions.add_parser(
        "save", help="write services, instances and clients to FILE",
        description="Write the services, instances and clients (with secret hashes, never secrets) to FILE, "
                    "a versioned file with a SHA-256 checksum. The server may keep running.",
    )
    save.add_argument("file", type=Path, metavar="FILE", help="snapshot file to write (mode 0600)")
    _add_database_options(save)
    restore = actions.add_parser(
        "restore", help="replace services, instances and clients with those in FILE",
        description="Replace every service, instance and client in the database with those in FILE, in one "
                    "transaction. Stop the server first. A file that is corrupted, truncated or of another "
                    "format version changes nothing.",
    )
    restore.add_argument("file", type=Path, metavar="FILE", help="snapshot file written by 'snapshot save'")
    _add_database_options(restore)
    return parser


def _add_database_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration file, as given to the server")
    parser.add_argument("--data-dir", metavar="DIR", help="data directory (default ./data)")
    parser.add_argument("--database-url", metavar="URL", help="database URL (default: SQLite file in the data directory)")


def run(argv: list[str]) -> int:
    """Run the subcommand in ``argv`` and return the exit code."""
    arguments = build_parser().parse_args(argv)
    try:
        if arguments.command == "check-config":
            check_config(arguments.file)
        elif arguments.command == "migrate":
            asyncio.run(migrate(_database_settings(arguments)))
        elif arguments.action == "save":
            asyncio.run(save_snapshot(_database_settings(arguments), arguments.file))
        else:
            asyncio.run(restore_snapshot(_database_settings(arguments), arguments.file))
    except CommandError as exc:
        print(f"{PROGRAM}: {exc.message}", file=sys.stderr)
        return exc.exit_code
    return 0


def check_config(file: Path) -> None:
    """Validate ``file`` as the server would at start, short of opening the database or binding."""
    try:
        settings = load_settings({}, environ={}, config_file=file)
        database_url_for(settings.data_dir, settings.database_url)
        server_ssl_context(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    except ConfigError as exc:
        raise CommandError(f"invalid configuration: {exc.detail}", EXIT_CONFIG) from exc
    print(f"{file}: configuration OK")


async def migrate(settings: Settings) -> None:
    store = await _open_store(settings, create=True)
    try:
        revision = await store.schema_revision()
    except StoreUnavailableError as exc:
        raise CommandError(exc.detail, EXIT_STORE) from exc
    finally:
        await store.close()
    print(f"database {store.safe_url} is at schema revision {revision} (newest known: {known_revisions()[-1]})")


async def save_snapshot(settings: Settings, file: Path) -> None:
    store = await _open_store(settings, create=False)
    try:
        catalog, clients, revision = await store.dump()
    except StoreUnavailableError as exc:
        raise CommandError(exc.detail, EXIT_STORE) from exc
    finally:
        await store.close()
    try:
        write_file(file, encode(new_snapshot(catalog, clients, revision)))
    except OSError as exc:
        raise CommandError(f"cannot write snapshot {file}: {exc.strerror or exc}", EXIT_CONFIG) from exc
    print(
        f"saved {len(catalog.services)} service(s), {len(catalog.instances)} instance(s) and "
        f"{len(clients)} client(s) at index {catalog.index} to {file}"
    )


async def restore_snapshot(settings: Settings, file: Path) -> None:
    # The file is read and checked in full before the database is opened, so a
    # bad file leaves even a missing data directory untouched.
    try:
        content = file.read_bytes()
    except OSError as exc:
        raise CommandError(f"cannot read snapshot {file}: {exc.strerror or exc}", EXIT_CONFIG) from exc
    try:
        snapshot = decode(content, f"snapshot {file}")
    except SnapshotError as exc:
        raise CommandError(f"{exc.detail}; nothing was changed", EXIT_CONFIG) from exc

    store = await _open_store(settings, create=True)
    try:
        index = await store.replace_catalog(snapshot.catalog, snapshot.clients)
    except ConflictError as exc:
        raise CommandError(f"snapshot {file} does not fit the database: {exc.detail}; nothing was changed",
                           EXIT_CONFIG) from exc
    except StoreUnavailableError as exc:
        raise CommandError(f"{exc.detail}; nothing was changed", EXIT_STORE) from exc
    finally:
        await store.close()
    catalog = snapshot.catalog
    print(
        f"restored {len(catalog.services)} service(s), {len(catalog.instances)} instance(s) and "
        f"{len(snapshot.clients)} client(s) from {file}; the change index is now {index}"
    )
    stale_secret = settings.data_dir / "admin.secret"
    if settings.database_url is None and stale_secret.exists():
        print(
            f"note: {stale_secret} was written for the catalog before the restore; the restored admin client "
            "keeps the secret it had when the snapshot was saved",
            file=sys.stderr,
        )


def _database_settings(arguments: argparse.Namespace) -> Settings:
    flags: dict[str, Any] = {"data_dir": arguments.data_dir, "database_url": arguments.database_url}
    try:
        return load_settings(flags, config_file=arguments.config, serving=False)
    except ConfigError as exc:
        raise CommandError(f"invalid configuration: {exc.detail}", EXIT_CONFIG) from exc


async def _open_store(settings: Settings, *, create: bool) -> SqlStore:
    """Open the configured database and migrate it; without ``create`` a missing SQLite file is an error."""
    try:
        url = database_url_for(settings.data_dir, settings.database_url)
    except ConfigError as exc:
        raise CommandError(f"invalid configuration: {exc.detail}", EXIT_CONFIG) from exc
    parsed = make_url(url)
    if parsed.drivername.startswith("sqlite") and parsed.database:
        path = Path(parsed.database)
        if not create and not path.exists():
            raise CommandError(f"no database at {path}; check --data-dir or --database-url", EXIT_CONFIG)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CommandError(f"cannot create directory {path.parent}: {exc.strerror}", EXIT_CONFIG) from exc
    store = SqlStore(url)
    try:
        await store.open()
    except ConfigError as exc:
        raise CommandError(f"invalid configuration: {exc.detail}", EXIT_CONFIG) from exc
    except StoreUnavailableError as exc:
        raise CommandError(exc.detail, EXIT_STORE) from exc
    return store
