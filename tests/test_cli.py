"""Tests of ``logpose-command`` run as a subprocess against a contract server.

The contract server is a test peer: a small aiohttp application on 127.0.0.1,
port 0. It implements just enough of the LogPose HTTP API (the same paths, JSON
shapes, bearer tokens and problem+json errors) to test the command line over
real sockets. It records every request, so a test can check that a
bad flag failed before anything was sent. End-to-end tests against the real
server live elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from logpose.errors import ValidationError
from logpose.model import (
    parse_health,
    parse_health_report,
    parse_instance_spec,
    parse_output,
    parse_service_code,
    parse_service_name,
    registration_key,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
CONSOLE_SCRIPT = Path(sys.executable).with_name("logpose-command")
CLI_TIMEOUT_SECONDS = 30

TOKEN = "contract-token-6f1d2c"
COMMON_NAME = "operator"
SECRET = "contract-secret-91ab"
TIMESTAMP = "2026-12-04T20:00:00Z"
# Older aiohttp releases have no web.RequestKey and take a plain string key.
REQUEST_BODY: Any = web.RequestKey("body", object) if hasattr(web, "RequestKey") else "body"


# Contract server


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    authorization: str | None
    body: Any


@dataclass
class QueuedResponse:
    """A response the contract server sends to the next request instead of handling it."""

    status: int
    body: str
    content_type: str = "application/problem+json"
    delay: float = 0.0


@dataclass
class ContractState:
    services: dict[str, dict[str, Any]] = field(default_factory=dict)
    instances: dict[str, dict[str, Any]] = field(default_factory=dict)
    index: int = 0


def problem(status: int, title: str, detail: str, errors: list[dict[str, str]] | None = None) -> web.Response:
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    if errors is not None:
        body["errors"] = errors
    return web.json_response(body, status=status, content_type="application/problem+json")


class ContractServer:
    """Test peer that implements the LogPose HTTP API contract in memory, on a background thread."""

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self.responses: list[Any] = []
        self.queued: list[QueuedResponse] = []
        self.state = ContractState()
        self.lock = threading.Lock()
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="contract-server", daemon=True)
        self._runner: web.AppRunner | None = None

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.responses.clear()
            self.queued.clear()
            self.state = ContractState()

    def queue(self, response: QueuedResponse) -> None:
        with self.lock:
            self.queued.append(response)

    def api_requests(self) -> list[RecordedRequest]:
        with self.lock:
            return list(self.requests)

    def last_response(self) -> Any:
        with self.lock:
            return self.responses[-1]

    # Seeding, called from the test thread.

    def add_service(self, code: str, name: str | None = None) -> dict[str, Any]:
        with self.lock:
            return self._create_service(code, name)

    def add_instance(self, service: str, address: str, protocol: str = "Http", health: str = "Healthy", **extra: Any) -> dict[str, Any]:
        with self.lock:
            instance, _ = self._register(service, {"address": address, "protocol": protocol, **extra})
            instance["health"] = health
            return dict(instance)

    # Lifecycle on the server's own loop.

    async def _start(self) -> None:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/healthz", self._healthz)
        app.router.add_post("/api/auth/token", self._issue_token)
        app.router.add_get("/api/services", self._list_services)
        app.router.add_post("/api/services", self._post_service)
        app.router.add_get("/api/services/{code}", self._get_service)
        app.router.add_delete("/api/services/{code}", self._delete_service)
        app.router.add_post("/api/services/{code}/instances", self._post_instance)
        app.router.add_get("/api/instances", self._list_instances)
        app.router.add_get("/api/instances/{id}", self._get_instance)
        app.router.add_delete("/api/instances/{id}", self._delete_instance)
        app.router.add_post("/api/instances/{id}/health", self._post_health)
        app.router.add_get("/api/discover/{code}", self._discover)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body = None
        if request.can_read_body:
            try:
                body = await request.json()
            except ValueError:
                return problem(400, "Bad Request", "request body is not valid JSON")
        request[REQUEST_BODY] = body
        with self.lock:
            self.requests.append(
                RecordedRequest(request.method, request.path, dict(request.query), request.headers.get("Authorization"), body)
            )
            queued = self.queued.pop(0) if self.queued else None
        if queued is not None:
            await asyncio.sleep(queued.delay)
            return web.Response(status=queued.status, text=queued.body, content_type=queued.content_type)

        public = request.path in ("/healthz", "/api/auth/token")
        if not public and request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return problem(401, "Unauthorized", "invalid or expired bearer token")
        try:
            # Handlers never await, so holding a thread lock across this call cannot block the loop.
            with self.lock:
                response = await handler(request)
        except ValidationError as exc:
            return problem(422, "Unprocessable Content", exc.detail, [{"field": exc.field, "message": exc.reason}])
        except web.HTTPNotFound:
            return problem(404, "Not Found", f"no route for {request.method} {request.path}")
        if isinstance(response, web.Response) and response.content_type == "application/json" and response.body:
            with self.lock:
                self.responses.append(json.loads(response.body))
        return response

    # Helpers and handlers run with self.lock held by the middleware. Handlers
    # read the body that the middleware parsed into request[REQUEST_BODY].

    def _bump(self) -> int:
        self.state.index += 1
        return self.state.index

    def _listing(self, data: Any, status: int = 200) -> web.Response:
        return web.json_response(data, status=status, headers={"X-LogPose-Index": str(self.state.index)})

    def _service_json(self, service: dict[str, Any]) -> dict[str, Any]:
        members = [i for i in self.state.instances.values() if i["service"] == service["code"]]
        return {
            "code": service["code"],
            "name": service["name"],
            "instance_count": len(members),
            "healthy_count": sum(1 for i in members if i["health"] == "Healthy"),
            "created_index": service["created_index"],
            "modify_index": service["modify_index"],
        }

    def _create_service(self, code: str, name: str | None) -> dict[str, Any]:
        index = self._bump()
        self.state.services[code] = {"code": code, "name": name or code, "created_index": index, "modify_index": index}
        return self._service_json(self.state.services[code])

    def _register(self, code: str, body: Any) -> tuple[dict[str, Any], bool]:
        spec = parse_instance_spec(body)
        key = registration_key(code, spec.address, spec.protocol)
        existing = next(
            (i for i in self.state.instances.values() if registration_key(code, i["_address"], i["_protocol"]) == key),
            None,
        )
        instance = existing or {
            "id": str(uuid.uuid4()),
            "service": code,
            "health": "Unknown",
            "output": "",
            "registered_at": TIMESTAMP,
        }
        instance.update(
            service_name=self.state.services[code]["name"],
            address=str(spec.address),
            host=spec.address.host,
            port=spec.address.port,
            protocol=spec.protocol.value,
            tags=list(spec.tags),
            metadata=dict(spec.metadata),
            weight=spec.weight,
            check={"type": spec.check.type.value, "ttl": spec.check.ttl},
            updated_at=TIMESTAMP,
            modify_index=self._bump(),
            _address=spec.address,
            _protocol=spec.protocol,
        )
        self.state.instances[instance["id"]] = instance
        return instance, existing is None

    @staticmethod
    def _instance_json(instance: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in instance.items() if not key.startswith("_")}

    # Handlers

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _issue_token(self, request: web.Request) -> web.Response:
        body = request[REQUEST_BODY]
        if body.get("common_name") != COMMON_NAME or body.get("secret") != SECRET:
            return problem(401, "Unauthorized", "invalid client credentials")
        return web.json_response({"access_token": TOKEN, "token_type": "Bearer", "expires_in": 3600})

    async def _list_services(self, request: web.Request) -> web.Response:
        return self._listing([self._service_json(s) for s in self.state.services.values()])

    async def _post_service(self, request: web.Request) -> web.Response:
        body = request[REQUEST_BODY]
        code = parse_service_code(body.get("code"))
        name = parse_service_name(body["name"]) if "name" in body else None
        if code in self.state.services:
            return problem(409, "Conflict", f"service {code!r} already exists")
        return web.json_response(self._create_service(code, name), status=201)

    async def _get_service(self, request: web.Request) -> web.Response:
        code = request.match_info["code"]
        if code not in self.state.services:
            return problem(404, "Not Found", f"service {code!r} not found")
        return web.json_response(self._service_json(self.state.services[code]))

    async def _delete_service(self, request: web.Request) -> web.Response:
        code = request.match_info["code"]
        if code not in self.state.services:
            return problem(404, "Not Found", f"service {code!r} not found")
        members = [i for i in self.state.instances.values() if i["service"] == code]
        if members and request.query.get("force") != "true":
            return problem(409, "Conflict", f"service {code!r} still has {len(members)} instances; remove them or use force=true")
        for instance in members:
            del self.state.instances[instance["id"]]
        del self.state.services[code]
        self._bump()
        return web.Response(status=204)

    async def _post_instance(self, request: web.Request) -> web.Response:
        code = request.match_info["code"]
        if code not in self.state.services:
            return problem(404, "Not Found", f"service {code!r} not found")
        instance, created = self._register(code, request[REQUEST_BODY])
        return web.json_response(self._instance_json(instance), status=201 if created else 200)

    async def _list_instances(self, request: web.Request) -> web.Response:
        instances = list(self.state.instances.values())
        if "service" in request.query:
            instances = [i for i in instances if i["service"] == request.query["service"]]
        if "health" in request.query:
            health = parse_health(request.query["health"]).value
            instances = [i for i in instances if i["health"] == health]
        return self._listing([self._instance_json(i) for i in instances])

    async def _get_instance(self, request: web.Request) -> web.Response:
        instance = self.state.instances.get(request.match_info["id"])
        if instance is None:
            return problem(404, "Not Found", f"instance {request.match_info['id']!r} not found")
        return web.json_response(self._instance_json(instance))

    async def _delete_instance(self, request: web.Request) -> web.Response:
        if self.state.instances.pop(request.match_info["id"], None) is None:
            return problem(404, "Not Found", f"instance {request.match_info['id']!r} not found")
        self._bump()
        return web.Response(status=204)

    async def _post_health(self, request: web.Request) -> web.Response:
        instance = self.state.instances.get(request.match_info["id"])
        if instance is None:
            return problem(404, "Not Found", f"instance {request.match_info['id']!r} not found")
        body = request[REQUEST_BODY]
        instance["health"] = parse_health_report(body.get("status")).value
        instance["output"] = parse_output(body.get("output"))
        instance["modify_index"] = self._bump()
        return web.json_response(self._instance_json(instance))

    async def _discover(self, request: web.Request) -> web.Response:
        code = request.match_info["code"]
        if code not in self.state.services:
            return problem(404, "Not Found", f"service {code!r} not found")
        healthy = [i for i in self.state.instances.values() if i["service"] == code and i["health"] == "Healthy"]
        return self._listing([self._instance_json(i) for i in healthy])


# Running the command line


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def run_cli(*args: str, env: dict[str, str] | None = None) -> CliResult:
    """Run logpose-command in a subprocess with a clean LOGPOSE_* and proxy environment."""
    if CONSOLE_SCRIPT.exists():
        command = [str(CONSOLE_SCRIPT)]
    else:
        command = [sys.executable, "-c", "from logpose.cli.app import main; main()"]
    base_env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("LOGPOSE_") and not key.lower().endswith("_proxy")
    }
    base_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    base_env.update(env or {})
    completed = subprocess.run(
        [*command, *args],
        env=base_env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_SECONDS,
        stdin=subprocess.DEVNULL,
    )
    result = CliResult(completed.returncode, completed.stdout, completed.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert "Traceback" not in result.stdout, result.stdout
    return result


def assert_one_error_line(result: CliResult, exit_code: int, fragment: str) -> None:
    assert result.returncode == exit_code, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert fragment in lines[0]
    assert "╭" not in result.stderr  # no rich panel


@pytest.fixture(scope="module")
def contract_server() -> Any:
    server = ContractServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def server(contract_server: ContractServer) -> ContractServer:
    contract_server.reset()
    return contract_server


@pytest.fixture
def cli(server: ContractServer) -> Any:
    """Run the command line against the contract server with a valid token."""

    def run(*args: str, output: str = "table", env: dict[str, str] | None = None) -> CliResult:
        return run_cli("--server", server.url, "--token", TOKEN, "--output", output, *args, env=env)

    return run


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "operator.secret"
    path.write_text(SECRET + "\n")
    return path


def closed_port_url() -> str:
    """Return a loopback URL whose port was just bound and released, so nothing listens on it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# Services


