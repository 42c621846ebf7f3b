"""The HTTP API of a real server process, through a real HTTP client."""

from __future__ import annotations

import base64
import json
import os
import stat
import time

import httpx
import jwt
import pytest

from conftest import PROBLEM_CONTENT_TYPE, assert_problem, closed_port, wait_until


def register(api: httpx.Client, service: str, address: str, protocol: str = "Http", **fields) -> httpx.Response:
    # Addresses outside loopback are never probed: the tests send no traffic beyond 127.0.0.1.
    fields.setdefault("check", {"type": "none"})
    return api.post(f"/api/services/{service}/instances", json={"address": address, "protocol": protocol, **fields})


# ----- tokens ------------------------------------------------------------------

def test_admin_secret_file_is_private(server):
    path = server.data_dir / "admin.secret"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(server.data_dir / "jwt.key").st_mode) == 0o600
    assert server.admin_secret() not in server.log()
    assert str(path) in server.log()


def test_token_issued_for_admin_secret(server):
    answer = httpx.post(server.url + "/api/auth/token", json={"common_name": "admin", "secret": server.admin_secret()})
    assert answer.status_code == 200
    body = answer.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    header = jwt.get_unverified_header(body["access_token"])
    assert header["alg"] == "HS256"


@pytest.mark.parametrize(
    "credentials",
    [
        {"common_name": "admin", "secret": "wrong"},
        {"common_name": "nobody", "secret": "whatever"},
    ],
)
def test_token_rejects_bad_credentials(server, credentials):
    answer = httpx.post(server.url + "/api/auth/token", json=credentials)
    assert_problem(answer, 401)


@pytest.mark.parametrize(
    "body, field",
    [
        ({"secret": "x"}, "common_name"),
        ({"common_name": "admin"}, "secret"),
        ({"common_name": 5, "secret": "x"}, "common_name"),
        ({"common_name": "admin", "secret": "x", "extra": 1}, "extra"),
    ],
)
def test_token_request_validation(server, body, field):
    answer = httpx.post(server.url + "/api/auth/token", json=body)
    assert_problem(answer, 422, field)


def _forge(token: str, **changes) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims.update(changes)
    encoded = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{encoded}.{signature}"


def test_forged_tokens_rejected(server):
    token = server.token()
    claims = jwt.decode(token, options={"verify_signature": False})
    forged = {
        "alg none": jwt.encode(claims, None, algorithm="none"),
        "changed claims": _forge(token, sub="mallory", role="admin"),
        "wrong key": jwt.encode(claims, "k" * 64, algorithm="HS256"),
        "expired": jwt.encode({**claims, "exp": int(time.time()) - 3600}, "k" * 64, algorithm="HS256"),
        "garbage": "not-a-token",
    }
    for case, bad in forged.items():
        answer = httpx.get(server.url + "/api/services", headers={"Authorization": f"Bearer {bad}"})
        assert answer.status_code == 401, case
        assert answer.headers["content-type"].startswith(PROBLEM_CONTENT_TYPE), case


def test_expired_token_signed_with_real_key_rejected(server):
    key = (server.data_dir / "jwt.key").read_text().strip()
    claims = jwt.decode(server.token(), options={"verify_signature": False})
    expired = jwt.encode({**claims, "exp": int(time.time()) - 120}, key, algorithm="HS256")
    answer = httpx.get(server.url + "/api/services", headers={"Authorization": f"Bearer {expired}"})
    problem = assert_problem(answer, 401)
    assert "expired" in problem["detail"]


@pytest.mark.parametrize("header", [None, "Bearer", "Basic YWRtaW46eA==", "Token abc", "Bearer a b"])
def test_missing_or_malformed_authorization(server, header):
    headers = {"Authorization": header} if header is not None else {}
    answer = httpx.get(server.url + "/api/services", headers=headers)
    assert_problem(answer, 401)
    assert answer.headers["www-authenticate"].startswith("Bearer")


