"""The wire-format response cache: cached responses equal built ones, and changes drop them."""

from __future__ import annotations

import asyncio
import random
import struct

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from logpose.model import Check, Health, Instance, InstanceSpec, Protocol, Service, parse_address
from logpose.nameserver import Responder, ZoneSettings
from logpose.nameserver.cache import AnswerCache, patch_response, peek_query
from logpose.registry import CatalogSnapshot, Change, ChangeKind, Registry

ZONE = "logpose.internal"
WEB_1 = "11111111-1111-4111-8111-111111111111"
WEB_2 = "22222222-2222-4222-8222-222222222222"
WEB_3 = "33333333-3333-4333-8333-333333333333"
GRPC_1 = "44444444-4444-4444-8444-444444444444"
HOST_1 = "55555555-5555-4555-8555-555555555555"
V6_1 = "66666666-6666-4666-8666-666666666666"
SICK_1 = "77777777-7777-4777-8777-777777777777"
DB_1 = "88888888-8888-4888-8888-888888888888"


def make_instance(instance_id: str, service: str, address: str, protocol: Protocol = Protocol.HTTP,
                  health: Health = Health.HEALTHY) -> Instance:
    return Instance(
        id=instance_id,
        service=service,
        address=parse_address(address),
        protocol=protocol,
        health=health,
        check=Check(),
    )


def catalog(extra: list[Instance] | None = None) -> tuple[list[Service], list[Instance]]:
    instances = [
        make_instance(WEB_1, "web", "10.0.0.1:8080"),
        make_instance(WEB_2, "web", "10.0.0.2:8080"),
        make_instance(WEB_3, "web", "10.0.0.3:8080"),
        make_instance(GRPC_1, "web", "10.0.0.1:9090", Protocol.GRPC),
        make_instance(HOST_1, "web", "api.example.com:443", Protocol.HTTPS),
        make_instance(V6_1, "web", "[2001:db8::1]:8080"),
        make_instance(SICK_1, "web", "10.0.0.9:8080", health=Health.UNHEALTHY),
        make_instance(DB_1, "db", "10.1.0.1:5432", Protocol.TCP),
        *[make_instance(f"{n:08x}-aaaa-4aaa-8aaa-aaaaaaaaaaaa", "big", f"10.2.{n // 250}.{n % 250 + 1}:80")
          for n in range(60)],
        *(extra or []),
    ]
    codes = sorted({instance.service for instance in instances} | {"empty"})
    services = [Service(code=code, name=code, created_index=1, modify_index=1) for code in codes]
    return services, instances


def make_registry(store=None, index: int = 41) -> Registry:
    services, instances = catalog()
    registry = Registry(store)
    registry.load_snapshot(CatalogSnapshot(services=services, instances=instances, index=index))
    return registry


def make_responder(registry: Registry, **options) -> Responder:
    cache_bytes = options.pop("cache_bytes", None)
    options.setdefault("ns_addresses", ["127.0.0.1"])
    settings = ZoneSettings(**options)
    if cache_bytes is None:
        return Responder(registry, settings)
    return Responder(registry, settings, cache_bytes=cache_bytes)


def random_case(name: str, rng: random.Random) -> str:
    return "".join(char.upper() if rng.random() < 0.5 else char.lower() for char in name)


def query_wire(name: str, rdtype: str = "A", message_id: int = 0x1234, flags: int = dns.flags.RD, **options) -> bytes:
    query = dns.message.make_query(name, rdtype, **options)
    query.id = message_id
    query.flags = flags
    return query.to_wire()


def ask(responder: Responder, name: str, rdtype: str = "A", transport: str = "udp", **options) -> dns.message.Message:
    wire = responder.respond(query_wire(name, rdtype, **options), transport)
    assert isinstance(wire, bytes)
    return dns.message.from_wire(wire)