def test_service_add_table(cli, server):
    result = cli("service", "add", "billing", "--name", "Billing API")

    assert result.returncode == 0, result
    assert result.stdout.splitlines()[0] == "created service 'billing'"
    assert "Code:" in result.stdout
    assert "Billing API" in result.stdout
    assert server.state.services["billing"]["name"] == "Billing API"
    assert server.api_requests()[-1].body == {"code": "billing", "name": "Billing API"}


def test_service_add_json(cli, server):
    result = cli("service", "add", "billing", output="json")

    assert result.returncode == 0, result
    assert result.json() == server.last_response()
    assert result.json()["name"] == "billing"
    assert "created service 'billing'" in result.stderr
    assert server.api_requests()[-1].body == {"code": "billing"}


def test_service_add_existing_is_conflict(cli, server):
    server.add_service("billing")

    result = cli("service", "add", "billing")

    assert_one_error_line(result, 1, "service 'billing' already exists (HTTP 409)")


def test_service_list_table_aligns_columns(cli, server):
    server.add_service("billing", "Billing API")
    server.add_service("auth-svc")
    server.add_instance("auth-svc", "10.0.0.1:80")

    result = cli("service", "list")

    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["CODE", "NAME", "INSTANCES", "HEALTHY"]
    assert lines[1].split() == ["billing", "Billing", "API", "0", "0"]
    assert lines[2].split() == ["auth-svc", "auth-svc", "1", "1"]
    name_column = lines[0].index("NAME")
    assert lines[1].index("Billing") == name_column
    assert lines[2].index("auth-svc", 1) == name_column


