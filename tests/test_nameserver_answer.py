"""Bytes in, answer out: the DNS Responder against a real in-memory Registry, no sockets."""

from __future__ import annotations

import struct

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import pytest

from logpose.errors import ConfigError
from logpose.model import Check, Health, Instance, Protocol, Service, parse_address
from logpose.nameserver import Responder, ZoneSettings
from logpose.registry import CatalogSnapshot, Registry

ZONE = "logpose.internal"
INDEX = 2**32 + 7  # the SOA serial is the change index mod 2^32, so 7
TTL = 30
NEGATIVE_TTL = 3

HTTP_1 = "11111111-1111-4111-8111-111111111111"  # 10.0.0.1:8080 Http, weight 10
HTTP_2 = "22222222-2222-4222-8222-222222222222"  # 10.0.0.2:8080 Http
GRPC_1 = "33333333-3333-4333-8333-333333333333"  # 10.0.0.1:9090 Grpc, same IP as HTTP_1
HTTP_V6 = "44444444-4444-4444-8444-444444444444"  # [2001:db8::1]:8080 Http
HTTPS_HOST = "55555555-5555-4555-8555-555555555555"  # api.example.com:443 Https
SICK = "66666666-6666-4666-8666-666666666666"  # 10.0.0.9 Http, Unhealthy
NEW = "77777777-7777-4777-8777-777777777777"  # 10.0.0.8 Http, Unknown
TCP_1 = "88888888-8888-4888-8888-888888888888"  # v4only: 10.1.0.1:5432 Tcp
UDP_1 = "99999999-9999-4999-8999-999999999999"  # udp-svc: 10.2.0.1:514 Udp
DOWN_1 = "aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa"  # down: 10.3.0.1 Unhealthy only


def make_instance(
    instance_id: str,
    service: str,
    address: str,
    protocol: Protocol,
    health: Health = Health.HEALTHY,
    weight: int = 1,
) -> Instance:
    return Instance(
        id=instance_id,
        service=service,
        address=parse_address(address),
        protocol=protocol,
        health=health,
        check=Check(),
        weight=weight,
    )


def make_registry(extra: list[Instance] | None = None, index: int = INDEX) -> Registry:
    instances = [
        make_instance(HTTP_1, "auth-svc", "10.0.0.1:8080", Protocol.HTTP, weight=10),
        make_instance(HTTP_2, "auth-svc", "10.0.0.2:8080", Protocol.HTTP),
        make_instance(GRPC_1, "auth-svc", "10.0.0.1:9090", Protocol.GRPC),
        make_instance(HTTP_V6, "auth-svc", "[2001:db8::1]:8080", Protocol.HTTP),
        make_instance(HTTPS_HOST, "auth-svc", "api.example.com:443", Protocol.HTTPS),
        make_instance(SICK, "auth-svc", "10.0.0.9:8080", Protocol.HTTP, Health.UNHEALTHY),
        make_instance(NEW, "auth-svc", "10.0.0.8:8080", Protocol.HTTP, Health.UNKNOWN),
        make_instance(TCP_1, "v4only", "10.1.0.1:5432", Protocol.TCP),
        make_instance(UDP_1, "udp-svc", "10.2.0.1:514", Protocol.UDP),
        make_instance(DOWN_1, "down", "10.3.0.1:80", Protocol.HTTP, Health.UNHEALTHY),
        *(extra or []),
    ]
    codes = sorted({instance.service for instance in instances} | {"empty"})
    services = [Service(code=code, name=code, created_index=1, modify_index=1) for code in codes]
    registry = Registry(None)
    registry.load_snapshot(CatalogSnapshot(services=services, instances=instances, index=index))
    return registry


def make_responder(registry: Registry | None = None, **settings) -> Responder:
    settings.setdefault("ttl", TTL)
    settings.setdefault("negative_ttl", NEGATIVE_TTL)
    settings.setdefault("ns_addresses", ["127.0.0.1", "::1"])
    return Responder(registry or make_registry(), ZoneSettings(**settings))


@pytest.fixture
def responder() -> Responder:
    return make_responder()


def ask(
    responder: Responder,
    name: str,
    rdtype: str | int = "A",
    transport: str = "udp",
    **query_options,
) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **query_options)
    wire = responder.respond(query.to_wire(), transport)
    assert wire is not None
    return dns.message.from_wire(wire)


def answer_texts(response: dns.message.Message, rdtype: str) -> set[str]:
    return {
        rdata.to_text()
        for rrset in response.answer
        if rrset.rdtype == dns.rdatatype.from_text(rdtype)
        for rdata in rrset
    }


def answer_records(response: dns.message.Message) -> list:
    return [rdata for rrset in response.answer for rdata in rrset]


def additional_names(response: dns.message.Message) -> list[str]:
    return [rrset.name.to_text() for rrset in response.additional for _ in rrset]


def instance_name(instance_id: str, service: str = "auth-svc") -> str:
    return f"{instance_id}.{service}.{ZONE}."


