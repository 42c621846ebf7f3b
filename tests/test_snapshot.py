"""``logpose-server snapshot save|restore``: a real round trip, and files that must change nothing."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from conftest import ServerProcess
from logpose.model import Address, AddressKind, Check, CheckType, ClientRecord, Health, Instance, Protocol, Service
from logpose.registry import CatalogSnapshot
from logpose.server.snapshot import FORMAT_VERSION, SnapshotError, canonical_bytes, decode, encode, new_snapshot
from logpose.store import SqlStore, database_url_for
from test_dns_clients import register_healthy

ZONE = "logpose.internal"
SERVER = [sys.executable, "-m", "logpose.server.main"]


def snapshot_command(action: str, file: Path, data_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SERVER, "snapshot", action, str(file), "--data-dir", str(data_dir)],
        capture_output=True, text=True, timeout=60,
    )


def dump(data_dir: Path) -> tuple[CatalogSnapshot, list[ClientRecord]]:
    async def read() -> tuple[CatalogSnapshot, list[ClientRecord]]:
        store = SqlStore(database_url_for(data_dir, None))
        await store.open()
        try:
            catalog, clients, _revision = await store.dump()
        finally:
            await store.close()
        return catalog, clients

    return asyncio.run(read())


def srv_targets(server: ServerProcess, code: str) -> set[str]:
    response = dns.query.udp(dns.message.make_query(f"{code}.{ZONE}", "SRV"), "127.0.0.1", port=server.dns_port,
                             timeout=2)
    assert response.rcode() == dns.rcode.NOERROR, response
    return {record.target.to_text() for answer in response.answer for record in answer
            if answer.rdtype == dns.rdatatype.SRV}


def test_round_trip_through_real_servers(server_factory, tmp_path, tcp_listener):
    """Save from a running server, restore into a new data directory, and serve the same catalog."""
    source = server_factory("source")
    with source.client() as api:
        web = register_healthy(source, api, "web", tcp_listener)
        checked = api.post("/api/services/web/instances", json={
            "address": "127.0.0.1:9", "protocol": "Tcp",
            "check": {"type": "ttl", "ttl": 30, "deregister_after": 600}, "tags": ["blue"], "weight": 5,
        }).json()
        drained = api.post("/api/services/api/instances", json={
            "address": tcp_listener.address, "protocol": "Grpc", "check": {"type": "none"},
        }).json()
        assert api.post(f"/api/instances/{drained['id']}/maintenance",
                        json={"enabled": True, "reason": "disk swap"}).status_code == 200
        reader = api.post("/api/clients", json={"common_name": "dashboards", "role": "reader"})
        assert reader.status_code == 201, reader.text
        before = {item["id"]: item for item in api.get("/api/instances").json()}
    file = tmp_path / "backup" / "catalog.json"
    file.parent.mkdir()

    saved = snapshot_command("save", file, source.data_dir)  # while the source server runs
    assert source.stop() == 0
    restored = snapshot_command("restore", file, tmp_path / "target")
    # The restored admin keeps its secret, which the operator kept: here, the source's file.
    shutil.copy(source.data_dir / "admin.secret", tmp_path / "target" / "admin.secret")
    target = server_factory("target")

    assert saved.returncode == 0, saved.stderr
    assert "saved 2 service(s), 3 instance(s) and 2 client(s)" in saved.stdout
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert "secret_hash" in file.read_text()
    assert source.admin_secret() not in file.read_text()
    assert restored.returncode == 0, restored.stderr
    assert "restored 2 service(s), 3 instance(s) and 2 client(s)" in restored.stdout
    with target.client() as api:
        after = {item["id"]: item for item in api.get("/api/instances").json()}
        discovered = {item["id"] for item in api.get("/api/discover/web").json()}
        clients = {client["common_name"] for client in api.get("/api/clients").json()}
    assert set(after) == set(before)
    assert after[checked["id"]]["check"] == before[checked["id"]]["check"]
    assert after[checked["id"]]["tags"] == ["blue"]
    assert after[checked["id"]]["weight"] == 5
    assert after[drained["id"]]["maintenance"] == before[drained["id"]]["maintenance"]
    assert discovered == {web["id"]}
    assert srv_targets(target, "web") == {f"{web['id']}.web.{ZONE}."}
    assert clients == {"admin", "dashboards"}


def test_restore_replaces_existing_catalog_and_bumps_index(server_factory, tmp_path, tcp_listener):
    first = server_factory("first")
    with first.client() as api:
        register_healthy(first, api, "kept", tcp_listener)
    file = tmp_path / "kept.json"
    assert snapshot_command("save", file, first.data_dir).returncode == 0
    with first.client() as api:
        for number in range(3):
            assert api.post("/api/services", json={"code": f"later{number}"}).status_code == 201
    assert first.stop() == 0
    index_before = dump(first.data_dir)[0].index
    snapshot_index = json.loads(file.read_text())["payload"]["change_index"]

    restored = snapshot_command("restore", file, first.data_dir)
    catalog, _clients = dump(first.data_dir)

    assert restored.returncode == 0, restored.stderr
    assert [service.code for service in catalog.services] == ["kept"]
    assert catalog.index == index_before + 1
    assert catalog.index > snapshot_index
    assert "admin.secret was written for the catalog before the restore" in restored.stderr


def saved_file(server_factory, tmp_path, tcp_listener) -> tuple[Path, Path]:
    """Return a snapshot file and the stopped server's data directory with a catalog in it."""
    server = server_factory("saved")
    with server.client() as api:
        register_healthy(server, api, "web", tcp_listener)
    file = tmp_path / "snapshot.json"
    assert snapshot_command("save", file, server.data_dir).returncode == 0
    assert server.stop() == 0
    return file, server.data_dir


