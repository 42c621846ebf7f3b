"""Schema upgrades: a database made by the oldest schema is served by the newest server.

The old database is built the way the oldest release built it: Alembic runs
only revision 0001 from the store's migrations folder, and rows are written in
that revision's shape. Then the real server starts on it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig

from conftest import closed_port, wait_until
from logpose.auth import hash_secret
from logpose.server.snapshot import known_revisions
from logpose.store.sql import DATABASE_FILE_NAME, MIGRATIONS_PATH

OLDEST_REVISION = "0001"
SERVER = [sys.executable, "-m", "logpose.server.main"]
ADMIN_SECRET = "a-test-secret-for-the-old-admin"  # the fixture reads it back from admin.secret


def upgrade_to(database: Path, revision: str) -> None:
    engine = sa.create_engine(f"sqlite:///{database}")
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_PATH))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
    engine.dispose()


def revision_of(database: Path) -> str | None:
    engine = sa.create_engine(f"sqlite:///{database}")
    with engine.connect() as connection:
        revision = connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
    engine.dispose()
    return revision


def write_oldest_catalog(data_dir: Path, address: tuple[str, int]) -> str:
    """Create a revision-0001 database with one service, one Healthy instance and the admin; return the instance id."""
    data_dir.mkdir()
    database = data_dir / DATABASE_FILE_NAME
    upgrade_to(database, OLDEST_REVISION)
    instance_id = str(uuid.uuid4())
    now = time.time()
    engine = sa.create_engine(f"sqlite:///{database}")
    with engine.begin() as connection:
        connection.execute(sa.text("INSERT INTO catalog_state (id, change_index) VALUES (1, 2)"))
        connection.execute(sa.text(
            "INSERT INTO services (code, name, created_index, modify_index) VALUES ('legacy', 'Legacy app', 1, 1)"
        ))
        connection.execute(
            sa.text(
                "INSERT INTO instances (id, service_code, host, host_key, port, address_kind, protocol, check_type,"
                " check_ttl, tags, metadata, weight, health, output, created_index, modify_index, registered_at,"
                " updated_at) VALUES (:id, 'legacy', :host, :host, :port, 'ipv4', 'Http', 'tcp', NULL, :tags,"
                " :metadata, 2, 'Healthy', 'TCP connect succeeded', 2, 2, :now, :now)"
            ),
            {"id": instance_id, "host": address[0], "port": address[1], "tags": json.dumps(["old"]),
             "metadata": json.dumps({"release": "1"}), "now": now},
        )
        connection.execute(
            sa.text("INSERT INTO clients (common_name, role, services, secret_hash, created_at)"
                    " VALUES ('admin', 'admin', '[\"*\"]', :hash, :now)"),
            {"hash": hash_secret(ADMIN_SECRET), "now": now},
        )
    engine.dispose()
    (data_dir / "admin.secret").write_text(ADMIN_SECRET + "\n")
    return instance_id


def migrate(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SERVER, "migrate", *arguments], capture_output=True, text=True, timeout=60)


def test_server_upgrades_oldest_schema(server_factory, tmp_path, tcp_listener):
    data_dir = tmp_path / "old"
    instance_id = write_oldest_catalog(data_dir, ("127.0.0.1", tcp_listener.port))
    assert revision_of(data_dir / DATABASE_FILE_NAME) == OLDEST_REVISION

    server = server_factory("old")
    with server.client() as api:
        listed = api.get("/api/instances").json()
        discovered = wait_until(lambda: api.get("/api/discover/legacy").json(), timeout=5)
    response = dns.query.udp(dns.message.make_query("legacy.logpose.internal", "A"), "127.0.0.1",
                             port=server.dns_port, timeout=2)
    assert server.stop() == 0

    assert [item["id"] for item in listed] == [instance_id]
    assert listed[0]["tags"] == ["old"]
    assert listed[0]["metadata"] == {"release": "1"}
    assert listed[0]["maintenance"]["enabled"] is False
    assert [item["id"] for item in discovered] == [instance_id]
    assert response.rcode() == dns.rcode.NOERROR
    assert [record.address for answer in response.answer for record in answer] == ["127.0.0.1"]
    assert revision_of(data_dir / DATABASE_FILE_NAME) == known_revisions()[-1]


def test_migrate_command_applies_and_prints_revision(tmp_path):
    data_dir = tmp_path / "old"
    data_dir.mkdir()
    upgrade_to(data_dir / DATABASE_FILE_NAME, OLDEST_REVISION)
    newest = known_revisions()[-1]

    result = migrate("--data-dir", str(data_dir))
    again = migrate("--data-dir", str(data_dir))

    assert result.returncode == 0, result.stderr
    assert f"is at schema revision {newest} (newest known: {newest})" in result.stdout
    assert revision_of(data_dir / DATABASE_FILE_NAME) == newest
    assert again.returncode == 0, again.stderr
    assert not (data_dir / "admin.secret").exists()  # migrate touches only the database


def test_migrate_unreachable_database_exits_with_store_code(tmp_path):
    url = f"postgresql://logpose@127.0.0.1:{closed_port()}/logpose"

    result = subprocess.run(
        [*SERVER, "migrate", "--database-url", url], capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "LOGPOSE_JWT_KEY": "0123456789abcdef" * 4},
    )

    assert result.returncode == 3
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "cannot open database" in result.stderr


def test_known_revisions_start_with_oldest():
    revisions = known_revisions()

    assert revisions[0] == OLDEST_REVISION
    assert revisions == sorted(revisions)