def assert_negative(response: dns.message.Message, rcode: int) -> None:
    assert response.rcode() == rcode
    assert response.answer == []
    assert response.flags & dns.flags.AA
    assert len(response.authority) == 1
    soa_rrset = response.authority[0]
    assert soa_rrset.rdtype == dns.rdatatype.SOA
    assert soa_rrset.name == dns.name.from_text(ZONE)
    assert len(soa_rrset) == 1
    assert soa_rrset.ttl == NEGATIVE_TTL


# ----- positive answers ----------------------------------------------------


@pytest.mark.parametrize(
    ("name", "rdtype", "expected"),
    [
        # 10.0.0.1 is shared by HTTP_1 and GRPC_1 and comes once. The hostname instance is left out.
        (f"auth-svc.{ZONE}", "A", {"10.0.0.1", "10.0.0.2"}),
        (f"auth-svc.{ZONE}", "AAAA", {"2001:db8::1"}),
        (f"v4only.{ZONE}", "A", {"10.1.0.1"}),
        (f"{HTTP_1}.auth-svc.{ZONE}", "A", {"10.0.0.1"}),
        (f"{HTTP_V6}.auth-svc.{ZONE}", "AAAA", {"2001:db8::1"}),
        (f"{HTTP_1.upper()}.auth-svc.{ZONE}", "A", {"10.0.0.1"}),
        (f"ns.{ZONE}", "A", {"127.0.0.1"}),
        (f"ns.{ZONE}", "AAAA", {"::1"}),
        (ZONE, "NS", {f"ns.{ZONE}."}),
    ],
)
def test_positive_answer(responder, name, rdtype, expected):
    response = ask(responder, name, rdtype)

    assert response.rcode() == dns.rcode.NOERROR
    assert response.flags & dns.flags.AA
    assert answer_texts(response, rdtype) == expected
    assert len(answer_records(response)) == len(expected)
    assert all(rrset.ttl == TTL for rrset in response.answer)
    assert response.authority == []


@pytest.mark.parametrize(
    ("name", "expected_ids"),
    [
        (f"auth-svc.{ZONE}", {HTTP_1, HTTP_2, GRPC_1, HTTP_V6, HTTPS_HOST}),
        (f"_http._tcp.auth-svc.{ZONE}", {HTTP_1, HTTP_2, HTTP_V6}),
        (f"_grpc._tcp.auth-svc.{ZONE}", {GRPC_1}),
        (f"_https._tcp.auth-svc.{ZONE}", {HTTPS_HOST}),
        (f"_tcp._tcp.v4only.{ZONE}", {TCP_1}),
        (f"_udp._udp.udp-svc.{ZONE}", {UDP_1}),
    ],
)
def test_srv_answer_per_healthy_instance(name, expected_ids):
    registry = make_registry()
    response = ask(make_responder(registry), name, "SRV")

    assert response.rcode() == dns.rcode.NOERROR
    assert response.flags & dns.flags.AA
    expected = {}
    for instance_id in expected_ids:
        instance = registry.get_instance(instance_id)
        if instance_id == HTTPS_HOST:
            target = "api.example.com."
        else:
            target = instance_name(instance_id, instance.service)
        expected[target] = (1, instance.weight, instance.address.port)
    records = answer_records(response)
    assert len(records) == len(expected_ids)
    assert {record.target.to_text(): (record.priority, record.weight, record.port) for record in records} == expected
    assert all(rrset.ttl == TTL for rrset in response.answer)


def test_srv_additional_has_target_addresses(responder):
    response = ask(responder, f"auth-svc.{ZONE}", "SRV", use_edns=0)

    additional = {
        (rrset.name.to_text(), dns.rdatatype.to_text(rrset.rdtype), rdata.to_text())
        for rrset in response.additional
        for rdata in rrset
    }
    assert additional == {
        (instance_name(HTTP_1), "A", "10.0.0.1"),
        (instance_name(HTTP_2), "A", "10.0.0.2"),
        (instance_name(GRPC_1), "A", "10.0.0.1"),
        (instance_name(HTTP_V6), "AAAA", "2001:db8::1"),
    }
    names = additional_names(response)
    assert len(names) == len(set(names))
    assert all(rrset.ttl == TTL for rrset in response.additional)


def test_srv_hostname_target_has_no_additional(responder):
    response = ask(responder, f"_https._tcp.auth-svc.{ZONE}", "SRV", use_edns=0)

    assert answer_texts(response, "SRV") == {"1 1 443 api.example.com."}
    assert response.additional == []


def test_hostname_instance_is_cname(responder):
    for rdtype in ("A", "AAAA", "CNAME", "TXT"):
        response = ask(responder, f"{HTTPS_HOST}.auth-svc.{ZONE}", rdtype)

        assert response.rcode() == dns.rcode.NOERROR
        assert answer_texts(response, "CNAME") == {"api.example.com."}


def test_apex_soa_fields(responder):
    response = ask(responder, ZONE, "SOA")

    assert response.rcode() == dns.rcode.NOERROR
    [soa_rrset] = response.answer
    [soa] = list(soa_rrset)
    assert soa.mname.to_text() == f"ns.{ZONE}."
    assert soa.rname.to_text() == f"hostmaster.{ZONE}."
    assert soa.serial == 7
    assert soa.minimum == NEGATIVE_TTL
    assert soa_rrset.ttl == NEGATIVE_TTL
    assert soa.refresh > soa.retry > 0
    assert soa.expire > soa.refresh