def test_service_list_json(cli, server):
    server.add_service("billing")

    result = cli("service", "list", output="json")

    assert result.returncode == 0, result
    assert result.json() == server.last_response()
    assert result.json()[0]["code"] == "billing"
    assert result.stdout.startswith("[\n  {")  # pretty-printed


def test_service_list_empty(cli, server):
    result = cli("service", "list")

    assert result.returncode == 0, result
    assert result.stdout == ""
    assert result.stderr.strip() == "no services"


def test_service_show_table_and_json(cli, server):
    server.add_service("billing", "Billing API")

    table = cli("service", "show", "billing")
    as_json = cli("service", "show", "billing", output="json")

    assert table.returncode == 0, table
    assert "Name:" in table.stdout
    assert "Billing API" in table.stdout
    assert as_json.json() == server.last_response()


def test_service_show_unknown_is_not_found(cli, server):
    result = cli("service", "show", "nope")

    assert_one_error_line(result, 1, "service 'nope' not found (HTTP 404)")


def test_service_remove_needs_force_with_instances(cli, server):
    server.add_service("billing")
    server.add_instance("billing", "10.0.0.1:80")

    refused = cli("service", "remove", "billing")
    forced = cli("service", "remove", "billing", "--force")

    assert_one_error_line(refused, 1, "still has 1 instances")
    assert forced.returncode == 0, forced
    assert forced.stdout.strip() == "removed service 'billing'"
    assert server.api_requests()[-1].query == {"force": "true"}
    assert "billing" not in server.state.services