def test_healthz_needs_no_token(server):
    answer = httpx.get(server.url + "/healthz")
    assert answer.status_code == 200
    assert answer.json()["status"] == "ok"


# ----- registration and administration ---------------------------------------------------------

def test_register_creates_service_and_instance(api):
    answer = register(api, "my-svc", "10.0.0.5:8080", "http", tags=["blue"], metadata={"zone": "a"}, weight=3)
    assert answer.status_code == 201
    instance = answer.json()
    assert instance["protocol"] == "Http"
    assert instance["health"] == "Unknown"
    assert instance["check"] == {"type": "none"}
    assert instance["service_name"] == "my-svc"
    assert instance["address"] == "10.0.0.5:8080"
    assert instance["tags"] == ["blue"]
    assert instance["metadata"] == {"zone": "a"}
    assert instance["weight"] == 3
    service = api.get("/api/services/my-svc").json()
    assert service["name"] == "my-svc"
    assert service["instance_count"] == 1


def test_reregistration_updates_same_instance(api):
    first = register(api, "my-svc", "10.0.0.5:8080", "Http", tags=["v1"]).json()
    second = register(api, "my-svc", "10.0.0.5:8080", "HTTP", tags=["v2"])
    assert second.status_code == 200
    assert second.json()["id"] == first["id"]
    assert second.json()["tags"] == ["v2"]
    listing = api.get("/api/services/my-svc/instances").json()
    assert len(listing) == 1


def test_reregistration_matches_normalised_ipv6(api):
    first = register(api, "v6-svc", "[2001:db8:0:0::1]:80", "Tcp").json()
    second = register(api, "v6-svc", "[2001:DB8::1]:80", "tcp")
    assert second.status_code == 200
    assert second.json()["id"] == first["id"]


def test_same_address_other_protocol_is_another_instance(api):
    first = register(api, "my-svc", "10.0.0.5:8080", "Http").json()
    second = register(api, "my-svc", "10.0.0.5:8080", "Grpc")
    assert second.status_code == 201
    assert second.json()["id"] != first["id"]


def test_service_crud(api):
    created = api.post("/api/services", json={"code": "billing", "name": "Billing API"})
    assert created.status_code == 201
    assert created.json()["name"] == "Billing API"
    assert_problem(api.post("/api/services", json={"code": "billing"}), 409)
    listing = api.get("/api/services")
    assert [service["code"] for service in listing.json()] == ["billing"]
    assert int(listing.headers["X-LogPose-Index"]) >= 1
    register(api, "billing", "10.0.0.7:443", "Https")
    assert_problem(api.delete("/api/services/billing"), 409)
    assert api.delete("/api/services/billing?force=true").status_code == 204
    assert_problem(api.get("/api/services/billing"), 404)
    assert api.get("/api/instances").json() == []


def test_instance_show_list_delete(api):
    instance = register(api, "my-svc", "10.0.0.5:8080").json()
    register(api, "other", "10.0.0.6:8080")
    shown = api.get(f"/api/instances/{instance['id']}")
    assert shown.json()["id"] == instance["id"]
    assert len(api.get("/api/instances").json()) == 2
    assert len(api.get("/api/instances", params={"service": "other"}).json()) == 1
    assert len(api.get("/api/instances", params={"health": "unknown"}).json()) == 2
    assert api.get("/api/instances", params={"health": "Healthy"}).json() == []
    assert api.delete(f"/api/instances/{instance['id']}").status_code == 204
    assert_problem(api.get(f"/api/instances/{instance['id']}"), 404)
    assert_problem(api.delete(f"/api/instances/{instance['id']}"), 404)


def test_discover_unknown_service_is_404(api):
    assert_problem(api.get("/api/discover/nothing-here"), 404)


