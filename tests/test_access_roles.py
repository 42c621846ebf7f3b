"""Each role against each endpoint of a real server: allowed, denied, and without a token."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import httpx
import pytest

from conftest import ServerProcess
from logpose.api import build_app
from logpose.auth import Authenticator
from logpose.registry import Registry

PROBLEM = "application/problem+json"
ROLES = ("reader", "registrar", "admin")
EVERY_ROLE = frozenset(ROLES)
REGISTRAR_SERVICES = ["alpha"]


class World:
    """The module's server with one client per role, and fresh resources made by the admin on demand."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.admin = server.client()
        self._numbers = itertools.count()
        self.tokens: dict[str, str] = {"admin": server.token()}
        for role, services in (("reader", None), ("registrar", REGISTRAR_SERVICES)):
            body: dict[str, Any] = {"common_name": f"{role}-client", "role": role}
            if services is not None:
                body["services"] = services
            created = self.admin.post("/api/clients", json=body)
            assert created.status_code == 201, created.text
            self.tokens[role] = self.token_for(body["common_name"], created.json()["secret"])
        self.alpha_instance = self.fresh_instance("alpha")
        self.beta_instance = self.fresh_instance("beta")

    def token_for(self, common_name: str, secret: str) -> str:
        answer = httpx.post(self.server.url + "/api/auth/token", json={"common_name": common_name, "secret": secret})
        assert answer.status_code == 200, answer.text
        return answer.json()["access_token"]

    def request(self, role: str | None, method: str, path: str, body: Any = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.tokens[role]}"} if role else {}
        return httpx.request(method, self.server.url + path, json=body, headers=headers, timeout=10)

    def name(self, prefix: str) -> str:
        return f"{prefix}{next(self._numbers)}"

    def fresh_service(self) -> str:
        code = self.name("svc")
        assert self.admin.post("/api/services", json={"code": code}).status_code == 201
        return code

    def fresh_instance(self, service: str) -> str:
        # check none: the address is outside loopback, so the prober must never contact it.
        body = {"address": f"10.0.0.{next(self._numbers) % 250 + 1}:{next(self._numbers) + 1000}",
                "protocol": "Http", "check": {"type": "none"}}
        answer = self.admin.post(f"/api/services/{service}/instances", json=body)
        assert answer.status_code in (200, 201), answer.text
        return answer.json()["id"]

    def fresh_client(self) -> str:
        common_name = self.name("client")
        answer = self.admin.post("/api/clients", json={"common_name": common_name, "role": "reader"})
        assert answer.status_code == 201, answer.text
        return common_name


@dataclass(frozen=True)
class Endpoint:
    """One route: how to build a request to it, which roles may call it and the status they get."""

    name: str
    method: str
    prepare: Callable[[World], tuple[str, Any]]  # returns the path and the JSON body
    allowed: frozenset[str]
    status: int  # the status an allowed role gets
    permission: str  # what a denied role lacks


def _registration(world: World) -> tuple[str, Any]:
    body = {"address": f"10.1.0.1:{next(world._numbers) + 2000}", "protocol": "Tcp", "check": {"type": "none"}}
    return "/api/services/alpha/instances", body


ENDPOINTS = [
    Endpoint("list services", "GET", lambda w: ("/api/services", None), EVERY_ROLE, 200, ""),
    Endpoint("show service", "GET", lambda w: ("/api/services/alpha", None), EVERY_ROLE, 200, ""),
    Endpoint("list service instances", "GET", lambda w: ("/api/services/alpha/instances", None), EVERY_ROLE, 200, ""),
    Endpoint("list instances", "GET", lambda w: ("/api/instances", None), EVERY_ROLE, 200, ""),
    Endpoint("show instance", "GET", lambda w: (f"/api/instances/{w.alpha_instance}", None), EVERY_ROLE, 200, ""),
    Endpoint("instance history", "GET", lambda w: (f"/api/instances/{w.alpha_instance}/history", None),
             EVERY_ROLE, 200, ""),
    Endpoint("discover", "GET", lambda w: ("/api/discover/alpha", None), EVERY_ROLE, 200, ""),
    Endpoint("status", "GET", lambda w: ("/api/status", None), EVERY_ROLE, 200, ""),
    Endpoint("metrics", "GET", lambda w: ("/metrics", None), EVERY_ROLE, 200, ""),
    Endpoint("create service", "POST", lambda w: ("/api/services", {"code": w.name("new")}),
             frozenset({"admin"}), 201, "admin"),
    Endpoint("delete service", "DELETE", lambda w: (f"/api/services/{w.fresh_service()}", None),
             frozenset({"admin"}), 204, "admin"),
    Endpoint("register instance", "POST", _registration, frozenset({"registrar", "admin"}), 201, "register:alpha"),
    Endpoint("deregister instance", "DELETE", lambda w: (f"/api/instances/{w.fresh_instance('alpha')}", None),
             frozenset({"registrar", "admin"}), 204, "register:alpha"),
    Endpoint("report health", "POST",
             lambda w: (f"/api/instances/{w.alpha_instance}/health", {"status": "Healthy"}),
             frozenset({"registrar", "admin"}), 200, "register:alpha"),
    Endpoint("set maintenance", "POST",
             lambda w: (f"/api/instances/{w.fresh_instance('alpha')}/maintenance", {"enabled": True}),
             frozenset({"registrar", "admin"}), 200, "register:alpha"),
    Endpoint("list clients", "GET", lambda w: ("/api/clients", None), frozenset({"admin"}), 200, "admin"),
    Endpoint("show client", "GET", lambda w: ("/api/clients/reader-client", None), frozenset({"admin"}), 200, "admin"),
    Endpoint("create client", "POST", lambda w: ("/api/clients", {"common_name": w.name("made"), "role": "reader"}),
             frozenset({"admin"}), 201, "admin"),
    Endpoint("remove client", "DELETE", lambda w: (f"/api/clients/{w.fresh_client()}", None),
             frozenset({"admin"}), 204, "admin"),
    Endpoint("rotate secret", "POST", lambda w: (f"/api/clients/{w.fresh_client()}/rotate", None),
             frozenset({"admin"}), 200, "admin"),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[World]:
    server = ServerProcess(tmp_path_factory.mktemp("roles") / "data").start()
    state = World(server)
    yield state
    state.admin.close()
    server.stop()


def assert_forbidden(answer: httpx.Response, permission: str) -> None:
    assert answer.status_code == 403, answer.text
    assert answer.headers["content-type"].startswith(PROBLEM)
    problem = answer.json()
    assert problem["type"] == "urn:logpose:problem:forbidden"
    assert problem["permission"] == permission
    assert permission.split(":")[-1] in problem["detail"]


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda endpoint: endpoint.name)
def test_role_matrix(world, endpoint, role):
    path, body = endpoint.prepare(world)
    answer = world.request(role, endpoint.method, path, body)
    if role in endpoint.allowed:
        assert answer.status_code == endpoint.status, answer.text
    else:
        assert_forbidden(answer, endpoint.permission)


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda endpoint: endpoint.name)
def test_every_endpoint_needs_token(world, endpoint):
    path, body = endpoint.prepare(world)
    answer = world.request(None, endpoint.method, path, body)
    assert answer.status_code == 401, answer.text
    assert answer.headers["WWW-Authenticate"].startswith("Bearer")