def test_service_remove_json_keeps_stdout_empty(cli, server):
    server.add_service("billing")

    result = cli("service", "remove", "billing", output="json")

    assert result.returncode == 0, result
    assert result.stdout == ""
    assert "removed service 'billing'" in result.stderr
    assert server.api_requests()[-1].query == {}


# Instances


def test_instance_add_created_then_updated(cli, server):
    server.add_service("billing")
    flags = ("instance", "add", "--service", "billing", "--address", "10.0.0.7:8080", "--protocol", "http")

    first = cli(*flags, "--tag", "blue", "--tag", "v2", "--meta", "zone=a", "--weight", "5")
    second = cli(*flags, "--weight", "9")

    assert first.returncode == 0, first
    assert second.returncode == 0, second
    instance_id = next(iter(server.state.instances))
    assert first.stdout.splitlines()[0] == f"created instance {instance_id}"
    assert second.stdout.splitlines()[0] == f"updated instance {instance_id}"
    assert len(server.state.instances) == 1
    assert server.api_requests()[0].body == {
        "address": "10.0.0.7:8080",
        "protocol": "Http",
        "tags": ["blue", "v2"],
        "metadata": {"zone": "a"},
        "weight": 5,
    }
    assert re.search(r"^Weight: +9$", second.stdout, re.MULTILINE)


def test_instance_add_json_with_ttl_check(cli, server):
    server.add_service("billing")

    result = cli(
        "instance", "add", "--service", "billing", "--address", "[2001:db8::1]:443",
        "--protocol", "HTTPS", "--ttl", "30",
        output="json",
    )

    assert result.returncode == 0, result
    assert result.json() == server.last_response()
    assert result.json()["check"] == {"type": "ttl", "ttl": 30.0}
    assert result.stderr.startswith("created instance ")
    assert server.api_requests()[-1].body == {
        "address": "[2001:db8::1]:443",
        "protocol": "Https",
        "check": {"type": "ttl", "ttl": 30.0},
    }


def test_instance_add_without_check_lets_server_choose(cli, server):
    server.add_service("metrics")

    result = cli("instance", "add", "--service", "metrics", "--address", "10.0.0.8:8125", "--protocol", "udp")

    assert result.returncode == 0, result
    assert "check" not in server.api_requests()[-1].body
    assert server.last_response()["check"] == {"type": "none", "ttl": None}


def test_instance_add_server_validation_is_one_line(cli, server):
    server.add_service("billing")
    server.queue(
        QueuedResponse(
            422,
            json.dumps(
                {
                    "type": "about:blank",
                    "title": "Unprocessable Content",
                    "status": 422,
                    "detail": "request body is invalid",
                    "errors": [
                        {"field": "metadata.zone", "message": "must be a string"},
                        {"field": "weight", "message": "must be a whole number"},
                    ],
                }
            ),
        )
    )

    result = cli("instance", "add", "--service", "billing", "--address", "10.0.0.1:80", "--protocol", "tcp")

    assert_one_error_line(
        result, 1, "request body is invalid (metadata.zone: must be a string; weight: must be a whole number) (HTTP 422)"
    )