def test_apex_ns_has_glue(responder):
    response = ask(responder, ZONE, "NS")

    glue = {rdata.to_text() for rrset in response.additional for rdata in rrset}
    assert glue == {"127.0.0.1", "::1"}
    assert set(additional_names(response)) == {f"ns.{ZONE}."}


def test_soa_serial_follows_index():
    responder = make_responder(make_registry(index=41))

    [soa_rrset] = ask(responder, ZONE, "SOA").answer

    assert list(soa_rrset)[0].serial == 41


def test_custom_zone_name():
    responder = make_responder(domain="sd.example.")

    response = ask(responder, "auth-svc.sd.example", "A")
    assert answer_texts(response, "A") == {"10.0.0.1", "10.0.0.2"}
    srv = ask(responder, "auth-svc.sd.example", "SRV")
    assert f"{HTTP_1}.auth-svc.sd.example." in {record.target.to_text() for record in answer_records(srv)}
    assert ask(responder, f"auth-svc.{ZONE}", "A").rcode() == dns.rcode.REFUSED


def test_any_answers_one_rrset(responder):
    service = ask(responder, f"auth-svc.{ZONE}", "ANY")
    apex = ask(responder, ZONE, "ANY")
    hostname_only = make_responder(
        make_registry([make_instance("bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb", "named", "db.example.com:5432", Protocol.TCP)])
    )
    named = ask(hostname_only, f"named.{ZONE}", "ANY")
    empty_non_terminal = ask(responder, f"_tcp.auth-svc.{ZONE}", "ANY")

    assert [dns.rdatatype.to_text(rrset.rdtype) for rrset in service.answer] == ["A"]
    assert [dns.rdatatype.to_text(rrset.rdtype) for rrset in apex.answer] == ["SOA"]
    assert [dns.rdatatype.to_text(rrset.rdtype) for rrset in named.answer] == ["SRV"]
    assert_negative(empty_non_terminal, dns.rcode.NOERROR)


# ----- NXDOMAIN and NODATA ---------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        f"nothing.{ZONE}",
        f"down.{ZONE}",  # known service, no healthy instance
        f"empty.{ZONE}",  # known service, no instance at all
        f"{DOWN_1}.down.{ZONE}",  # below a service with no healthy instance (RFC 8020)
        f"_tcp.down.{ZONE}",
        f"_http._tcp.down.{ZONE}",
        f"{SICK}.auth-svc.{ZONE}",  # Unhealthy instance
        f"{NEW}.auth-svc.{ZONE}",  # Unknown instance
        f"{TCP_1}.auth-svc.{ZONE}",  # instance of another service
        f"ffffffff-ffff-4fff-8fff-ffffffffffff.auth-svc.{ZONE}",
        f"_udp.auth-svc.{ZONE}",  # no Udp instance
        f"_udp._udp.auth-svc.{ZONE}",
        f"_tcp._tcp.auth-svc.{ZONE}",  # no Tcp-protocol instance
        f"_smtp._tcp.auth-svc.{ZONE}",
        f"x._http._tcp.auth-svc.{ZONE}",
        f"x.{HTTP_1}.auth-svc.{ZONE}",
        f"x.ns.{ZONE}",
        f"v4only.auth-svc.{ZONE}",  # another service's name below this one answers nothing
        f"auth-svc.v4only.{ZONE}",
    ],
)
@pytest.mark.parametrize("rdtype", ["A", "SRV"])
def test_nxdomain_with_soa(responder, name, rdtype):
    assert_negative(ask(responder, name, rdtype), dns.rcode.NXDOMAIN)


@pytest.mark.parametrize(
    ("name", "rdtype"),
    [
        (f"v4only.{ZONE}", "AAAA"),  # IPv4-only service
        (f"auth-svc.{ZONE}", "TXT"),
        (f"auth-svc.{ZONE}", "MX"),
        (f"_http._tcp.auth-svc.{ZONE}", "A"),  # SRV name only has SRV
        (f"_tcp.auth-svc.{ZONE}", "A"),  # empty non-terminal (RFC 8020)
        (f"_tcp.auth-svc.{ZONE}", "SRV"),
        (f"_udp.udp-svc.{ZONE}", "SRV"),
        (f"{HTTP_1}.auth-svc.{ZONE}", "AAAA"),
        (f"{HTTP_1}.auth-svc.{ZONE}", "SRV"),
        (ZONE, "MX"),
        (ZONE, "A"),
        (f"ns.{ZONE}", "TXT"),
    ],
)
def test_nodata_with_soa(responder, name, rdtype):
    assert_negative(ask(responder, name, rdtype), dns.rcode.NOERROR)


def test_service_of_hostname_instances_has_no_address():
    responder = make_responder(
        make_registry([make_instance("bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb", "named", "db.example.com:5432", Protocol.TCP)])
    )

    assert_negative(ask(responder, f"named.{ZONE}", "A"), dns.rcode.NOERROR)
    assert answer_texts(ask(responder, f"named.{ZONE}", "SRV"), "SRV") == {"1 1 5432 db.example.com."}


def test_ns_without_addresses_is_nodata():
    responder = make_responder(ns_addresses=[])

    assert_negative(ask(responder, f"ns.{ZONE}", "A"), dns.rcode.NOERROR)
    assert ask(responder, ZONE, "NS").additional == []