def rewrite_payload(file: Path, change, keep_checksum: bool = False) -> None:
    document = json.loads(file.read_text())
    change(document)
    if not keep_checksum:
        document["sha256"] = hashlib.sha256(canonical_bytes(document["payload"])).hexdigest()
    file.write_text(json.dumps(document))


def test_bad_files_change_nothing(server_factory, tmp_path, tcp_listener):
    file, data_dir = saved_file(server_factory, tmp_path, tcp_listener)
    content = file.read_bytes()
    before = dump(data_dir)
    cases = []

    truncated = tmp_path / "truncated.json"
    truncated.write_bytes(content[: len(content) // 2])
    cases.append((truncated, "is not valid JSON"))

    corrupted = tmp_path / "corrupted.json"
    corrupted.write_bytes(content.replace(b'"web"', b'"wab"', 1))
    cases.append((corrupted, "fails its SHA-256 checksum"))

    edited = tmp_path / "edited.json"
    shutil.copy(file, edited)
    rewrite_payload(edited, lambda document: document["payload"]["services"].clear(), keep_checksum=True)
    cases.append((edited, "fails its SHA-256 checksum"))

    newer = tmp_path / "newer.json"
    shutil.copy(file, newer)
    rewrite_payload(newer, lambda document: document.update(version=FORMAT_VERSION + 1))
    cases.append((newer, f"format version {FORMAT_VERSION + 1}; this LogPose reads version {FORMAT_VERSION} only"))

    future_schema = tmp_path / "future-schema.json"
    shutil.copy(file, future_schema)
    rewrite_payload(future_schema, lambda document: document["payload"].update(schema_revision="9999"))
    cases.append((future_schema, "schema revision '9999', which this LogPose does not know"))

    orphan = tmp_path / "orphan.json"
    shutil.copy(file, orphan)
    rewrite_payload(orphan, lambda document: document["payload"]["services"].clear())
    cases.append((orphan, "belongs to service 'web', which the snapshot does not list"))

    not_snapshot = tmp_path / "other.json"
    not_snapshot.write_text('{"services": []}')
    cases.append((not_snapshot, "is not a LogPose snapshot"))

    for bad_file, fragment in cases:
        result = snapshot_command("restore", bad_file, data_dir)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (bad_file.name, result.stderr)
        assert len(lines) == 1, (bad_file.name, result.stderr)
        assert fragment in lines[0], (bad_file.name, lines[0])
        assert lines[0].endswith("nothing was changed")
        assert dump(data_dir) == before, bad_file.name


def test_bad_file_leaves_missing_data_dir_alone(tmp_path):
    file = tmp_path / "empty.json"
    file.write_text("")

    result = snapshot_command("restore", file, tmp_path / "never")

    assert result.returncode == 2
    assert not (tmp_path / "never").exists()


def test_save_without_database_is_one_line(tmp_path):
    result = snapshot_command("save", tmp_path / "out.json", tmp_path / "missing")

    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"logpose-server: no database at {(tmp_path / 'missing' / 'logpose.db').resolve()}; "
        "check --data-dir or --database-url"
    ]
    assert not (tmp_path / "out.json").exists()


def test_encode_decode_keeps_every_field():
    service = Service("web", "Web front", 3, 7)
    instance = Instance(
        id="6f1c1b9e-4a4f-4d55-9d33-5d0a3c2b1a10", service="web",
        address=Address("::1", 8080, AddressKind.IPV6), protocol=Protocol.HTTPS, health=Health.HEALTHY,
        check=Check(CheckType.HTTP, interval=5.0, timeout=1.5, rise=2, fall=3, path="/ready", scheme="https",
                    tls_verify=False, expected_status=204),
        tags=("blue", "eu"), metadata={"zone": "a"}, weight=3, output="HTTP 204", created_index=4, modify_index=9,
        registered_at=1.5, updated_at=2.25, maintenance_reason="upgrade", maintenance_since=3.0, last_report_at=None,
    )
    client = ClientRecord("deploy", "registrar", ("web",), "scrypt$placeholder-hash", 10.0)

    decoded = decode(encode(new_snapshot(CatalogSnapshot([service], [instance], 9), [client], "0003")))

    assert decoded.catalog == CatalogSnapshot([service], [instance], 9)
    assert decoded.clients == [client]
    assert decoded.schema_revision == "0003"


@pytest.mark.parametrize("content", [b"", b"\xff\xfe", b"[]", b'{"format": "logpose-snapshot", "version": 1}'])
def test_decode_rejects_non_snapshots(content):
    with pytest.raises(SnapshotError):
        decode(content)
