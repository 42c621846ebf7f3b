"""Snapshot files: the whole catalog and its clients in one versioned, checksummed file.

A snapshot is a JSON document::

    {"format": "logpose-snapshot", "version": 1, "sha256": "<hex>", "payload": {...}}

``sha256`` is the SHA-256 of the payload in canonical form: JSON with sorted
keys, no whitespace, UTF-8. The payload contains the schema revision and change
index of the database it came from, the services, the instances (check
settings, health and maintenance included) and the clients, which carry only
secret hashes. The JSON shape is defined by ``version``, not by the database
columns, so a file stays readable after later schema migrations.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic.script import ScriptDirectory

from logpose.errors import LogPoseError
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
    parse_service_code,
)
from logpose.registry import CatalogSnapshot
from logpose.store.sql import MIGRATIONS_PATH

FORMAT_NAME = "logpose-snapshot"
FORMAT_VERSION = 1
CHECK_FIELDS = ("type", "ttl", "interval", "timeout", "rise", "fall", "deregister_after",
                "path", "scheme", "tls_verify", "expected_status")


class SnapshotError(LogPoseError):
    """A snapshot file that cannot be read or used; nothing was changed."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    catalog: CatalogSnapshot
    clients: list[ClientRecord]
    schema_revision: str | None
    saved_at: float  # Unix time, seconds


def known_revisions() -> list[str]:
    """Return the schema revisions this release can migrate, oldest first."""
    script = ScriptDirectory(str(MIGRATIONS_PATH))
    return [revision.revision for revision in reversed(list(script.walk_revisions()))]


def canonical_bytes(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def encode(snapshot: Snapshot) -> bytes:
    """Return the file content of ``snapshot``."""
    catalog = snapshot.catalog
    payload = {
        "schema_revision": snapshot.schema_revision,
        "saved_at": snapshot.saved_at,
        "change_index": catalog.index,
        "services": [_service_document(service) for service in catalog.services],
        "instances": [_instance_document(instance) for instance in catalog.instances],
        "clients": [_client_document(client) for client in snapshot.clients],
    }
    document = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "sha256": hashlib.sha256(canonical_bytes(payload)).hexdigest(),
        "payload": payload,
    }
    return json.dumps(document, indent=1, sort_keys=True, ensure_ascii=False, allow_nan=False).encode() + b"\n"


def decode(content: bytes, source: str = "the snapshot") -> Snapshot:
    """Check and parse a snapshot file's content; raise SnapshotError naming what is wrong.

    The format marker and version are checked first, then the checksum, then
    the schema revision, then every record.
    """
    try:
        document = json.loads(content)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SnapshotError(f"{source} is not valid JSON ({exc}); the file is truncated or not a LogPose snapshot") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise SnapshotError(f"{source} is not a LogPose snapshot: it lacks \"format\": \"{FORMAT_NAME}\"")
    version = document.get("version")
    if version != FORMAT_VERSION:
        raise SnapshotError(
            f"{source} has snapshot format version {version!r}; this LogPose reads version {FORMAT_VERSION} only"
        )
    payload = document.get("payload")
    expected = document.get("sha256")
    if not isinstance(payload, dict) or not isinstance(expected, str):
        raise SnapshotError(f"{source} lacks its payload or its sha256 checksum")
    try:
        actual = hashlib.sha256(canonical_bytes(payload)).hexdigest()
    except ValueError as exc:  # NaN or infinity, which no saved file contains
        raise SnapshotError(f"{source} contains a number that is not valid JSON: {exc}") from None
    if actual != expected.lower():
        raise SnapshotError(f"{source} fails its SHA-256 checksum: the file is corrupted or was edited")

    revision = payload.get("schema_revision")
    known = known_revisions()
    if revision is not None and revision not in known:
        raise SnapshotError(
            f"{source} was saved from database schema revision {revision!r}, which this LogPose does not know "
            f"(it knows {', '.join(known)}); restore it with the release that saved it, or a newer one"
        )
    try:
        services = [_service_from(item) for item in _list(payload, "services")]
        instances = [_instance_from(item) for item in _list(payload, "instances")]
        clients = [_client_from(item) for item in _list(payload, "clients")]
        index = _whole(payload.get("change_index"), "change_index")
        saved_at = float(payload.get("saved_at", 0.0))
    except (KeyError, TypeError, ValueError, LogPoseError) as exc:
        detail = exc.detail if isinstance(exc, LogPoseError) else f"{type(exc).__name__}: {exc}"
        raise SnapshotError(f"{source} has an invalid record: {detail}") from None
    _check_references(services, instances, clients, source)
    return Snapshot(CatalogSnapshot(services, instances, index), clients, revision, saved_at)


