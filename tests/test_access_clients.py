"""Client management through the HTTP API and ``logpose-command client`` against a real server."""

from __future__ import annotations

import json
import sqlite3
import stat
import subprocess
from typing import Iterator

import httpx
import pytest

from conftest import ServerProcess, assert_problem, one_error_line, run_cli

@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    process = ServerProcess(tmp_path_factory.mktemp("clients") / "data").start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def admin(server) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


# ----- HTTP API ---------------------------------------------------------------------------

def test_create_shows_secret_once(server, admin):
    answer = admin.post("/api/clients", json={"common_name": "billing", "role": "registrar",
                                              "services": ["billing", "auth-svc", "billing"]})
    assert answer.status_code == 201, answer.text
    assert answer.headers["Location"] == "/api/clients/billing"
    client = answer.json()
    assert client["role"] == "registrar"
    assert client["services"] == ["billing", "auth-svc"]
    assert len(client["secret"]) >= 32

    shown = admin.get("/api/clients/billing").json()
    assert "secret" not in shown
    assert shown["services"] == ["billing", "auth-svc"]
    assert all("secret" not in listed for listed in admin.get("/api/clients").json())
    token = httpx.post(server.url + "/api/auth/token", json={"common_name": "billing", "secret": client["secret"]})
    assert token.status_code == 200


def test_secret_stored_only_as_scrypt_hash(server, admin):
    secret = admin.post("/api/clients", json={"common_name": "hashed", "role": "reader"}).json()["secret"]
    database = server.data_dir / "logpose.db"
    with sqlite3.connect(database) as connection:
        (stored,) = connection.execute("SELECT secret_hash FROM clients WHERE common_name = 'hashed'").fetchone()
    assert stored.startswith("scrypt$")
    assert secret not in stored
    for path in server.data_dir.glob("logpose.db*"):
        assert secret.encode() not in path.read_bytes()


def test_reader_and_admin_act_on_every_service(admin):
    reader = admin.post("/api/clients", json={"common_name": "viewer", "role": "reader"})
    assert reader.json()["services"] == ["*"]
    second_admin = admin.post("/api/clients", json={"common_name": "ops@example", "role": "admin", "services": ["*"]})
    assert second_admin.status_code == 201, second_admin.text


@pytest.mark.parametrize(
    "body, field",
    [
        ({"role": "reader"}, "common_name"),
        ({"common_name": "x"}, "role"),
        ({"common_name": "", "role": "reader"}, "common_name"),
        ({"common_name": "has space", "role": "reader"}, "common_name"),
        ({"common_name": "x" * 129, "role": "reader"}, "common_name"),
        ({"common_name": 7, "role": "reader"}, "common_name"),
        ({"common_name": "x", "role": "root"}, "role"),
        ({"common_name": "x", "role": "registrar"}, "services"),
        ({"common_name": "x", "role": "registrar", "services": []}, "services"),
        ({"common_name": "x", "role": "registrar", "services": "billing"}, "services"),
        ({"common_name": "x", "role": "registrar", "services": ["Billing"]}, "services[0]"),
        ({"common_name": "x", "role": "registrar", "services": ["ok", "bad_code"]}, "services[1]"),
        ({"common_name": "x", "role": "reader", "services": ["billing"]}, "services"),
        ({"common_name": "x", "role": "reader", "secret": "chosen"}, "secret"),
    ],
)
def test_create_rejects_bad_input(admin, body, field):
    assert_problem(admin.post("/api/clients", json=body), 422, field)
    if isinstance(body.get("common_name"), str) and body["common_name"]:
        assert admin.get("/api/clients/x").status_code == 404


def test_duplicate_client_is_409(admin):
    assert admin.post("/api/clients", json={"common_name": "twice", "role": "reader"}).status_code == 201
    problem = assert_problem(admin.post("/api/clients", json={"common_name": "twice", "role": "admin"}), 409)
    assert "already exists" in problem["detail"]
    assert admin.get("/api/clients/twice").json()["role"] == "reader"


def test_unknown_client_is_404(admin):
    assert_problem(admin.get("/api/clients/nobody"), 404)
    assert_problem(admin.delete("/api/clients/nobody"), 404)
    assert_problem(admin.post("/api/clients/nobody/rotate"), 404)
    assert_problem(admin.get("/api/clients/bad%20name"), 422, "common_name")


def test_last_admin_cannot_be_removed(server_factory):
    server = server_factory()
    with server.client() as first_admin:
        problem = assert_problem(first_admin.delete("/api/clients/admin"), 409)
        assert "last admin" in problem["detail"]
        assert first_admin.get("/api/clients/admin").status_code == 200

        second = first_admin.post("/api/clients", json={"common_name": "admin2", "role": "admin"}).json()
        assert first_admin.delete("/api/clients/admin").status_code == 204

    token = httpx.post(server.url + "/api/auth/token", json={"common_name": "admin2", "secret": second["secret"]})
    headers = {"Authorization": f"Bearer {token.json()['access_token']}"}
    assert_problem(httpx.delete(server.url + "/api/clients/admin2", headers=headers), 409)

    # No admin is recreated at restart while admin2 exists.
    server.stop()
    server.start()
    names = [client["common_name"] for client in httpx.get(server.url + "/api/clients", headers=headers).json()]
    assert names == ["admin2"]


# ----- logpose-command client ----------------------------------------------------------------

@pytest.fixture(scope="module")
def cli(server):
    def run(*arguments: str) -> subprocess.CompletedProcess[str]:
        return run_cli(server, *arguments)

    return run


def test_cli_client_lifecycle(server, cli, tmp_path):
    added = cli("--output", "json", "client", "add", "team-a", "--role", "registrar", "--service", "orders")
    assert added.returncode == 0, added.stderr
    secret = json.loads(added.stdout)["secret"]
    assert "cannot show it again" in added.stderr

    listed = cli("client", "list")
    assert listed.returncode == 0
    assert any(line.split()[:3] == ["team-a", "registrar", "orders"] for line in listed.stdout.splitlines())
    details = cli("client", "show", "team-a")
    assert "Role:" in details.stdout
    assert "registrar" in details.stdout
    assert secret not in details.stdout

    saved = tmp_path / "team-a.secret"
    rotated = cli("client", "rotate", "team-a", "--save-secret", str(saved))
    assert rotated.returncode == 0, rotated.stderr
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    new_secret = saved.read_text().strip()
    assert new_secret != secret
    assert new_secret not in rotated.stdout + rotated.stderr
    token = httpx.post(server.url + "/api/auth/token", json={"common_name": "team-a", "secret": new_secret})
    assert token.status_code == 200

    removed = cli("client", "remove", "team-a")
    assert removed.returncode == 0
    missing = cli("client", "show", "team-a")
    assert missing.returncode == 1
    assert "not found" in one_error_line(missing)


def test_cli_validates_locally(cli, tmp_path):
    cases = [
        (("client", "add", "bad name", "--role", "reader"), "NAME"),
        (("client", "add", "x", "--role", "owner"), "--role"),
        (("client", "add", "x", "--role", "registrar"), "--service"),
        (("client", "add", "x", "--role", "registrar", "--service", "Upper"), "--service"),
        (("client", "rotate", "x", "--save-secret", str(tmp_path / "no-dir" / "s")), "--save-secret"),
    ]
    for arguments, flag in cases:
        result = cli(*arguments)
        assert result.returncode == 2, (arguments, result.stderr)
        assert flag in one_error_line(result)


def test_cli_reports_server_refusal(cli):
    result = cli("client", "add", "admin", "--role", "reader")
    assert result.returncode == 1
    assert "already exists" in one_error_line(result)