def test_health_report_makes_instance_discoverable(api):
    instance = register(api, "reported", "10.0.0.9:9000", check={"type": "none"}).json()
    assert api.get("/api/discover/reported").json() == []
    answer = api.post(f"/api/instances/{instance['id']}/health", json={"status": "Healthy", "output": "all good"})
    assert answer.status_code == 200
    assert answer.json()["health"] == "Healthy"
    discovered = api.get("/api/discover/reported")
    assert [item["id"] for item in discovered.json()] == [instance["id"]]
    assert discovered.json()[0]["health"] == "Healthy"
    assert discovered.json()[0]["output"] == "all good"
    assert "X-LogPose-Index" in discovered.headers


def test_health_report_for_unknown_instance_is_404(api):
    answer = api.post("/api/instances/4b0e1c3e-8a55-4a8e-9d6f-0e7a2b1c9d00/health", json={"status": "Healthy"})
    problem = assert_problem(answer, 404)
    assert "register" in problem["detail"]


def test_ttl_check_expires_without_reports(api):
    instance = register(api, "ttl-svc", "10.0.0.9:9000", check={"type": "ttl", "ttl": 1}).json()
    api.post(f"/api/instances/{instance['id']}/health", json={"status": "Healthy"})
    assert len(api.get("/api/discover/ttl-svc").json()) == 1
    unhealthy = wait_until(
        lambda: api.get(f"/api/instances/{instance['id']}").json()["health"] == "Unhealthy", timeout=5
    )
    assert unhealthy
    assert api.get("/api/discover/ttl-svc").json() == []


# ----- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    "service, body, field",
    [
        ("My-Svc", {"address": "10.0.0.5:80", "protocol": "Http"}, "code"),
        ("-bad", {"address": "10.0.0.5:80", "protocol": "Http"}, "code"),
        ("a" * 64, {"address": "10.0.0.5:80", "protocol": "Http"}, "code"),
        ("ns", {"address": "10.0.0.5:80", "protocol": "Http"}, "code"),
        ("svc", {"address": "10.0.0.5", "protocol": "Http"}, "address"),
        ("svc", {"address": "10.0.0.5:0", "protocol": "Http"}, "address"),
        ("svc", {"address": "10.0.0.5:65536", "protocol": "Http"}, "address"),
        ("svc", {"address": "999.1.1.1:80", "protocol": "Http"}, "address"),
        ("svc", {"address": "2001:db8::1:80", "protocol": "Http"}, "address"),
        ("svc", {"address": "[2001:db8::zz]:80", "protocol": "Http"}, "address"),
        ("svc", {"address": "bad_host!:80", "protocol": "Http"}, "address"),
        ("svc", {"address": 5, "protocol": "Http"}, "address"),
        ("svc", {"address": "10.0.0.5:80", "protocol": "Ftp"}, "protocol"),
        ("svc", {"address": "10.0.0.5:80"}, "protocol"),
        ("svc", {"protocol": "Http"}, "address"),
        ("svc", {"address": "10.0.0.5:80", "protocol": "Http", "weight": -1}, "weight"),
        ("svc", {"address": "10.0.0.5:80", "protocol": "Http", "weight": "3"}, "weight"),
        ("svc", {"address": "10.0.0.5:80", "protocol": "Http", "tags": "a"}, "tags"),
        ("svc", {"address": "10.0.0.5:80", "protocol": "Http", "metadata": {"k": 1}}, "metadata.k"),
        ("svc", {"address": "10.0.0.5:80", "protocol": "Http", "check": {"type": "icmp"}}, "check.type"),
        ("svc", {"address": "10.0.0.5:80", "protocol": "Http", "check": {"type": "ttl"}}, "check.ttl"),
        ("svc", {"address": "10.0.0.5:80", "protocol": "Http", "colour": "red"}, "colour"),
    ],
)
def test_registration_rejects_bad_input(api, service, body, field):
    answer = register_raw = api.post(f"/api/services/{service}/instances", json=body)
    assert_problem(register_raw, 422, field)
    assert answer.json()["detail"]
    assert api.get("/api/instances").json() == []
    assert api.get("/api/services").json() == []