def test_instance_list_table_and_filters(cli, server):
    server.add_service("billing")
    server.add_service("auth-svc")
    healthy = server.add_instance("billing", "10.0.0.1:80", tags=["blue"])
    server.add_instance("billing", "10.0.0.2:80", health="Unhealthy")
    server.add_instance("auth-svc", "10.0.0.3:80")

    everything = cli("instance", "list")
    filtered = cli("instance", "list", "--service", "billing", "--health", "healthy")

    assert everything.returncode == 0, everything
    assert everything.stdout.splitlines()[0].split() == [
        "ID", "SERVICE", "ADDRESS", "PROTOCOL", "HEALTH", "WEIGHT", "CHECK", "TAGS",
    ]
    assert len(everything.stdout.splitlines()) == 4
    assert filtered.returncode == 0, filtered
    assert server.api_requests()[-1].query == {"service": "billing", "health": "Healthy"}
    rows = filtered.stdout.splitlines()[1:]
    assert [row.split() for row in rows] == [
        [healthy["id"], "billing", "10.0.0.1:80", "Http", "Healthy", "1", "tcp", "blue"],
    ]


def test_instance_list_json(cli, server):
    server.add_service("billing")
    server.add_instance("billing", "10.0.0.1:80")

    result = cli("instance", "list", output="json")

    assert result.returncode == 0, result
    assert result.json() == server.last_response()
    assert result.json()[0]["address"] == "10.0.0.1:80"


def test_instance_show_table_and_json(cli, server):
    server.add_service("billing", "Billing API")
    instance = server.add_instance("billing", "10.0.0.1:80", metadata={"zone": "a"})

    table = cli("instance", "show", instance["id"].upper())
    as_json = cli("instance", "show", instance["id"], output="json")

    assert table.returncode == 0, table
    assert re.search(rf"^ID: +{instance['id']}$", table.stdout, re.MULTILINE)
    assert "zone=a" in table.stdout
    assert "Billing API" in table.stdout
    assert server.api_requests()[0].path == f"/api/instances/{instance['id']}"
    assert as_json.json() == server.last_response()


def test_instance_show_unknown_is_not_found(cli, server):
    missing = str(uuid.uuid4())

    result = cli("instance", "show", missing)

    assert_one_error_line(result, 1, f"instance '{missing}' not found (HTTP 404)")


def test_instance_remove(cli, server):
    server.add_service("billing")
    instance = server.add_instance("billing", "10.0.0.1:80")

    result = cli("instance", "remove", instance["id"])

    assert result.returncode == 0, result
    assert result.stdout.strip() == f"removed instance {instance['id']}"
    assert server.state.instances == {}
    assert server.api_requests()[-1].method == "DELETE"


# Discovery and health


def test_discover_lists_only_healthy(cli, server):
    server.add_service("billing")
    healthy = server.add_instance("billing", "10.0.0.1:80")
    server.add_instance("billing", "10.0.0.2:80", health="Unhealthy")

    table = cli("discover", "billing")
    as_json = cli("discover", "billing", output="json")

    assert table.returncode == 0, table
    assert len(table.stdout.splitlines()) == 2
    assert healthy["id"] in table.stdout
    assert "10.0.0.2:80" not in table.stdout
    assert as_json.json() == server.last_response()
    assert [i["id"] for i in as_json.json()] == [healthy["id"]]


def test_discover_without_healthy_instances(cli, server):
    server.add_service("billing")

    table = cli("discover", "billing")
    as_json = cli("discover", "billing", output="json")

    assert table.returncode == 0, table
    assert table.stdout == ""
    assert table.stderr.strip() == "no healthy instances of 'billing'"
    assert as_json.json() == []


def test_discover_unknown_service(cli, server):
    result = cli("discover", "nope")

    assert_one_error_line(result, 1, "service 'nope' not found (HTTP 404)")


def test_health_report(cli, server):
    server.add_service("billing")
    instance = server.add_instance("billing", "10.0.0.1:80", health="Unknown")

    table = cli("health", "report", instance["id"], "--status", "healthy", "--check-output", "200 OK in 3 ms")
    as_json = cli("health", "report", instance["id"], "--status", "Unhealthy", output="json")

    assert table.returncode == 0, table
    assert table.stdout.splitlines()[0] == f"reported Healthy for instance {instance['id']}; health is now Healthy"
    assert "200 OK in 3 ms" in table.stdout
    assert server.api_requests()[0].body == {"status": "Healthy", "output": "200 OK in 3 ms"}
    assert as_json.returncode == 0, as_json
    assert as_json.json() == server.last_response()
    assert as_json.json()["health"] == "Unhealthy"