def write_file(path: Path, content: bytes) -> None:
    """Write ``content`` to ``path`` atomically, with mode 0600: it contains secret hashes.

    The content goes to a temporary file in the same directory, is flushed to
    disk, then renamed over ``path``, so a crash leaves the old file or the new
    one, never half of one. Raise OSError.
    """
    directory = path.parent if str(path.parent) else Path(".")
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def new_snapshot(catalog: CatalogSnapshot, clients: list[ClientRecord], schema_revision: str | None) -> Snapshot:
    return Snapshot(catalog, clients, schema_revision, time.time())


# ----- records -------------------------------------------------------------


def _service_document(service: Service) -> dict[str, Any]:
    return {
        "code": service.code,
        "name": service.name,
        "created_index": service.created_index,
        "modify_index": service.modify_index,
    }


def _instance_document(instance: Instance) -> dict[str, Any]:
    return {
        "id": instance.id,
        "service": instance.service,
        "host": instance.address.host,
        "port": instance.address.port,
        "address_kind": instance.address.kind.value,
        "protocol": instance.protocol.value,
        "health": instance.health.value,
        "output": instance.output,
        "check": {name: _plain(getattr(instance.check, name)) for name in CHECK_FIELDS},
        "tags": list(instance.tags),
        "metadata": dict(instance.metadata),
        "weight": instance.weight,
        "created_index": instance.created_index,
        "modify_index": instance.modify_index,
        "registered_at": instance.registered_at,
        "updated_at": instance.updated_at,
        "maintenance_reason": instance.maintenance_reason,
        "maintenance_since": instance.maintenance_since,
        "last_report_at": instance.last_report_at,
    }


def _client_document(client: ClientRecord) -> dict[str, Any]:
    return {
        "common_name": client.common_name,
        "role": client.role,
        "services": list(client.services),
        "secret_hash": client.secret_hash,
        "created_at": client.created_at,
    }


def _service_from(item: Any) -> Service:
    code = parse_service_code(item["code"])
    return Service(code, str(item["name"]), _whole(item["created_index"], "created_index"),
                   _whole(item["modify_index"], "modify_index"))


def _instance_from(item: Any) -> Instance:
    check = dict(item["check"])
    check_type = CheckType(check.pop("type"))
    unknown = set(check) - set(CHECK_FIELDS)
    if unknown:
        raise ValueError(f"instance {item['id']}: unknown check field {sorted(unknown)[0]!r}")
    return Instance(
        id=str(item["id"]),
        service=parse_service_code(item["service"]),
        address=Address(str(item["host"]), _whole(item["port"], "port"), AddressKind(item["address_kind"])),
        protocol=Protocol(item["protocol"]),
        health=Health(item["health"]),
        check=Check(check_type, **check),
        tags=tuple(str(tag) for tag in item["tags"]),
        metadata={str(key): str(value) for key, value in dict(item["metadata"]).items()},
        weight=_whole(item["weight"], "weight"),
        output=str(item["output"]),
        created_index=_whole(item["created_index"], "created_index"),
        modify_index=_whole(item["modify_index"], "modify_index"),
        registered_at=float(item["registered_at"]),
        updated_at=float(item["updated_at"]),
        maintenance_reason=item["maintenance_reason"],
        maintenance_since=item["maintenance_since"],
        last_report_at=item["last_report_at"],
    )


def _client_from(item: Any) -> ClientRecord:
    return ClientRecord(
        common_name=str(item["common_name"]),
        role=str(item["role"]),
        services=tuple(str(code) for code in item["services"]),
        secret_hash=str(item["secret_hash"]),
        created_at=float(item["created_at"]),
    )


def _check_references(
    services: list[Service], instances: list[Instance], clients: list[ClientRecord], source: str
) -> None:
    codes = [service.code for service in services]
    if len(set(codes)) != len(codes):
        raise SnapshotError(f"{source} lists a service twice")
    known = set(codes)
    seen: set[str] = set()
    for instance in instances:
        if instance.service not in known:
            raise SnapshotError(f"{source}: instance {instance.id} belongs to service {instance.service!r}, "
                                "which the snapshot does not list")
        if instance.id in seen:
            raise SnapshotError(f"{source} lists instance {instance.id} twice")
        seen.add(instance.id)
    names = [client.common_name for client in clients]
    if len(set(names)) != len(names):
        raise SnapshotError(f"{source} lists a client twice")


def _list(payload: Mapping[str, Any], key: str) -> list[Any]:
    value = payload.get(key)
    if not isinstance(value, list):
        raise ValueError(f"{key} must be a list")
    return value


def _whole(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return value


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, CheckType) else value