QUERIES = [
    (f"web.{ZONE}", "A", {}),
    (f"web.{ZONE}", "AAAA", {}),
    (f"web.{ZONE}", "SRV", {}),
    (f"web.{ZONE}", "SRV", {"use_edns": 0, "payload": 1232}),
    (f"web.{ZONE}", "SRV", {"use_edns": 0, "payload": 4096, "want_dnssec": True}),
    (f"web.{ZONE}", "ANY", {}),
    (f"web.{ZONE}", "TXT", {}),  # NODATA
    (f"_http._tcp.web.{ZONE}", "SRV", {"use_edns": 0}),
    (f"_tcp.web.{ZONE}", "A", {}),  # empty non-terminal
    (f"{WEB_1}.web.{ZONE}", "A", {}),
    (f"{HOST_1}.web.{ZONE}", "A", {}),  # CNAME
    (f"{SICK_1}.web.{ZONE}", "A", {}),  # NXDOMAIN below a live service
    (f"db.{ZONE}", "SRV", {"use_edns": 0, "payload": 600}),
    (f"empty.{ZONE}", "A", {}),  # a service without instances
    (f"nothing.{ZONE}", "A", {"use_edns": 0}),
    (f"big.{ZONE}", "SRV", {}),  # truncated at 512 bytes
    (f"big.{ZONE}", "SRV", {"use_edns": 0, "payload": 1232}),
    (f"big.{ZONE}", "A", {"use_edns": 0, "payload": 700}),
    (ZONE, "SOA", {}),
    (ZONE, "NS", {"use_edns": 0}),
    (ZONE, "ANY", {}),
    (f"ns.{ZONE}", "A", {}),
    (f"ns.{ZONE}", "AAAA", {}),
]


# ----- cached responses equal built ones ----------------------------------


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_cached_equals_built(transport):
    """Every response of a cached responder equals, byte for byte, that of one without cache.

    Both get the same queries in the same order, each asked several times with other
    IDs, flags and letter case, so most of the cached responder's come from the cache.
    """
    registry = make_registry()
    cached = make_responder(registry)
    built = make_responder(registry, cache_bytes=0)
    rng = random.Random(8)

    for round_number in range(8):
        for name, rdtype, options in QUERIES:
            flags = rng.choice([0, dns.flags.RD, dns.flags.CD, dns.flags.RD | dns.flags.CD, dns.flags.AD])
            asked = random_case(name, rng) if round_number else name
            wire = query_wire(asked, rdtype, message_id=rng.randrange(65536), flags=flags, **options)

            expected = built.respond(wire, transport)
            actual = cached.respond(wire, transport)

            assert actual == expected, (asked, rdtype, options, round_number)

    assert cached.cache.hits > len(QUERIES) * 4
    assert built.cache.hits == 0


def serve(responder: Responder, wire: bytes, transport: str = "udp") -> bytes:
    """Answer as the DNS transports do: the cached fast path first, then the full one."""
    reply = responder.respond_cached(wire, transport) or responder.respond(wire, transport)
    assert isinstance(reply, bytes)
    return reply


def respond(responder: Responder, wire: bytes, transport: str = "udp") -> bytes:
    reply = responder.respond(wire, transport)
    assert isinstance(reply, bytes)
    return reply


@pytest.mark.parametrize(("answer", "transport"), [(respond, "udp"), (serve, "udp"), (serve, "tcp")])
def test_cached_equals_built_across_changes(answer, transport):
    registry = make_registry()
    cached = make_responder(registry)
    built = make_responder(registry, cache_bytes=0)

    def compare() -> None:
        for message_id, (name, rdtype, options) in enumerate(QUERIES):
            wire = query_wire(name, rdtype, message_id=message_id, **options)
            assert answer(cached, wire, transport) == built.respond(wire, transport), (name, rdtype)

    compare()
    compare()
    assert bool(cached.cache.known_queries[transport]) is (answer is serve)
    registry.report_health(SICK_1, Health.HEALTHY, "recovered")
    compare()
    registry.record_check_result(WEB_2, False, "refused", None)
    registry.record_check_result(WEB_2, False, "refused", None)
    compare()
    asyncio.run(registry.deregister(DB_1))
    compare()
    compare()
    cached.update_settings(ZoneSettings(ttl=5, ns_addresses=["127.0.0.1"]))
    built.update_settings(ZoneSettings(ttl=5, ns_addresses=["127.0.0.1"]))
    compare()
    compare()


# ----- what changes drop ----------------------------------------------------


def test_known_query_follows_a_deregistration():
    registry = make_registry()
    responder = make_responder(registry)
    wire = query_wire(f"db.{ZONE}", "SRV")
    serve(responder, wire)
    assert responder.respond_cached(wire, "udp") is not None

    asyncio.run(registry.deregister(DB_1))

    assert responder.respond_cached(wire, "udp") is None
    assert dns.message.from_wire(serve(responder, wire)).rcode() == dns.rcode.NXDOMAIN