# ----- REFUSED and header flags ---------------------------------------------


@pytest.mark.parametrize("name", ["example.com", "internal", "xlogpose.internal", "logpose.internal.example.com", "."])
def test_outside_zone_refused(responder, name):
    response = ask(responder, name, "A")

    assert response.rcode() == dns.rcode.REFUSED
    assert not response.flags & dns.flags.RA
    assert not response.flags & dns.flags.AA
    assert response.answer == []
    assert response.authority == []


def test_class_other_than_in_refused(responder):
    response = ask(responder, f"auth-svc.{ZONE}", "A", rdclass=dns.rdataclass.CH)

    assert response.rcode() == dns.rcode.REFUSED


@pytest.mark.parametrize("rdtype", ["AXFR", "IXFR"])
def test_zone_transfer_refused(responder, rdtype):
    assert ask(responder, ZONE, rdtype, transport="tcp").rcode() == dns.rcode.REFUSED


@pytest.mark.parametrize("flags", [0, dns.flags.RD, dns.flags.RD | dns.flags.CD])
def test_header_flags(responder, flags):
    response = ask(responder, f"auth-svc.{ZONE}", "A", flags=flags)

    assert response.flags & dns.flags.QR
    assert response.flags & dns.flags.AA
    assert not response.flags & dns.flags.RA
    assert not response.flags & dns.flags.TC
    assert bool(response.flags & dns.flags.RD) == bool(flags & dns.flags.RD)
    assert bool(response.flags & dns.flags.CD) == bool(flags & dns.flags.CD)


def test_mixed_case_question_echoed(responder):
    asked = "AuTh-SvC.LoGpOsE.InTeRnAl."
    query = dns.message.make_query(asked, "A")
    response = dns.message.from_wire(responder.respond(query.to_wire(), "udp"))

    assert response.question[0].name.to_text() == asked
    assert {rrset.name.to_text() for rrset in response.answer} == {asked}
    assert response.id == query.id


def test_mixed_case_question_bytes_exact(responder):
    query = dns.message.make_query("AuTh-SvC.LoGpOsE.InTeRnAl.", "SRV")
    query_wire = query.to_wire()
    question_end = query_wire.index(b"\x00", 12) + 5

    wire = responder.respond(query_wire, "udp")

    assert wire[12:question_end] == query_wire[12:question_end]


# ----- EDNS0 -----------------------------------------------------------------


def test_edns_opt_echoed(responder):
    response = ask(responder, f"auth-svc.{ZONE}", "A", use_edns=0, payload=4096)

    assert response.edns == 0
    assert response.payload == 1232


def test_no_edns_no_opt(responder):
    response = ask(responder, f"auth-svc.{ZONE}", "A")

    assert response.edns == -1
    assert response.opt is None


def test_edns_on_negative_answers(responder):
    nxdomain = ask(responder, f"nothing.{ZONE}", "A", use_edns=0)
    refused = ask(responder, "example.com", "A", use_edns=0)

    assert nxdomain.edns == 0
    assert refused.edns == 0


def test_edns_do_bit_copied(responder):
    response = ask(responder, f"auth-svc.{ZONE}", "A", use_edns=0, want_dnssec=True)

    assert response.ednsflags & dns.flags.DO


def test_edns_version_1_badvers(responder):
    response = ask(responder, f"auth-svc.{ZONE}", "A", use_edns=1)

    assert response.rcode() == dns.rcode.BADVERS
    assert response.edns == 0
    assert response.answer == []


def test_custom_max_udp_payload():
    responder = make_responder(max_udp_payload=4096)

    assert ask(responder, f"auth-svc.{ZONE}", "A", use_edns=0).payload == 4096


# ----- size limits and truncation --------------------------------------------


def big_service_instances(count: int, code: str = "big") -> list[Instance]:
    return [
        make_instance(f"{index:08x}-0000-4000-8000-000000000000", code, f"[2001:db8::{index + 1:x}]:8080", Protocol.HTTP)
        for index in range(count)
    ]


def test_udp_without_edns_drops_additional_first():
    # Five SRV records (about 80 bytes each) fit in 512 bytes, but their five AAAA records do not.
    responder = make_responder(make_registry(big_service_instances(5)))

    response = ask(responder, f"big.{ZONE}", "SRV")
    wire_size = len(responder.respond(dns.message.make_query(f"big.{ZONE}", "SRV").to_wire(), "udp"))

    assert not response.flags & dns.flags.TC
    assert len(answer_records(response)) == 5
    assert len(response.additional) < 5
    targets = {record.target.to_text() for record in answer_records(response)}
    assert set(additional_names(response)) <= targets
    assert wire_size <= 512


