"""A real server process probing real TCP listeners, queried by DNS and HTTP."""

from __future__ import annotations

import socket

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from conftest import TcpListener, closed_port, wait_until

ZONE = "logpose.internal"
PROBE_INTERVAL = 0.5  # seconds, as the server fixture configures


def query(server, name: str, rdtype: str, *, tcp: bool = False, payload: int | None = None) -> dns.message.Message:
    message = dns.message.make_query(name, rdtype, use_edns=payload is not None, payload=payload or 512)
    send = dns.query.tcp if tcp else dns.query.udp
    return send(message, "127.0.0.1", port=server.dns_port, timeout=3)


def srv_ports(answer: dns.message.Message) -> set[int]:
    return {record.port for rrset in answer.answer for record in rrset if rrset.rdtype == dns.rdatatype.SRV}


def http_ids(api, code: str) -> set[str]:
    return {item["id"] for item in api.get(f"/api/discover/{code}").json()}


def register(api, code: str, address: str, protocol: str = "Http", check: str = "tcp") -> dict:
    body = {"address": address, "protocol": protocol, "check": {"type": check}}
    answer = api.post(f"/api/services/{code}/instances", json=body)
    assert answer.status_code in (200, 201), answer.text
    return answer.json()


def test_only_healthy_instances_answered(server, api):
    listeners = [TcpListener(), TcpListener()]
    try:
        healthy = [register(api, "web", listener.address) for listener in listeners]
        dead = register(api, "web", f"127.0.0.1:{closed_port()}")
        expected_ports = {listener.port for listener in listeners}

        # Within two probe intervals, both front ends answer the listeners and only them.
        ready = wait_until(lambda: srv_ports(query(server, f"web.{ZONE}", "SRV")) == expected_ports,
                           timeout=2 * PROBE_INTERVAL + 1)
        assert ready, server.log()
        assert srv_ports(query(server, f"web.{ZONE}", "SRV", tcp=True)) == expected_ports
        assert http_ids(api, "web") == {instance["id"] for instance in healthy}
        assert dead["id"] not in http_ids(api, "web")
        assert api.get(f"/api/instances/{dead['id']}").json()["health"] == "Unhealthy"

        a_answer = query(server, f"web.{ZONE}", "A")
        assert {record.address for rrset in a_answer.answer for record in rrset} == {"127.0.0.1"}

        srv_answer = query(server, f"_http._tcp.web.{ZONE}", "SRV")
        assert srv_ports(srv_answer) == expected_ports

        target = f"{healthy[0]['id']}.web.{ZONE}"
        instance_answer = query(server, target, "A")
        assert instance_answer.rcode() == dns.rcode.NOERROR
        assert [record.address for rrset in instance_answer.answer for record in rrset] == ["127.0.0.1"]

        # Closing a listener drops its instance from DNS and JSON.
        listeners[0].close()
        dropped = wait_until(lambda: srv_ports(query(server, f"web.{ZONE}", "SRV")) == {listeners[1].port},
                             timeout=3 * PROBE_INTERVAL + 2)
        assert dropped, server.log()
        assert http_ids(api, "web") == {healthy[1]["id"]}
        assert query(server, target, "A").rcode() == dns.rcode.NXDOMAIN
    finally:
        for listener in listeners:
            listener.close()


def test_service_without_healthy_instance_is_nxdomain(server, api):
    register(api, "down", f"127.0.0.1:{closed_port()}")
    wait_until(lambda: api.get("/api/instances?health=Unhealthy").json(), timeout=3)
    answer = query(server, f"down.{ZONE}", "SRV")
    assert answer.rcode() == dns.rcode.NXDOMAIN
    assert [rrset.rdtype for rrset in answer.authority] == [dns.rdatatype.SOA]


def test_zone_apex_and_refused(server):
    soa = query(server, ZONE, "SOA")
    assert soa.rcode() == dns.rcode.NOERROR
    assert soa.flags & dns.flags.AA
    assert soa.answer[0].rdtype == dns.rdatatype.SOA
    ns = query(server, ZONE, "NS")
    assert str(ns.answer[0][0].target) == f"ns.{ZONE}."
    assert query(server, "example.com", "A").rcode() == dns.rcode.REFUSED
    unknown = query(server, f"nothing.{ZONE}", "A")
    assert unknown.rcode() == dns.rcode.NXDOMAIN
    assert unknown.authority[0].rdtype == dns.rdatatype.SOA