def test_only_lower_case_queries_remembered():
    responder = make_responder(make_registry())
    mixed = query_wire(f"Web.{ZONE}")
    for _ in range(3):
        serve(responder, mixed)
    assert responder.cache.known_queries["udp"] == {}

    lower = query_wire(f"web.{ZONE}")
    serve(responder, lower)
    serve(responder, lower)
    assert list(responder.cache.known_queries["udp"]) == [lower[2:]]


def test_known_queries_bounded(monkeypatch):
    monkeypatch.setattr("logpose.nameserver.cache.MAX_KNOWN_QUERIES", 10)
    responder = make_responder(make_registry())
    for number in range(25):
        wire = query_wire(f"db.{ZONE}", "SRV", message_id=number, use_edns=0, payload=600 + number)
        serve(responder, wire)
        serve(responder, wire)

    assert 0 < len(responder.cache.known_queries["udp"]) <= 10


def test_observe_sees_every_response():
    responder = make_responder(make_registry(), allow=["10.0.0.0/8"])
    seen = []
    responder.observe = lambda transport, qtype, rcode, seconds: seen.append((transport, qtype, rcode))
    web = query_wire(f"web.{ZONE}", "SRV")
    for _ in range(3):
        reply = responder.respond_cached(web, "udp", "10.1.1.1") or responder.respond(web, "udp", "-", "10.1.1.1")
        assert isinstance(reply, bytes)
    responder.respond(query_wire(f"nothing.{ZONE}", "AAAA"), "tcp", "-", "10.1.1.1")
    responder.respond(web, "udp", "-", "192.0.2.1")
    assert responder.respond_cached(web, "udp", "192.0.2.1") is None

    assert seen == [("udp", 33, 0)] * 3 + [("tcp", 28, 3), ("udp", 33, 5)]


def test_health_change_drops_service_answers():
    registry = make_registry()
    responder = make_responder(registry)
    name = f"web.{ZONE}"
    ask(responder, name)
    assert len(responder.cache) >= 1

    registry.report_health(SICK_1, Health.HEALTHY, "recovered")
    addresses = {rdata.address for rrset in ask(responder, name).answer for rdata in rrset}

    assert "10.0.0.9" in addresses


def test_deregistration_gives_nxdomain():
    registry = make_registry()
    responder = make_responder(registry)
    assert ask(responder, f"db.{ZONE}", "SRV").rcode() == dns.rcode.NOERROR

    asyncio.run(registry.deregister(DB_1))

    assert ask(responder, f"db.{ZONE}", "SRV").rcode() == dns.rcode.NXDOMAIN


def test_registration_ends_cached_nxdomain():
    registry = make_registry()
    responder = make_responder(registry)
    assert ask(responder, f"fresh.{ZONE}").rcode() == dns.rcode.NXDOMAIN
    assert ask(responder, f"fresh.{ZONE}").rcode() == dns.rcode.NXDOMAIN

    instance, _ = asyncio.run(registry.register("fresh", _spec("10.9.0.1:80")))
    registry.report_health(instance.id, Health.HEALTHY, "up")

    assert ask(responder, f"fresh.{ZONE}").rcode() == dns.rcode.NOERROR


def test_change_keeps_other_services_cached():
    registry = make_registry()
    responder = make_responder(registry)
    ask(responder, f"db.{ZONE}")
    ask(responder, f"web.{ZONE}")
    size_before = len(responder.cache)

    registry.report_health(SICK_1, Health.HEALTHY, "recovered")

    assert len(responder.cache) == size_before - 1
    hits = responder.cache.hits
    ask(responder, f"db.{ZONE}")
    assert responder.cache.hits == hits + 1


def test_change_drops_apex_answers():
    registry = make_registry()
    responder = make_responder(registry)
    serial = ask(responder, ZONE, "SOA").answer[0][0].serial

    asyncio.run(registry.deregister(DB_1))

    assert ask(responder, ZONE, "SOA").answer[0][0].serial == serial + 1


def test_full_reload_notice_drops_everything(monkeypatch):
    registry = make_registry()
    listeners = []
    monkeypatch.setattr(registry, "subscribe", listeners.append)
    responder = make_responder(registry)
    ask(responder, f"db.{ZONE}")
    ask(responder, ZONE, "NS")
    assert len(responder.cache) == 2

    for listener in listeners:
        listener(_reload_notice())

    assert len(responder.cache) == 0