@pytest.mark.parametrize(
    ("query_options", "limit"),
    [
        ({}, 512),
        ({"use_edns": 0, "payload": 512}, 512),
        ({"use_edns": 0, "payload": 100}, 512),  # below 512 counts as 512 (RFC 6891 §6.2.5)
        ({"use_edns": 0, "payload": 1232}, 1232),
        ({"use_edns": 0, "payload": 4096}, 1232),  # capped at our max_udp_payload
    ],
)
def test_udp_truncates_answer_with_tc(query_options, limit):
    responder = make_responder(make_registry(big_service_instances(100)))
    query = dns.message.make_query(f"big.{ZONE}", "SRV", **query_options)

    wire = responder.respond(query.to_wire(), "udp")
    response = dns.message.from_wire(wire)

    assert len(wire) <= limit
    assert response.flags & dns.flags.TC
    kept = len(answer_records(response))
    assert 0 < kept < 100
    # As many whole SRV records as fit: one more would not.
    assert len(wire) + 80 > limit
    assert response.additional == []
    if "use_edns" in query_options:
        assert response.edns == 0


def test_tcp_returns_full_answer():
    responder = make_responder(make_registry(big_service_instances(100)))

    response = ask(responder, f"big.{ZONE}", "SRV", transport="tcp")

    assert not response.flags & dns.flags.TC
    assert len(answer_records(response)) == 100
    assert len(additional_names(response)) == 100


def test_tcp_caps_at_65535_bytes():
    responder = make_responder(make_registry(big_service_instances(1200)))
    query = dns.message.make_query(f"big.{ZONE}", "SRV")

    wire = responder.respond(query.to_wire(), "tcp")
    response = dns.message.from_wire(wire)

    assert len(wire) <= 65535
    assert response.flags & dns.flags.TC
    assert 0 < len(answer_records(response)) < 1200


def test_udp_a_answer_truncated():
    instances = [
        make_instance(f"{index:08x}-0000-4000-8000-000000000001", "wide", f"10.9.{index // 250}.{index % 250 + 1}:80", Protocol.HTTP)
        for index in range(200)
    ]
    responder = make_responder(make_registry(instances))

    udp = ask(responder, f"wide.{ZONE}", "A")
    tcp = ask(responder, f"wide.{ZONE}", "A", transport="tcp")

    assert udp.flags & dns.flags.TC
    assert 0 < len(answer_records(udp)) < 200
    assert len(answer_records(tcp)) == 200


# ----- rotation --------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "rdtype", "count"),
    [
        (f"auth-svc.{ZONE}", "A", 2),
        (f"auth-svc.{ZONE}", "SRV", 5),
        (f"_http._tcp.auth-svc.{ZONE}", "SRV", 3),
    ],
)
def test_rotation_spreads_first_record(responder, name, rdtype, count):
    firsts = []
    orders = set()
    for _ in range(count):
        response = ask(responder, name, rdtype)
        records = [rdata.to_text() for rrset in response.answer for rdata in rrset]
        firsts.append(records[0])
        orders.add(frozenset(records))

    assert len(set(firsts)) == count
    assert len(orders) == 1


def test_rotation_keeps_truncated_answers_spread():
    responder = make_responder(make_registry(big_service_instances(100)))

    first = answer_records(ask(responder, f"big.{ZONE}", "SRV"))
    second = answer_records(ask(responder, f"big.{ZONE}", "SRV"))

    assert first[0].target != second[0].target


# ----- malformed and unusual messages ----------------------------------------


def header(message_id: int = 0x1234, flags: int = 0x0100, qdcount: int = 1, ancount: int = 0, nscount: int = 0, arcount: int = 0) -> bytes:
    return struct.pack("!HHHHHH", message_id, flags, qdcount, ancount, nscount, arcount)


def encode_name(name: str) -> bytes:
    return dns.name.from_text(name).to_wire()


QUESTION = encode_name(f"auth-svc.{ZONE}") + struct.pack("!HH", 1, 1)


@pytest.mark.parametrize(
    "wire",
    [
        b"",
        b"\x12",
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00",  # 11 bytes: one short of a header
        header(flags=0x8100) + QUESTION,  # QR set: a response, dropped to avoid loops
    ],
)
def test_dropped_without_answer(responder, wire):
    assert responder.respond(wire, "udp") is None


def pointer_chain_message(length: int) -> bytes:
    """Return a query whose additional record's owner is a chain of ``length`` compression pointers."""
    start = header(arcount=2) + QUESTION
    # The first additional record is of an unassigned type, and its RDATA contains the
    # chain: each pointer aims at the one before it, the first at the question name.
    rdata_offset = len(start) + 1 + 10
    chain = bytearray(struct.pack("!H", 0xC000 | 12))
    for position in range(1, length):
        chain += struct.pack("!H", 0xC000 | (rdata_offset + 2 * (position - 1)))
    holder = b"\x00" + struct.pack("!HHIH", 65280, 1, 0, len(chain)) + bytes(chain)
    last_pointer = rdata_offset + 2 * (length - 1)
    record = struct.pack("!H", 0xC000 | last_pointer) + struct.pack("!HHIH", 1, 1, 0, 4) + b"\x7f\x00\x00\x01"
    return start + holder + record