def test_table_escapes_control_characters(cli, server):
    server.add_service("billing")
    instance = server.add_instance("billing", "10.0.0.1:80")

    result = cli("health", "report", instance["id"], "--status", "Unhealthy", "--check-output", "\x1b[2Jgone\x9b")

    assert result.returncode == 0, result
    assert "\x1b" not in result.stdout
    assert "\x9b" not in result.stdout
    assert "\\x1b[2Jgone\\x9b" in result.stdout


def test_json_escapes_control_characters(cli, server):
    server.add_service("billing")
    instance = server.add_instance("billing", "10.0.0.1:80")

    result = cli("health", "report", instance["id"], "--status", "Unhealthy", "--check-output", "bad\x9bnews", output="json")

    assert result.returncode == 0, result
    assert "\x9b" not in result.stdout
    assert result.json()["output"] == "bad\x9bnews"


# Credentials and tokens


def test_token_prints_access_token(server, secret_file):
    result = run_cli("--server", server.url, "--common-name", COMMON_NAME, "--secret-file", str(secret_file), "token")

    assert result.returncode == 0, result
    assert result.stdout == f"{TOKEN}\n"
    assert server.api_requests()[0].body == {"common_name": COMMON_NAME, "secret": SECRET}


def test_token_json_prints_server_response(server, secret_file):
    env = {"LOGPOSE_URL": server.url, "LOGPOSE_COMMON_NAME": COMMON_NAME, "LOGPOSE_SECRET_FILE": str(secret_file)}

    result = run_cli("--output", "json", "token", env=env)

    assert result.returncode == 0, result
    assert result.json() == {"access_token": TOKEN, "token_type": "Bearer", "expires_in": 3600}


def test_token_needs_common_name_and_secret(server):
    result = run_cli("--server", server.url, "--token", TOKEN, "token")

    assert_one_error_line(result, 2, "token needs --common-name with --secret-file")
    assert server.api_requests() == []


def test_secret_file_credentials_fetch_token_first(server, secret_file):
    server.add_service("billing")

    result = run_cli(
        "--server", server.url, "--common-name", COMMON_NAME, "--secret-file", str(secret_file), "service", "list"
    )

    assert result.returncode == 0, result
    assert TOKEN not in result.stdout + result.stderr
    requests = server.api_requests()
    assert [r.path for r in requests] == ["/api/auth/token", "/api/services"]
    assert requests[0].authorization is None
    assert requests[1].authorization == f"Bearer {TOKEN}"


def test_environment_gives_server_and_token(server):
    server.add_service("billing")

    result = run_cli("service", "list", env={"LOGPOSE_URL": server.url, "LOGPOSE_TOKEN": TOKEN})

    assert result.returncode == 0, result
    assert "billing" in result.stdout
    assert server.api_requests()[0].authorization == f"Bearer {TOKEN}"


def test_missing_credentials(server):
    result = run_cli("--server", server.url, "service", "list")

    assert_one_error_line(
        result, 2, "missing credentials: give --token or LOGPOSE_TOKEN, or --common-name with --secret-file"
    )
    assert server.api_requests() == []


def test_common_name_without_secret_file(server):
    result = run_cli("--server", server.url, "--common-name", COMMON_NAME, "service", "list")

    assert_one_error_line(result, 2, "--common-name is given without --secret-file")
    assert server.api_requests() == []


@pytest.mark.parametrize(
    ("make_path", "reason"),
    [
        (lambda tmp: tmp / "absent.secret", "No such file or directory"),
        (lambda tmp: tmp, "Is a directory"),
    ],
    ids=["missing", "directory"],
)
def test_unreadable_secret_file(server, tmp_path, make_path, reason):
    path = make_path(tmp_path)

    result = run_cli("--server", server.url, "--common-name", COMMON_NAME, "--secret-file", str(path), "service", "list")

    assert_one_error_line(result, 2, f"cannot read --secret-file {path}: {reason}")
    assert server.api_requests() == []


def test_empty_secret_file(server, tmp_path):
    path = tmp_path / "empty.secret"
    path.write_text("\n")

    result = run_cli("--server", server.url, "--common-name", COMMON_NAME, "--secret-file", str(path), "token")

    assert_one_error_line(result, 2, f"--secret-file {path} is empty")