class _CountingStore:
    """A store stand-in for health writes: each commit gets the next index."""

    def __init__(self, index: int) -> None:
        self.index = index

    async def commit(self, write) -> int:
        self.index += 1
        return self.index


def test_soa_serial_follows_index_without_notice():
    """A health write moves the change index after its change notice; the SOA follows."""
    store = _CountingStore(41)
    registry = make_registry(store=store)
    responder = make_responder(registry)
    registry.report_health(SICK_1, Health.HEALTHY, "recovered")
    before = ask(responder, f"nothing.{ZONE}").authority[0][0].serial
    ask(responder, f"nothing.{ZONE}")

    asyncio.run(registry.flush_health())

    after = ask(responder, f"nothing.{ZONE}").authority[0][0].serial
    assert before == 41
    assert after == 42


def test_update_settings_drops_everything():
    registry = make_registry()
    responder = make_responder(registry, ttl=5)
    ask(responder, f"web.{ZONE}")

    responder.update_settings(ZoneSettings(ttl=60, ns_addresses=["127.0.0.1"]))

    assert ask(responder, f"web.{ZONE}").answer[0].ttl == 60


# ----- rotation -------------------------------------------------------------


def test_rotation_goes_on_from_cache():
    responder = make_responder(make_registry())
    firsts = [ask(responder, f"web.{ZONE}", "A").answer[0][0].address for _ in range(8)]

    assert firsts[:4] == ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.1"]
    assert firsts[4:] == firsts[1:5]
    assert responder.cache.hits >= 5


def test_large_service_rotates_over_eight_starts():
    responder = make_responder(make_registry())
    targets = [ask(responder, f"big.{ZONE}", "SRV").answer[0][0].target for _ in range(24)]

    assert len(set(targets)) == 8
    assert targets[8:] == targets[:16]
    assert responder.cache.hits == 16


def test_answer_limit_shows_every_address_from_cache():
    responder = make_responder(make_registry(), answer_limit=3)
    shown = set()
    for _ in range(40):
        shown |= {rdata.address for rrset in ask(responder, f"big.{ZONE}", "A").answer for rdata in rrset}

    assert len(shown) == 60
    assert responder.cache.hits == 20


# ----- the query reader and the patch -----------------------------------------


def test_peek_plain_query():
    wire = query_wire(f"Web.{ZONE}", "SRV", use_edns=0, payload=4096, want_dnssec=True)

    query = peek_query(wire)

    assert query is not None
    assert query.name == b"\x03web\x07logpose\x08internal\x00"
    assert query.qtype == dns.rdatatype.SRV
    assert query.udp_payload == 4096
    assert query.dnssec_ok is True
    assert wire[query.name_end - 1] == 0


def test_peek_without_edns():
    query = peek_query(query_wire(f"web.{ZONE}"))

    assert query is not None
    assert query.udp_payload is None
    assert query.dnssec_ok is False


def _header(flags: int = 0x0100, qdcount: int = 1, ancount: int = 0, nscount: int = 0, arcount: int = 0) -> bytes:
    return struct.pack("!HHHHHH", 0x4242, flags, qdcount, ancount, nscount, arcount)


QUESTION = b"\x03web\x07logpose\x08internal\x00" + struct.pack("!HH", 1, 1)
PLAIN_OPT = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)


@pytest.mark.parametrize(
    ("label", "wire"),
    [
        ("short", _header()[:11]),
        ("QR set", _header(flags=0x8100) + QUESTION),
        ("opcode NOTIFY", _header(flags=0x2000) + QUESTION),
        ("two questions", _header(qdcount=2) + QUESTION + QUESTION),
        ("no question", _header(qdcount=0)),
        ("answer record", _header(ancount=1) + QUESTION + PLAIN_OPT),
        ("authority record", _header(nscount=1) + QUESTION + PLAIN_OPT),
        ("two additional", _header(arcount=2) + QUESTION + PLAIN_OPT + PLAIN_OPT),
        ("compressed name", _header() + b"\x03web\xc0\x0c" + struct.pack("!HH", 1, 1)),
        ("label over 63", _header() + b"\x40" + b"a" * 64 + b"\x00" + struct.pack("!HH", 1, 1)),
        ("name runs off the end", _header() + b"\x03web\x07logpose"),
        ("class CH", _header() + QUESTION[:-2] + struct.pack("!H", 3)),
        ("bytes after the question", _header() + QUESTION + b"\x00"),
        ("additional not OPT", _header(arcount=1) + QUESTION + b"\x00" + struct.pack("!HHIH", 1, 1, 0, 0)),
        ("EDNS version 1", _header(arcount=1) + QUESTION + b"\x00" + struct.pack("!HHIH", 41, 1232, 1 << 16, 0)),
        ("OPT with a cookie", _header(arcount=1) + QUESTION + b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 12)
         + struct.pack("!HH", 10, 8) + b"\x01" * 8),
        ("OPT not at the root", _header(arcount=1) + QUESTION + b"\x01a\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)),
        ("name over 255 octets", _header() + (b"\x3f" + b"a" * 63) * 4 + b"\x00" + struct.pack("!HH", 1, 1)),
    ],
)
def test_peek_rejects_unusual(label, wire):
    assert peek_query(wire) is None, label