def test_matrix_covers_every_route():
    app = build_app(Registry(None), Authenticator(None, b"k" * 64, 3600))
    routes = {(route.method, route.resource.canonical) for route in app.router.routes() if route.method != "HEAD"}
    public = {("GET", "/healthz"), ("POST", "/api/auth/token"), ("GET", "/api/openapi.json")}
    world = _PathRecorder()
    covered = {(endpoint.method, world.route_of(endpoint)) for endpoint in ENDPOINTS}
    assert routes - public - covered == set(), "add these routes to ENDPOINTS"


class _PathRecorder:
    """Turns an endpoint's prepared path back into its route pattern, without a server."""

    alpha_instance = "{instance_id}"
    _numbers = itertools.count()

    def name(self, prefix: str) -> str:
        return "{name}"

    def fresh_service(self) -> str:
        return "{code}"

    def fresh_instance(self, service: str) -> str:
        return "{instance_id}"

    def fresh_client(self) -> str:
        return "{common_name}"

    def route_of(self, endpoint: Endpoint) -> str:
        path, _body = endpoint.prepare(self)  # type: ignore[arg-type]
        return (path.replace("/services/alpha", "/services/{code}")
                .replace("/clients/reader-client", "/clients/{common_name}")
                .replace("/discover/alpha", "/discover/{code}"))


# ----- registrar outside its services --------------------------------------------

def test_registrar_cannot_register_elsewhere(world):
    body = {"address": "10.2.0.1:80", "protocol": "Http", "check": {"type": "none"}}
    before = len(world.admin.get("/api/services/beta/instances").json())
    answer = world.request("registrar", "POST", "/api/services/beta/instances", body)
    assert_forbidden(answer, "register:beta")
    assert len(world.admin.get("/api/services/beta/instances").json()) == before


def test_registrar_cannot_create_service_by_registering(world):
    body = {"address": "10.2.0.2:80", "protocol": "Http", "check": {"type": "none"}}
    answer = world.request("registrar", "POST", "/api/services/gamma/instances", body)
    assert_forbidden(answer, "register:gamma")
    assert world.admin.get("/api/services/gamma").status_code == 404


def test_registrar_cannot_report_health_elsewhere(world):
    answer = world.request("registrar", "POST", f"/api/instances/{world.beta_instance}/health", {"status": "Healthy"})
    assert_forbidden(answer, "register:beta")
    assert world.admin.get(f"/api/instances/{world.beta_instance}").json()["health"] == "Unknown"


def test_registrar_cannot_deregister_elsewhere(world):
    answer = world.request("registrar", "DELETE", f"/api/instances/{world.beta_instance}")
    assert_forbidden(answer, "register:beta")
    assert world.admin.get(f"/api/instances/{world.beta_instance}").status_code == 200


def test_registrar_cannot_drain_elsewhere(world):
    answer = world.request("registrar", "POST", f"/api/instances/{world.beta_instance}/maintenance", {"enabled": True})
    assert_forbidden(answer, "register:beta")


def test_wildcard_registrar_writes_any_service(world):
    created = world.admin.post("/api/clients", json={"common_name": "all-services", "role": "registrar",
                                                     "services": ["*"]})
    token = world.token_for("all-services", created.json()["secret"])
    headers = {"Authorization": f"Bearer {token}"}
    body = {"address": "10.3.0.1:80", "protocol": "Http", "check": {"type": "none"}}
    registered = httpx.post(world.server.url + "/api/services/delta/instances", json=body, headers=headers)
    assert registered.status_code == 201, registered.text
    removed = httpx.delete(world.server.url + f"/api/instances/{registered.json()['id']}", headers=headers)
    assert removed.status_code == 204
    service = httpx.post(world.server.url + "/api/services", json={"code": "epsilon"}, headers=headers)
    assert_forbidden(service, "admin")


def test_reader_denied_write_changes_nothing(world):
    answer = world.request("reader", "DELETE", "/api/services/alpha?force=true")
    assert_forbidden(answer, "admin")
    assert world.admin.get("/api/services/alpha").status_code == 200
