"""Health features through a real server process: drain, history, status, HTTP checks."""

from __future__ import annotations

import time

import dns.message
import dns.query
import dns.rcode

from conftest import assert_problem, closed_port, wait_until

ZONE = "logpose.internal"


def resolve(server, name: str) -> dns.message.Message:
    return dns.query.udp(dns.message.make_query(name, "SRV"), "127.0.0.1", port=server.dns_port, timeout=3)


def register(api, service: str, body: dict) -> dict:
    answer = api.post(f"/api/services/{service}/instances", json=body)
    assert answer.status_code == 201, answer.text
    return answer.json()


def test_drain_and_undrain(server, api):
    instance = register(api, "web", {"address": f"127.0.0.1:{server.http_port}", "protocol": "Http"})
    assert wait_until(lambda: api.get("/api/discover/web").json(), timeout=5)

    drained = api.post(f"/api/instances/{instance['id']}/maintenance", json={"enabled": True, "reason": "patching"})
    assert drained.status_code == 200
    assert drained.json()["maintenance"]["enabled"] is True
    assert drained.json()["maintenance"]["reason"] == "patching"
    assert api.get("/api/discover/web").json() == []
    assert resolve(server, f"web.{ZONE}").rcode() == dns.rcode.NXDOMAIN
    assert api.get(f"/api/instances/{instance['id']}").json()["health"] == "Healthy", "checks keep running"

    undrained = api.post(f"/api/instances/{instance['id']}/maintenance", json={"enabled": False})
    assert undrained.json()["maintenance"] == {"enabled": False, "reason": None, "since": None}
    assert [item["id"] for item in api.get("/api/discover/web").json()] == [instance["id"]]
    assert resolve(server, f"web.{ZONE}").rcode() == dns.rcode.NOERROR


def test_drain_survives_restart(server, api):
    instance = register(api, "web", {"address": "10.0.0.5:80", "protocol": "Http", "check": {"type": "none"}})
    api.post(f"/api/instances/{instance['id']}/maintenance", json={"enabled": True, "reason": "rack move"})
    server.kill()
    server.start()
    with server.client() as fresh:
        assert fresh.get(f"/api/instances/{instance['id']}").json()["maintenance"]["reason"] == "rack move"


def test_maintenance_rejects_bad_input(server, api):
    instance = register(api, "web", {"address": "10.0.0.5:80", "protocol": "Http", "check": {"type": "none"}})
    path = f"/api/instances/{instance['id']}/maintenance"
    assert_problem(api.post(path, json={}), 422, "enabled")
    assert_problem(api.post(path, json={"enabled": "yes"}), 422, "enabled")
    assert_problem(api.post(path, json={"enabled": True, "reason": 5}), 422, "reason")
    assert_problem(api.post(path, json={"enabled": False, "reason": "x"}), 422, "reason")
    assert_problem(api.post("/api/instances/4b0e1c3e-8a55-4a8e-9d6f-0e7a2b1c9d00/maintenance",
                            json={"enabled": True}), 404)
    assert api.get(f"/api/instances/{instance['id']}").json()["maintenance"]["enabled"] is False


def test_history_records_transitions(server, api):
    instance = register(api, "web", {"address": "10.0.0.5:80", "protocol": "Http", "check": {"type": "none"}})
    for status in ("Healthy", "Unhealthy", "Unhealthy", "Healthy"):
        api.post(f"/api/instances/{instance['id']}/health", json={"status": status, "output": status.lower()})
    history = api.get(f"/api/instances/{instance['id']}/history").json()
    assert [(entry["from"], entry["to"]) for entry in history] == [
        ("Unknown", "Healthy"), ("Healthy", "Unhealthy"), ("Unhealthy", "Healthy"),
    ]
    assert history[-1]["output"] == "healthy"
    shown = api.get(f"/api/instances/{instance['id']}").json()
    assert shown["check_status"]["last_success_at"] is not None


def test_report_for_unknown_instance_asks_to_register(server, api):
    answer = api.post("/api/instances/4b0e1c3e-8a55-4a8e-9d6f-0e7a2b1c9d00/health", json={"status": "Healthy"})
    problem = assert_problem(answer, 404)
    assert problem["type"] == "urn:logpose:problem:instance-not-registered"


def test_http_check_against_real_endpoint(server, api):
    good = register(api, "web", {"address": f"127.0.0.1:{server.http_port}", "protocol": "Http",
                                 "check": {"type": "http", "path": "/healthz"}})
    bad = register(api, "web", {"address": f"127.0.0.1:{server.http_port}", "protocol": "Grpc",
                                "check": {"type": "http", "path": "/no-such-page"}})
    assert wait_until(lambda: api.get(f"/api/instances/{bad['id']}").json()["health"] == "Unhealthy", timeout=5)
    assert "404" in api.get(f"/api/instances/{bad['id']}").json()["output"]
    assert [item["id"] for item in api.get("/api/discover/web").json()] == [good["id"]]


def test_check_timeout_must_be_below_interval(server, api):
    answer = api.post("/api/services/web/instances", json={
        "address": "127.0.0.1:1", "protocol": "Tcp", "check": {"type": "tcp", "interval": 0.2}})
    problem = assert_problem(answer, 422, "check.timeout")
    assert "0.3 >= 0.2" in problem["detail"]
    assert api.get("/api/instances").json() == []


def test_status_shows_guard_and_counts(server, api):
    register(api, "web", {"address": "10.0.0.5:80", "protocol": "Http", "check": {"type": "none"}})
    status = api.get("/api/status").json()
    assert status["instances"]["total"] == 1
    assert status["instances"]["Unknown"] == 1
    assert status["mass_failure_guard"]["enabled"] is True
    assert status["mass_failure_guard"]["active"] is False


def test_deregister_after(server_factory):
    server = server_factory(extra_args=["--deregister-after", "1"])
    with server.client() as api:
        instance = register(api, "down", {"address": f"127.0.0.1:{closed_port()}", "protocol": "Tcp"})
        gone = wait_until(lambda: api.get(f"/api/instances/{instance['id']}").status_code == 404, timeout=6)
        assert gone
    assert "deregister_after" in server.log()


def test_reports_without_transition_keep_the_index(server, api):
    instance = register(api, "steady", {"address": "10.40.0.1:80", "protocol": "Http", "check": {"type": "none"}})
    path = f"/api/instances/{instance['id']}/health"
    assert api.post(path, json={"status": "Healthy", "output": "up"}).status_code == 200

    def index() -> str:
        return api.get("/api/discover/steady").headers["X-LogPose-Index"]

    def serial() -> int:
        query = dns.message.make_query(ZONE, "SOA")
        reply = dns.query.udp(query, "127.0.0.1", port=server.dns_port, timeout=3)
        return reply.answer[0][0].serial

    # The transition to Healthy is written behind; wait until its index settles.
    assert wait_until(lambda: index() == index(), timeout=5)
    time.sleep(0.3)
    before = (index(), serial())
    for output in ("up", "still up", "up again"):
        assert api.post(path, json={"status": "Healthy", "output": output}).status_code == 200
    time.sleep(0.3)

    assert (index(), serial()) == before
    assert api.get(f"/api/instances/{instance['id']}").json()["output"] == "up again"