def test_unusual_queries_still_answered_in_full():
    responder = make_responder(make_registry())
    cookie = dns.edns.CookieOption(b"\x01" * 8, b"")
    for _ in range(3):
        response = ask(responder, f"web.{ZONE}", "A", use_edns=0, options=[cookie])
        assert response.rcode() == dns.rcode.NOERROR

    assert responder.cache.hits == 0


def test_patch_copies_id_flags_and_case():
    cached = _header(flags=0x8500) + QUESTION + b"rest"
    query = struct.pack("!HHHHHH", 0xBEEF, 0x0110, 1, 0, 0, 0) + b"\x03WeB\x07LOGPOSE\x08internal\x00" + QUESTION[-4:]
    name_end = 12 + len(b"\x03web\x07logpose\x08internal\x00")

    patched = patch_response(cached, query, name_end)

    assert patched[:2] == b"\xbe\xef"
    assert struct.unpack("!H", patched[2:4])[0] == 0x8510  # QR, AA and RD, CD from the query
    assert patched[12:name_end] == b"\x03WeB\x07LOGPOSE\x08internal\x00"
    assert patched[name_end:] == cached[name_end:]


# ----- size bound -----------------------------------------------------------------


def test_cache_bounded_by_bytes():
    cache = AnswerCache(max_bytes=5000)
    for number in range(100):
        cache.store((number,), bucket="svc", period=1, rotation_key=None, position=0, index=None, rcode=0, wire=b"x" * 100)

    assert cache.size <= 5000
    assert 0 < len(cache) < 100
    assert cache.get((99,)) is not None
    assert cache.get((0,)) is None


def test_responder_cache_stays_bounded():
    registry = make_registry()
    responder = make_responder(registry, cache_bytes=20_000)
    for number in range(300):
        ask(responder, f"unknown-{number}.{ZONE}")

    assert responder.cache.size <= 20_000
    assert ask(responder, f"web.{ZONE}").rcode() == dns.rcode.NOERROR


def test_cache_off_stores_nothing():
    responder = make_responder(make_registry(), cache_bytes=0)
    ask(responder, f"web.{ZONE}")
    ask(responder, f"web.{ZONE}")

    assert len(responder.cache) == 0
    assert responder.cache.hits == 0


def test_reverse_zone_not_cached():
    responder = make_responder(make_registry(), reverse_zones=["10.0.0.0/8"])
    for _ in range(2):
        assert ask(responder, "1.0.0.10.in-addr.arpa", "PTR").rcode() == dns.rcode.NOERROR

    assert len(responder.cache) == 0


def test_allow_list_checked_before_cache():
    responder = make_responder(make_registry(), allow=["10.0.0.0/8"])
    wire = query_wire(f"web.{ZONE}")
    assert dns.message.from_wire(responder.respond(wire, "udp", source="10.1.1.1")).rcode() == dns.rcode.NOERROR
    assert dns.message.from_wire(responder.respond(wire, "udp", source="10.1.1.1")).rcode() == dns.rcode.NOERROR

    refused = dns.message.from_wire(responder.respond(wire, "udp", source="192.0.2.1"))

    assert refused.rcode() == dns.rcode.REFUSED


def _spec(address: str) -> InstanceSpec:
    return InstanceSpec(address=parse_address(address), protocol=Protocol.HTTP, check=Check())


def _reload_notice() -> Change:
    """The notice the registry sends after swapping in a whole catalog."""
    return Change(99, ChangeKind.SERVICE_UPSERT, "")