def test_wrong_secret_is_unauthorized(server, tmp_path):
    path = tmp_path / "wrong.secret"
    path.write_text("not-the-secret")

    result = run_cli("--server", server.url, "--common-name", COMMON_NAME, "--secret-file", str(path), "token")

    assert_one_error_line(result, 1, "invalid client credentials (HTTP 401); check --common-name and --secret-file")
    assert "not-the-secret" not in result.stderr


def test_bad_token_is_unauthorized(server):
    result = run_cli("--server", server.url, "--token", "expired-token-value", "service", "list")

    assert_one_error_line(result, 1, "invalid or expired bearer token (HTTP 401); check --token or LOGPOSE_TOKEN")
    assert "expired-token-value" not in result.stderr


# Transport failures and odd responses


def test_unreachable_server(server):
    url = closed_port_url()

    result = run_cli("--server", url, "--token", TOKEN, "service", "list")

    assert_one_error_line(
        result,
        1,
        f"error: cannot connect to {url}: connection refused; is logpose-server running? set --server or LOGPOSE_URL",
    )


def test_slow_server_times_out(server):
    server.queue(QueuedResponse(200, "[]", content_type="application/json", delay=2.0))

    result = run_cli("--server", server.url, "--token", TOKEN, "--timeout", "0.3", "service", "list")

    assert_one_error_line(result, 1, "timed out after 0.3 s waiting for GET")


@pytest.mark.parametrize(
    ("status", "detail"),
    [
        (401, "token expired"),
        (403, "client 'ci' may not register instances of 'billing'"),
        (404, "service 'billing' not found"),
        (409, "service 'billing' already exists"),
        (503, "the database is unavailable; try again"),
    ],
)
def test_problem_response_is_one_line(cli, server, status, detail):
    body = {"type": "about:blank", "title": "Problem", "status": status, "detail": f"{detail}\nsecond line"}
    server.queue(QueuedResponse(status, json.dumps(body)))

    result = cli("service", "list")

    assert_one_error_line(result, 1, f"error: {detail} second line (HTTP {status})")


def test_non_problem_error_response(cli, server):
    server.queue(QueuedResponse(502, "<html><body>Bad Gateway</body></html>", content_type="text/html"))

    result = cli("service", "list")

    assert_one_error_line(result, 1, f"HTTP 502 Bad Gateway from GET {server.url}/api/services; is that a LogPose server?")


def test_invalid_json_response(cli, server):
    server.queue(QueuedResponse(200, "<html>not json</html>", content_type="text/html"))

    result = cli("service", "list")

    assert_one_error_line(result, 1, "invalid JSON in the response to GET")


def test_unexpected_response_shape_is_one_line(cli, server):
    server.queue(QueuedResponse(200, "[1, 2]", content_type="application/json"))

    result = cli("service", "show", "billing")

    assert_one_error_line(result, 1, "unexpected AttributeError")


# Bad command lines fail before any request