@pytest.mark.parametrize(("check", "expected"), [
    ({"type": "tcp", "rise": True}, "check.rise: must be a whole number from 1 to 100, got true"),
    ({"type": "http", "tls_verify": None}, "check.tls_verify: must be true or false, got null"),
])
def test_rejected_values_spelled_as_json(api, check, expected):
    answer = api.post("/api/services/svc/instances", json={"address": "10.0.0.5:80", "protocol": "Http", "check": check})
    assert_problem(answer, 422)
    assert expected in answer.json()["detail"]
    weight = api.post("/api/services/svc/instances", json={"address": "10.0.0.5:80", "protocol": "Http", "weight": True})
    assert "got true" in weight.json()["detail"]


def test_invalid_json_is_400(api):
    answer = api.post("/api/services/svc/instances", content=b"{not json", headers={"Content-Type": "application/json"})
    assert_problem(answer, 400)
    assert api.get("/api/services").json() == []


def test_body_over_one_mebibyte_is_413(api):
    body = json.dumps({"address": "10.0.0.5:80", "protocol": "Http", "metadata": {"k": "x" * (1024 * 1024)}})
    answer = api.post("/api/services/svc/instances", content=body.encode(), headers={"Content-Type": "application/json"})
    assert_problem(answer, 413)
    assert api.get("/api/services").json() == []


def test_framework_errors_are_problems(api):
    assert_problem(api.get("/api/no-such-route"), 404)
    assert_problem(api.put("/api/services"), 405)


@pytest.mark.parametrize(
    "path, field",
    [
        ("/api/instances/not-a-uuid", "id"),
        ("/api/services/UPPER", "code"),
        ("/api/discover/UPPER", "code"),
    ],
)
def test_bad_path_parameters(api, path, field):
    assert_problem(api.get(path), 422, field)


@pytest.mark.parametrize(
    "params, field",
    [({"service": "Bad"}, "service"), ({"health": "Sick"}, "health")],
)
def test_bad_query_parameters(api, params, field):
    assert_problem(api.get("/api/instances", params=params), 422, field)


@pytest.mark.parametrize(
    "body, field",
    [
        ({"status": "Unknown"}, "status"),
        ({"status": "fine"}, "status"),
        ({}, "status"),
        ({"status": "Healthy", "output": 5}, "output"),
    ],
)
def test_health_report_rejects_bad_input(api, body, field):
    instance = register(api, "svc", "10.0.0.5:80", check={"type": "none"}).json()
    assert_problem(api.post(f"/api/instances/{instance['id']}/health", json=body), 422, field)
    assert api.get(f"/api/instances/{instance['id']}").json()["health"] == "Unknown"


def test_closed_port_instance_turns_unhealthy(api):
    instance = register(api, "down-svc", f"127.0.0.1:{closed_port()}", "Tcp", check={"type": "tcp"}).json()
    unhealthy = wait_until(
        lambda: api.get(f"/api/instances/{instance['id']}").json()["health"] == "Unhealthy", timeout=5
    )
    assert unhealthy
    output = api.get(f"/api/instances/{instance['id']}").json()["output"]
    assert "refused" in output.lower()


@pytest.mark.parametrize("body", [b'{"address": "10.0.0.5:80", "protocol": "Http", "weight": NaN}',
                                  b'{"address": "10.0.0.5:80", "protocol": "Http", "weight": 1e400}'])
def test_non_json_numbers_are_400(api, body):
    answer = api.post("/api/services/svc/instances", content=body, headers={"Content-Type": "application/json"})
    assert_problem(answer, 400)


def test_second_server_on_taken_ports_changes_nothing(server, tmp_path):
    import subprocess
    import sys

    data_dir = tmp_path / "second"
    result = subprocess.run(
        [sys.executable, "-m", "logpose.server.main", "--data-dir", str(data_dir),
         "--http-listen", f"127.0.0.1:{server.http_port}", "--dns-listen", f"127.0.0.1:{server.dns_port}"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 4
    assert result.stderr.strip().splitlines()[-1].startswith("logpose-server: cannot listen for HTTP")
    assert "Address already in use" in result.stderr
    assert not data_dir.exists()