def test_ipv4_service_aaaa_is_nodata(server, api, tcp_listener):
    register(api, "v4only", tcp_listener.address)
    assert wait_until(lambda: query(server, f"v4only.{ZONE}", "A").answer, timeout=3)
    answer = query(server, f"v4only.{ZONE}", "AAAA")
    assert answer.rcode() == dns.rcode.NOERROR
    assert answer.answer == []
    assert answer.authority[0].rdtype == dns.rdatatype.SOA


def test_large_answer_truncated_on_udp_full_on_tcp(server, api):
    count = 40
    listeners = [TcpListener() for _ in range(count)]
    try:
        for listener in listeners:
            register(api, "big", listener.address)
        assert wait_until(lambda: len(api.get("/api/discover/big").json()) == count, timeout=5)

        plain = query(server, f"big.{ZONE}", "SRV")
        assert plain.flags & dns.flags.TC
        assert plain.answer, "records that fit are answered, not an empty truncated answer"
        assert 0 < len(plain.answer[0]) < count

        edns = query(server, f"big.{ZONE}", "SRV", payload=1232)
        assert edns.edns == 0
        assert len(edns.answer[0]) > len(plain.answer[0])

        full = query(server, f"big.{ZONE}", "SRV", tcp=True)
        assert not full.flags & dns.flags.TC
        assert len(full.answer[0]) == count
    finally:
        for listener in listeners:
            listener.close()


def test_malformed_packet_does_not_stop_server(server, api, tcp_listener):
    register(api, "steady", tcp_listener.address)
    assert wait_until(lambda: query(server, f"steady.{ZONE}", "A").answer, timeout=3)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        for garbage in (b"\x00", b"\x12\x34" + b"\xff" * 40, b"\x00" * 12 + b"\xc0\x0c" * 10):
            sender.sendto(garbage, ("127.0.0.1", server.dns_port))
    answer = query(server, f"steady.{ZONE}", "A")
    assert answer.rcode() == dns.rcode.NOERROR
    assert answer.answer


def test_registry_survives_restart(server_factory, tcp_listener):
    server = server_factory()
    with server.client() as api:
        instance = register(api, "keep", tcp_listener.address)
        assert wait_until(lambda: http_ids(api, "keep"), timeout=3)
    assert server.stop() == 0
    server.start()
    # Health was persisted, so the restarted server answers at once.
    with server.client() as api:
        assert api.get(f"/api/instances/{instance['id']}").json()["id"] == instance["id"]
        assert http_ids(api, "keep") == {instance["id"]}
    assert query(server, f"keep.{ZONE}", "A").answer


def test_acknowledged_registrations_survive_kill9(server_factory):
    server = server_factory()
    with server.client() as api:
        ids = {register(api, "durable", f"10.0.0.{number}:8080", "Tcp", check="none")["id"] for number in range(1, 21)}
        api.post("/api/services", json={"code": "empty-svc", "name": "Empty"})
    server.kill()
    server.start()
    with server.client() as api:
        stored = {item["id"] for item in api.get("/api/services/durable/instances").json()}
        assert stored == ids
        assert api.get("/api/services/empty-svc").json()["name"] == "Empty"


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_mixed_case_question_echoed(server, api, tcp_listener, transport):
    register(api, "casey", tcp_listener.address)
    assert wait_until(lambda: query(server, f"casey.{ZONE}", "A").answer, timeout=3)
    answer = query(server, "CaSeY.LogPose.Internal", "A", tcp=transport == "tcp")
    assert answer.rcode() == dns.rcode.NOERROR
    assert answer.question[0].name.to_text() == "CaSeY.LogPose.Internal."


def test_data_files_private_and_node_id_kept(server_factory):
    import os
    import stat

    server = server_factory()
    with server.client() as api:
        first_id = api.get("/api/status").json()["node"]["id"]
    assert stat.S_IMODE(os.stat(server.data_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(server.data_dir / "logpose.db").st_mode) == 0o600
    server.stop()
    server.start()
    with server.client() as api:
        assert api.get("/api/status").json()["node"]["id"] == first_id