INSTANCE_ADD = ("instance", "add", "--service", "billing", "--address", "10.0.0.1:80", "--protocol", "http")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("instance", "add", "--service", "billing", "--address", "10.0.0.1:80", "--protocol", "ftp"),
            "invalid value for --protocol: unknown protocol 'ftp'; accepted: Http, Https, Grpc, Tcp, Udp",
        ),
        (
            ("instance", "add", "--service", "billing", "--address", "10.0.0.1", "--protocol", "http"),
            "invalid value for --address: '10.0.0.1' is not 'host:port'",
        ),
        (
            ("instance", "add", "--service", "billing", "--address", "999.1.1.1:80", "--protocol", "http"),
            "invalid value for --address: '999.1.1.1' in '999.1.1.1:80' is not a valid IPv4 address",
        ),
        (
            ("instance", "add", "--service", "billing", "--address", "10.0.0.1:70000", "--protocol", "http"),
            "invalid value for --address: port '70000'",
        ),
        (
            ("instance", "add", "--service", "Billing", "--address", "10.0.0.1:80", "--protocol", "http"),
            "invalid value for --service: 'Billing' must be lower case; use 'billing'",
        ),
        ((*INSTANCE_ADD, "--weight", "70000"), "invalid value for --weight: must be a whole number from 0 to 65535, got 70000"),
        ((*INSTANCE_ADD, "--weight", "-1"), "invalid value for --weight: must be a whole number from 0 to 65535, got -1"),
        ((*INSTANCE_ADD, "--weight", "heavy"), "invalid value for --weight: must be a whole number from 0 to 65535, got 'heavy'"),
        ((*INSTANCE_ADD, "--check", "icmp"), "invalid value for --check: must be one of tcp, http, ttl, none, got 'icmp'"),
        ((*INSTANCE_ADD, "--check-path", "health"), "invalid value for --check-path: must be an absolute URL path"),
        ((*INSTANCE_ADD, "--check-interval", "1", "--check-timeout", "2"), "invalid value for --check-timeout: must be less than"),
        ((*INSTANCE_ADD, "--check", "tcp", "--ttl", "30"), "invalid value for --ttl: does not apply to a tcp check"),
        ((*INSTANCE_ADD, "--ttl", "0"), "invalid value for --ttl: must be a number of seconds from 1 to 86400"),
        ((*INSTANCE_ADD, "--ttl", "soon"), "invalid value for --ttl: 'soon' is not a number of seconds"),
        ((*INSTANCE_ADD, "--meta", "zone"), "invalid value for --meta: 'zone' is not KEY=VALUE"),
        ((*INSTANCE_ADD, "--meta", "a=1", "--meta", "a=2"), "invalid value for --meta: key 'a' is given more than once"),
        ((*INSTANCE_ADD, "--tag", ""), "invalid value for --tag: must be a non-empty string"),
        (("instance", "add", "--service", "billing", "--address", "10.0.0.1:80"), "missing option '--protocol'"),
        (("service", "add", "Billing"), "invalid value for CODE: 'Billing' must be lower case; use 'billing'"),
        (("service", "add", "ns"), "invalid value for CODE: 'ns' is reserved"),
        (("service", "add", "billing", "--name", " "), "invalid value for --name: must not be empty"),
        (("service", "show", "bad_code"), "invalid value for CODE: 'bad_code' is not a DNS label"),
        (("discover", "Billing"), "invalid value for CODE: 'Billing' must be lower case"),
        (("instance", "show", "42"), "invalid value for ID: '42' is not an instance id"),
        (("instance", "list", "--health", "sick"), "invalid value for --health: must be one of Unknown, Healthy, Unhealthy"),
        (
            ("health", "report", "0d5f6a4e-8b0e-4c1e-9a57-3c2f1f0e7b21", "--status", "Unknown"),
            "invalid value for --status: must be 'Healthy' or 'Unhealthy', got 'Unknown'",
        ),
        (("service", "frobnicate"), "no such command 'frobnicate'"),
        (("service", "list", "--bogus"), "no such option: --bogus"),
    ],
)
def test_bad_flag_fails_before_sending(cli, server, args, message):
    result = cli(*args)

    assert_one_error_line(result, 2, message)
    assert "see 'logpose-command" in result.stderr
    assert server.api_requests() == []


def test_ttl_check_needs_ttl(cli, server):
    result = cli(*INSTANCE_ADD, "--check", "ttl")

    assert_one_error_line(result, 2, "--check ttl needs --ttl SECONDS")
    assert server.api_requests() == []


@pytest.mark.parametrize(
    ("global_flags", "message"),
    [
        (("--output", "xml"), "invalid value for --output: 'xml'; accepted: table, json"),
        (("--timeout", "0"), "invalid value for --timeout: must be more than 0 seconds, got '0'"),
        (("--timeout", "later"), "invalid value for --timeout: 'later' is not a number of seconds"),
        (("--server", "ftp://127.0.0.1:21"), "invalid value for --server: 'ftp://127.0.0.1:21' is not an http:// or https:// URL"),
    ],
)
def test_bad_global_flag(server, global_flags, message):
    result = run_cli("--token", TOKEN, *global_flags, "service", "list", env={"LOGPOSE_URL": server.url})

    assert_one_error_line(result, 2, message)
    assert server.api_requests() == []


def test_output_flag_is_case_insensitive(server):
    result = run_cli("--server", server.url, "--token", TOKEN, "--output", "JSON", "service", "list")

    assert result.returncode == 0, result
    assert result.json() == []


def test_no_arguments_prints_help():
    result = run_cli()

    assert result.returncode == 0, result
    assert result.stdout.startswith("Usage: logpose-command")
    assert "instance" in result.stdout


def test_help_has_no_rich_panels():
    result = run_cli("instance", "add", "--help")

    assert result.returncode == 0, result
    assert "--protocol" in result.stdout
    assert "╭" not in result.stdout
    assert "\x1b" not in result.stdout


def test_token_never_printed_by_other_commands(cli, server):
    server.add_service("billing")
    server.add_instance("billing", "10.0.0.1:80")

    outputs = [cli("service", "list"), cli("instance", "list", output="json"), cli("discover", "billing")]
    outputs.append(run_cli("--help", env={"LOGPOSE_TOKEN": TOKEN}))

    for result in outputs:
        assert TOKEN not in result.stdout
        assert TOKEN not in result.stderr