@pytest.mark.parametrize(
    "wire",
    [
        header() + b"\x05abc",  # question name runs past the end
        header() + encode_name(f"auth-svc.{ZONE}"),  # no QTYPE and QCLASS
        header() + b"\xc0\x0c" + struct.pack("!HH", 1, 1),  # a pointer to itself
        header() + b"\xc0\x20" + struct.pack("!HH", 1, 1),  # a pointer forwards
        header(qdcount=0),
        header(qdcount=2) + QUESTION + QUESTION,
        header(qdcount=65535) + QUESTION,
        header() + b"\x40" + b"a" * 64 + encode_name(ZONE) + struct.pack("!HH", 1, 1),  # 64-octet label
        header() + (b"\x3f" + b"a" * 63) * 4 + b"\x00" + struct.pack("!HH", 1, 1),  # 257-octet name
        header() + b"\x80" + b"\x00" * 20,  # reserved label type
        header(arcount=2) + QUESTION + 2 * (b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)),  # two OPT records
        pointer_chain_message(5000),  # recursion in dnslib's name decoder
        header(ancount=1) + QUESTION + b"\xff" * 5,  # answer record cut short
        header() + QUESTION + b"garbage",  # bytes after the last record
        header(arcount=1) + QUESTION,  # a count that promises a record that is not there
    ],
)
def test_malformed_gets_formerr(responder, wire):
    reply = responder.respond(wire, "udp")

    assert reply is not None
    response = dns.message.from_wire(reply)
    assert response.id == 0x1234
    assert response.rcode() == dns.rcode.FORMERR
    assert response.flags & dns.flags.QR
    assert response.answer == []


def test_pointer_chain_within_limits_is_answered(responder):
    # A short chain is a valid message: only its additional record is odd, and it is ignored.
    reply = responder.respond(pointer_chain_message(10), "udp")

    assert dns.message.from_wire(reply).rcode() == dns.rcode.NOERROR


def test_name_of_255_octets_is_accepted(responder):
    labels = (b"\x3f" + b"a" * 63) * 3 + b"\x3d" + b"a" * 61  # 3*64 + 62 + root = 255 octets
    wire = header() + labels + b"\x00" + struct.pack("!HH", 1, 1)

    response = dns.message.from_wire(responder.respond(wire, "udp"))

    assert response.rcode() == dns.rcode.REFUSED


@pytest.mark.parametrize("opcode", [dns.opcode.IQUERY, dns.opcode.STATUS, dns.opcode.NOTIFY, dns.opcode.UPDATE])
def test_other_opcodes_notimp(responder, opcode):
    query = dns.message.make_query(f"auth-svc.{ZONE}", "A")
    query.set_opcode(opcode)

    response = dns.message.from_wire(responder.respond(query.to_wire(), "udp"))

    assert response.rcode() == dns.rcode.NOTIMP
    assert response.opcode() == opcode
    assert response.id == query.id


def test_transport_name_checked(responder):
    with pytest.raises(ValueError, match="transport"):
        responder.respond(QUESTION, "sctp")


def test_internal_error_servfail(caplog):
    class BrokenRegistry:
        index = 1

        def discoverable(self, code):
            raise RuntimeError("registry bug")

    responder = Responder(BrokenRegistry(), ZoneSettings())

    first = ask(responder, f"auth-svc.{ZONE}", "A")
    second = ask(responder, f"auth-svc.{ZONE}", "A")

    assert first.rcode() == dns.rcode.SERVFAIL
    assert second.rcode() == dns.rcode.SERVFAIL
    errors = [record for record in caplog.records if record.name == "logpose.dns" and record.levelname == "ERROR"]
    assert len(errors) == 1
    assert "SERVFAIL" in errors[0].getMessage()


# ----- settings --------------------------------------------------------------


def test_zone_settings_defaults():
    settings = ZoneSettings()

    assert settings.domain == "logpose.internal"
    assert settings.ttl == 5
    assert settings.negative_ttl == 5
    assert settings.ns_addresses == ()
    assert settings.max_udp_payload == 1232
    assert ZoneSettings(ttl=9).negative_ttl == 9


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"domain": ""}, "domain"),
        ({"domain": "bad_label.internal"}, "label 'bad_label'"),
        ({"domain": "a..b"}, "label ''"),
        ({"domain": ".".join(["abcdefghij"] * 15)}, "room"),
        ({"ttl": -1}, "ttl"),
        ({"ttl": 1.5}, "ttl"),
        ({"negative_ttl": 2**31}, "negative_ttl"),
        ({"ns_addresses": ["localhost"]}, "ns_addresses"),
        ({"ns_addresses": "127.0.0.1"}, "ns_addresses"),
        ({"max_udp_payload": 511}, "max_udp_payload"),
        ({"max_udp_payload": 65536}, "max_udp_payload"),
        ({"answer_limit": -1}, "answer_limit"),
        ({"answer_limit": 2.0}, "answer_limit"),
        ({"reverse_zones": "10.0.0.0/8"}, "reverse_zones"),
        ({"reverse_zones": ["10.0.0.1/8"]}, "host bits"),
        ({"reverse_zones": ["not-a-network"]}, "reverse_zones"),
        ({"allow": ["127.0.0.0/33"]}, "allow"),
        ({"recursors": [("localhost", 53)]}, "IP address"),
        ({"recursors": [("127.0.0.1", 0)]}, "port 0"),
        ({"recursors": ["127.0.0.1:53"]}, "pair"),
        ({"recursor_timeout": 0}, "recursor_timeout"),
        ({"recursor_timeout": 61}, "recursor_timeout"),
    ],
)
def test_zone_settings_rejected(settings, message):
    with pytest.raises(ConfigError, match=message):
        ZoneSettings(**settings)


