"""The OpenAPI document: it matches the registered routes, and schemathesis finds no 5xx."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from logpose.api import build_app
from logpose.api.openapi import DOCUMENT, SERVICE_CODE_PATTERN
from logpose.auth import Authenticator
from logpose.registry import Registry

HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")
# Registrations that schemathesis sends point at loopback only, so the server's
# probes never leave this machine. Nothing listens on port 9, so probes fail fast.
LOOPBACK_ADDRESSES = ["127.0.0.1:9", "[::1]:9"]
FUZZER = "schemathesis"  # the admin client that the schemathesis run uses
FUZZED_SERVICE = "fuzzed"  # the service of the instances made for the run
SCHEMATHESIS_TIMEOUT = 120  # seconds before one run is stopped; each normally takes under 20 s
MAX_EXAMPLES = 8  # test cases per operation in the fuzzing phase


def registered_routes() -> set[tuple[str, str]]:
    app = build_app(Registry(None), Authenticator(None, b"k" * 64, 3600))
    return {(route.method, route.resource.canonical) for route in app.router.routes() if route.method != "HEAD"}


def documented_operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }


def test_every_route_documented():
    missing = registered_routes() - documented_operations(DOCUMENT)
    assert missing == set(), "add these routes to logpose/api/openapi.py"


def test_every_operation_is_route():
    extra = documented_operations(DOCUMENT) - registered_routes()
    assert extra == set(), "these operations have no route"


def test_references_resolve():
    components = DOCUMENT["components"]
    for reference in _references(DOCUMENT):
        _prefix, kind, name = reference.rsplit("/", 2)
        assert name in components[kind], reference


def test_operations_have_problem_responses():
    for path, item in DOCUMENT["paths"].items():
        for method, operation in item.items():
            if method not in HTTP_METHODS:
                continue
            assert "default" in operation["responses"], f"{method} {path}"
            public = operation.get("security") == []
            assert public or "401" in operation["responses"], f"{method} {path}"


def test_document_served_without_token(server):
    answer = httpx.get(server.url + "/api/openapi.json", timeout=10)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.json() == DOCUMENT


def test_schemathesis_finds_no_server_error(server, tmp_path):
    """Run schemathesis against a real server as an admin: no operation may return 5xx."""
    command = shutil.which("st", path=str(Path(sys.executable).parent))
    if command is None:
        if os.environ.get("CI") == "true":
            pytest.fail("schemathesis is not installed; pip install -e '.[test]'")
        pytest.skip("schemathesis is not installed; pip install -e '.[test]'")
    with server.client() as api:
        # An admin of its own, which the run cannot rotate or remove (see fuzzing_copy).
        created = api.post("/api/clients", json={"common_name": FUZZER, "role": "admin"})
        assert created.status_code == 201, created.text
        instance_ids = [register_loopback(api, port) for port in (9, 10, 11)]
    token = httpx.post(server.url + "/api/auth/token", json={"common_name": FUZZER, "secret": created.json()["secret"]})
    headers = {"Authorization": f"Bearer {token.json()['access_token']}"}
    schema_file = tmp_path / "openapi.json"
    schema_file.write_text(json.dumps(fuzzing_copy(DOCUMENT, instance_ids)))

    # Valid data first, checked against the response schemas too.
    report = run_schemathesis(command, schema_file, server.url, headers, "--mode", "positive")
    assert "Authentication failed" not in report, report
    # Then invalid data, without the operations where it could name a host that is
    # not loopback (registration) or the run's own client (rotate, remove).
    run_schemathesis(
        command, schema_file, server.url, headers, "--mode", "negative",
        "--exclude-operation-id", "registerInstance",
        "--exclude-operation-id", "rotateSecret",
        "--exclude-operation-id", "deleteClient",
    )
    assert "Internal Server Error" not in server.log()

    # The restriction held: every instance the run registered is on loopback. The
    # run may have rotated the admin's secret and blocked new tokens from this
    # address after its failed token requests, so this request uses the run's token.
    instances = httpx.get(server.url + "/api/instances", headers=headers, timeout=10)
    assert instances.status_code == 200, instances.text
    hosts = {instance["host"] for instance in instances.json()}
    assert hosts <= {"127.0.0.1", "::1"}, hosts


def run_schemathesis(command: str, schema_file: Path, url: str, headers: dict[str, str], *options: str) -> str:
    """Run ``st run`` with the checks and bounds of this module; return its report, failing on any failure."""
    run = subprocess.run(
        [
            command, "run", str(schema_file),
            "--url", url,
            "--header", f"Authorization: {headers['Authorization']}",
            "--checks", "not_a_server_error,response_schema_conformance",
            "--phases", "examples,coverage,fuzzing",
            "--max-examples", str(MAX_EXAMPLES),
            "--seed", "1",
            # Two workers send concurrent writes, which once found SQLite's
            # "database is locked" under a deferred BEGIN.
            "--workers", "2",
            "--request-timeout", "10",
            "--no-color",
            *options,
        ],
        capture_output=True, text=True, timeout=SCHEMATHESIS_TIMEOUT, cwd=schema_file.parent,
    )
    report = run.stdout[-6000:] + run.stderr[-2000:]
    assert run.returncode == 0, report
    return report


def register_loopback(api: httpx.Client, port: int) -> str:
    body = {"address": f"127.0.0.1:{port}", "protocol": "Tcp", "check": {"type": "none"}}
    answer = api.post(f"/api/services/{FUZZED_SERVICE}/instances", json=body)
    assert answer.status_code == 201, answer.text
    return answer.json()["id"]


def fuzzing_copy(document: dict[str, Any], instance_ids: list[str]) -> dict[str, Any]:
    """Return a copy of the document narrowed for a safe and useful schemathesis run.

    Registrations may name loopback addresses only, so the server's probes never
    leave this machine. Client paths never name the run's own admin, so it cannot
    revoke its token. Instance paths name the given instances or an unknown id,
    and only the last instance may be deregistered, and their service never
    deleted, so the others stay for the other operations. The copy has no ``examples`` either, since schemathesis
    sends those as they are.
    """
    narrowed = _without_examples(copy.deepcopy(document))
    schemas = narrowed["components"]["schemas"]
    schemas["Registration"]["properties"]["address"] = {"type": "string", "enum": LOOPBACK_ADDRESSES}
    for item in narrowed["paths"].values():
        for parameter in item.get("parameters", []):
            if parameter["name"] == "common_name":
                parameter["schema"] = {**parameter["schema"], "not": {"const": FUZZER}}
            if parameter["name"] == "instance_id":
                parameter["schema"] = {"type": "string", "enum": [*instance_ids[:-1], str(uuid.uuid4())]}
    service = narrowed["paths"]["/api/services/{code}"]
    service["delete"]["parameters"].append({
        "name": "code", "in": "path", "required": True,
        "schema": {"type": "string", "pattern": SERVICE_CODE_PATTERN, "not": {"const": FUZZED_SERVICE}},
    })
    deregister = narrowed["paths"]["/api/instances/{instance_id}"]["delete"]
    deregister["parameters"] = [{
        "name": "instance_id", "in": "path", "required": True,
        "schema": {"type": "string", "enum": [instance_ids[-1], str(uuid.uuid4())]},
    }]
    return narrowed


def _without_examples(node: Any) -> Any:
    if isinstance(node, dict):
        return {key: _without_examples(value) for key, value in node.items() if key not in ("examples", "example")}
    if isinstance(node, list):
        return [_without_examples(item) for item in node]
    return node


def _references(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [reference for value in node.values() for reference in _references(value)]
    if isinstance(node, list):
        return [reference for item in node for reference in _references(item)]
    return []