# ----- reverse zones (PTR) ---------------------------------------------------

REVERSE_ZONES = ["10.0.0.0/12", "2001:db8::/32"]


def reverse_v4(address: str) -> str:
    return ".".join(reversed(address.split("."))) + ".in-addr.arpa."


def reverse_v6(address: str) -> str:
    import ipaddress

    return ipaddress.ip_address(address).reverse_pointer + "."


@pytest.fixture
def reverse_responder() -> Responder:
    return make_responder(reverse_zones=REVERSE_ZONES)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # 10.0.0.1 is shared by HTTP_1 and GRPC_1, so it has two names.
        (reverse_v4("10.0.0.1"), {instance_name(HTTP_1), instance_name(GRPC_1)}),
        (reverse_v4("10.0.0.2"), {instance_name(HTTP_2)}),
        (reverse_v4("10.2.0.1"), {instance_name(UDP_1, "udp-svc")}),
        (reverse_v6("2001:db8::1"), {instance_name(HTTP_V6)}),
        (reverse_v6("2001:db8::1").upper(), {instance_name(HTTP_V6)}),
    ],
)
def test_ptr_names_healthy_instances(reverse_responder, name, expected):
    response = ask(reverse_responder, name, "PTR")

    assert response.rcode() == dns.rcode.NOERROR
    assert response.flags & dns.flags.AA
    assert answer_texts(response, "PTR") == expected
    assert len(answer_records(response)) == len(expected)
    assert all(rrset.ttl == TTL for rrset in response.answer)
    assert response.question[0].name.to_text() == name


@pytest.mark.parametrize(
    ("name", "apex"),
    [
        (reverse_v4("10.0.0.9"), "0.10.in-addr.arpa."),  # Unhealthy instance
        (reverse_v4("10.0.0.7"), "0.10.in-addr.arpa."),  # no instance
        (reverse_v4("10.15.255.255"), "15.10.in-addr.arpa."),
        ("01.0.0.10.in-addr.arpa.", "0.10.in-addr.arpa."),  # not the canonical spelling
        ("x.1.0.0.10.in-addr.arpa.", "0.10.in-addr.arpa."),
        ("1.5.10.in-addr.arpa.", "5.10.in-addr.arpa."),  # nothing below this name
        ("7.7.10.in-addr.arpa.", "7.10.in-addr.arpa."),
        (reverse_v6("2001:db8::2"), "8.b.d.0.1.0.0.2.ip6.arpa."),
    ],
)
def test_ptr_nxdomain_has_reverse_soa(reverse_responder, name, apex):
    response = ask(reverse_responder, name, "PTR")

    assert response.rcode() == dns.rcode.NXDOMAIN
    assert response.flags & dns.flags.AA
    [soa] = response.authority
    assert soa.rdtype == dns.rdatatype.SOA
    assert soa.name.to_text() == apex
    assert list(soa)[0].mname.to_text() == f"ns.{ZONE}."


@pytest.mark.parametrize(
    ("name", "rdtype"),
    [
        ("0.0.10.in-addr.arpa.", "PTR"),  # an empty non-terminal above 10.0.0.1
        ("0.10.in-addr.arpa.", "PTR"),  # a reverse zone apex
        (reverse_v4("10.0.0.1"), "A"),
        (reverse_v4("10.0.0.1"), "TXT"),
    ],
)
def test_ptr_zone_nodata(reverse_responder, name, rdtype):
    response = ask(reverse_responder, name, rdtype)

    assert response.rcode() == dns.rcode.NOERROR
    assert response.answer == []
    [soa] = response.authority
    assert soa.rdtype == dns.rdatatype.SOA


def test_ptr_reverse_apex_soa_and_ns(reverse_responder):
    soa = ask(reverse_responder, "0.10.in-addr.arpa", "SOA")
    ns = ask(reverse_responder, "8.b.d.0.1.0.0.2.ip6.arpa", "NS")

    assert [rrset.name.to_text() for rrset in soa.answer] == ["0.10.in-addr.arpa."]
    assert answer_texts(ns, "NS") == {f"ns.{ZONE}."}


@pytest.mark.parametrize(
    "name",
    [
        reverse_v4("10.16.0.1"),  # just outside 10.0.0.0/12
        "10.in-addr.arpa.",  # above the /16 zones that 10.0.0.0/12 is split into
        reverse_v4("192.0.2.1"),
        reverse_v6("2001:db9::1"),
    ],
)
def test_ptr_outside_reverse_zones_refused(reverse_responder, name):
    response = ask(reverse_responder, name, "PTR")

    assert response.rcode() == dns.rcode.REFUSED
    assert not response.flags & dns.flags.AA


def test_ptr_without_reverse_zones_refused(responder):
    assert ask(responder, reverse_v4("10.0.0.1"), "PTR").rcode() == dns.rcode.REFUSED


def test_ptr_follows_health_changes():
    registry = make_registry()
    responder = make_responder(registry, reverse_zones=REVERSE_ZONES)
    name = reverse_v4("10.0.0.9")
    assert ask(responder, name, "PTR").rcode() == dns.rcode.NXDOMAIN

    registry.report_health(SICK, Health.HEALTHY, "recovered")

    assert answer_texts(ask(responder, name, "PTR"), "PTR") == {instance_name(SICK)}


def test_ptr_single_address_reverse_zone():
    responder = make_responder(reverse_zones=["10.0.0.2/32"])
    name = reverse_v4("10.0.0.2")

    assert answer_texts(ask(responder, name, "PTR"), "PTR") == {instance_name(HTTP_2)}
    assert answer_texts(ask(responder, name, "SOA"), "SOA") != set()
    assert ask(responder, reverse_v4("10.0.0.1"), "PTR").rcode() == dns.rcode.REFUSED


def test_any_on_ptr_name(reverse_responder):
    response = ask(reverse_responder, reverse_v4("10.0.0.2"), "ANY")

    assert [dns.rdatatype.to_text(rrset.rdtype) for rrset in response.answer] == ["PTR"]


# ----- answer limit -----------------------------------------------------------


def wide_registry(count: int) -> Registry:
    return make_registry([
        make_instance(f"{index:08x}-0000-4000-8000-000000000002", "wide", f"10.8.0.{index + 1}:80", Protocol.HTTP)
        for index in range(count)
    ])


def test_answer_limit_caps_addresses_and_rotates():
    responder = make_responder(wide_registry(5), answer_limit=2)

    answers = [answer_texts(ask(responder, f"wide.{ZONE}", "A"), "A") for _ in range(5)]

    assert all(len(addresses) == 2 for addresses in answers)
    assert set().union(*answers) == {f"10.8.0.{number}" for number in range(1, 6)}


def test_answer_limit_leaves_srv_whole():
    responder = make_responder(wide_registry(5), answer_limit=2)

    assert len(answer_records(ask(responder, f"wide.{ZONE}", "SRV"))) == 5


def test_answer_limit_zero_is_unlimited():
    responder = make_responder(wide_registry(5))

    assert len(answer_records(ask(responder, f"wide.{ZONE}", "A"))) == 5


# ----- allow list -------------------------------------------------------------


def ask_from(responder: Responder, source: str | None, name: str = f"auth-svc.{ZONE}") -> dns.message.Message:
    query = dns.message.make_query(name, "A")
    return dns.message.from_wire(responder.respond(query.to_wire(), "udp", source=source))


@pytest.mark.parametrize(
    ("source", "rcode"),
    [
        ("127.0.0.1", dns.rcode.NOERROR),
        ("10.1.2.3", dns.rcode.NOERROR),
        ("::1", dns.rcode.NOERROR),
        ("192.0.2.1", dns.rcode.REFUSED),
        ("2001:db8::1", dns.rcode.REFUSED),
        ("not-an-address", dns.rcode.REFUSED),
        (None, dns.rcode.REFUSED),
    ],
)
def test_allow_list(source, rcode):
    responder = make_responder(allow=["127.0.0.0/8", "10.0.0.0/8", "::1/128"])

    response = ask_from(responder, source)

    assert response.rcode() == rcode
    if rcode == dns.rcode.REFUSED:
        assert response.answer == []
        assert response.authority == []
        assert not response.flags & dns.flags.AA


def test_empty_allow_list_answers_everyone(responder):
    assert ask_from(responder, "192.0.2.1").rcode() == dns.rcode.NOERROR
    assert ask_from(responder, None).rcode() == dns.rcode.NOERROR


# ----- recursion available and forwarding decisions ---------------------------


def test_ra_set_when_recursors_configured():
    responder = make_responder(recursors=[("127.0.0.1", 5300)])

    in_zone = ask(responder, f"auth-svc.{ZONE}", "A")
    negative = ask(responder, f"nothing.{ZONE}", "A")

    assert in_zone.flags & dns.flags.RA
    assert negative.flags & dns.flags.RA
    assert in_zone.flags & dns.flags.AA


def test_outside_zone_with_recursors_is_forwarded():
    from logpose.nameserver.answer import ForwardedQuery

    responder = make_responder(recursors=[("127.0.0.1", 5300)])
    query = dns.message.make_query("example.com", "A")

    assert isinstance(responder.respond(query.to_wire(), "udp"), ForwardedQuery)


def test_outside_zone_without_rd_not_forwarded():
    responder = make_responder(recursors=[("127.0.0.1", 5300)])

    response = ask(responder, "example.com", "A", flags=0)

    assert response.rcode() == dns.rcode.REFUSED
    assert response.flags & dns.flags.RA


def test_zone_transfer_refused_with_recursors():
    responder = make_responder(recursors=[("127.0.0.1", 5300)])

    assert ask(responder, "example.com", "AXFR", transport="tcp").rcode() == dns.rcode.REFUSED


def test_allow_list_checked_before_forwarding():
    responder = make_responder(allow=["127.0.0.0/8"], recursors=[("127.0.0.1", 5300)])
    query = dns.message.make_query("example.com", "A").to_wire()

    refused = responder.respond(query, "udp", source="192.0.2.1")

    assert isinstance(refused, bytes)
    assert dns.message.from_wire(refused).rcode() == dns.rcode.REFUSED
    assert not isinstance(responder.respond(query, "udp", source="127.0.0.1"), bytes)
