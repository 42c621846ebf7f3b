"""Random and mutated packets: the DNS front end never raises, always answers well-formed, and still answers right after."""

from __future__ import annotations

import asyncio
import logging
import random
import struct

import dns.asyncquery
import dns.flags
import dns.message
import dns.name
import dns.rcode
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from logpose.model import Check, Health, Instance, Protocol, Service, parse_address
from logpose.nameserver import DnsServer, Responder, ZoneSettings
from logpose.nameserver.answer import ForwardedQuery
from logpose.registry import CatalogSnapshot, Registry

ZONE = "logpose.internal"
TIMEOUT = 3.0
BATCH_SIZES = (20, 50)  # packets per hypothesis example, at least and at most
EXAMPLES = 300  # hypothesis examples per responder, so at least 6,000 packets each
SOCKET_PACKETS = 300
SEED = 20240501  # fixes the packets sent to the real listener, so a failure can be replayed


def make_registry() -> Registry:
    instances = [
        Instance(
            id=f"{index:08x}-0000-4000-8000-000000000000",
            service="auth-svc" if index < 4 else "big",
            address=parse_address(f"10.0.0.{index + 1}:8080" if index % 2 else f"[2001:db8::{index + 1:x}]:8080"),
            protocol=Protocol.HTTP if index % 3 else Protocol.GRPC,
            health=Health.HEALTHY,
            check=Check(),
        )
        for index in range(40)
    ]
    services = [Service(code=code, name=code, created_index=1, modify_index=1) for code in ("auth-svc", "big")]
    registry = Registry(None)
    registry.load_snapshot(CatalogSnapshot(services=services, instances=instances, index=9))
    return registry


def make_responder(**settings) -> Responder:
    return Responder(make_registry(), ZoneSettings(reverse_zones=["10.0.0.0/8", "2001:db8::/32"], **settings))


def seed_queries() -> list[bytes]:
    """Return well-formed queries that reach every kind of name, for the mutations to start from."""
    queries = [
        dns.message.make_query(f"auth-svc.{ZONE}", "A"),
        dns.message.make_query(f"big.{ZONE}", "SRV", use_edns=0, payload=4096, want_dnssec=True),
        dns.message.make_query(f"_grpc._tcp.big.{ZONE}", "SRV"),
        dns.message.make_query(f"00000001-0000-4000-8000-000000000000.auth-svc.{ZONE}", "AAAA", use_edns=0),
        dns.message.make_query(ZONE, "SOA"),
        dns.message.make_query(ZONE, "ANY"),
        dns.message.make_query("2.0.0.10.in-addr.arpa", "PTR"),
        dns.message.make_query("example.com", "A", use_edns=0),
        dns.message.make_query(f"nothing.{ZONE}", "TXT"),
    ]
    return [query.to_wire() for query in queries]


SEEDS = seed_queries()
GOOD_QUERY = dns.message.make_query(f"auth-svc.{ZONE}", "A")
GOOD_ANSWER = {"10.0.0.2", "10.0.0.4"}

# A mutation is (operation, position, value); positions wrap around the packet's length.
MUTATIONS = st.tuples(
    st.sampled_from(["flip", "set", "cut", "insert", "delete", "count", "pointer"]),
    st.integers(0, 600),
    st.integers(0, 65535),
)


def mutate(wire: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    data = bytearray(wire)
    for operation, position, value in mutations:
        where = position % (len(data) + 1)
        if operation == "flip" and data:
            data[where % len(data)] ^= 1 << (value % 8)
        elif operation == "set" and data:
            data[where % len(data)] = value & 0xFF
        elif operation == "cut":
            del data[where:]
        elif operation == "insert":
            data[where:where] = value.to_bytes(2, "big")
        elif operation == "delete":
            del data[where : where + 1 + value % 8]
        elif operation == "count" and len(data) >= 12:
            # QDCOUNT, ANCOUNT, NSCOUNT or ARCOUNT that lies.
            offset = 4 + 2 * (value % 4)
            data[offset : offset + 2] = struct.pack("!H", value % 7 if position % 2 else value)
        elif operation == "pointer":
            # A compression pointer to anywhere, the source of loops and overruns.
            data[where:where] = struct.pack("!H", 0xC000 | (value & 0x3FFF))
    return bytes(data)


PACKETS = st.one_of(
    st.binary(max_size=600),
    st.builds(mutate, st.sampled_from(SEEDS), st.lists(MUTATIONS, min_size=1, max_size=6)),
)


def check_reply(wire: bytes, reply: bytes | ForwardedQuery | None, transport: str) -> None:
    """Check the contract of ``Responder.respond`` for one packet."""
    if len(wire) < 12 or wire[2] & 0x80:
        assert reply is None
        return
    if isinstance(reply, ForwardedQuery):
        return
    assert isinstance(reply, bytes)
    assert reply[:2] == wire[:2]  # the message ID
    assert reply[2] & 0x80  # QR
    assert (reply[2] >> 3) & 0xF == (wire[2] >> 3) & 0xF  # the opcode
    if transport == "udp":
        arcount = struct.unpack_from("!H", wire, 10)[0]
        assert len(reply) <= (512 if arcount == 0 else 1232)
    else:
        assert len(reply) <= 65535
    response = dns.message.from_wire(reply)
    assert response.rcode() != dns.rcode.SERVFAIL


def assert_still_correct(responder: Responder) -> None:
    for transport in ("udp", "tcp"):
        response = dns.message.from_wire(responder.respond(GOOD_QUERY.to_wire(), transport))
        assert response.rcode() == dns.rcode.NOERROR
        assert {rdata.to_text() for rrset in response.answer for rdata in rrset} == GOOD_ANSWER


RESPONDERS = {"plain": make_responder(), "forwarding": make_responder(recursors=[("127.0.0.1", 5300)], answer_limit=1)}


@pytest.mark.parametrize("kind", sorted(RESPONDERS))
def test_responder_survives_fuzz(kind, caplog):
    responder = RESPONDERS[kind]
    counts = {"packets": 0}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(PACKETS, min_size=BATCH_SIZES[0], max_size=BATCH_SIZES[1]), st.sampled_from(["udp", "tcp"]))
    def fuzz(packets: list[bytes], transport: str) -> None:
        for wire in packets:
            check_reply(wire, responder.respond(wire, transport, "fuzz"), transport)
        counts["packets"] += len(packets)

    fuzz()

    assert counts["packets"] >= EXAMPLES * BATCH_SIZES[0]
    if kind == "plain":
        assert_still_correct(responder)
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert errors == []


def test_real_listener_survives_fuzz():
    rng = random.Random(SEED)
    packets = []
    for _ in range(SOCKET_PACKETS):
        if rng.random() < 0.2:
            packets.append(rng.randbytes(rng.randrange(600)))
        else:
            mutations = [(rng.choice(["flip", "set", "cut", "insert", "delete", "count", "pointer"]),
                          rng.randrange(600), rng.randrange(65536)) for _ in range(rng.randrange(1, 6))]
            packets.append(mutate(rng.choice(SEEDS), mutations))

    async def main() -> None:
        server = DnsServer(make_responder(), [("127.0.0.1", 0)])
        await server.start()
        try:
            [(host, port)] = server.bound_addresses
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, remote_addr=(host, port))
            try:
                for index, packet in enumerate(packets):
                    transport.sendto(packet)
                    if index % 50 == 49:
                        await asyncio.sleep(0.01)  # lets the server read, so the socket buffer never overflows
            finally:
                transport.close()

            # The server still listens and returns the right records over UDP and TCP.
            for send in (dns.asyncquery.udp, dns.asyncquery.tcp):
                response = await send(GOOD_QUERY, host, port=port, timeout=TIMEOUT)
                assert response.rcode() == dns.rcode.NOERROR
                assert {rdata.to_text() for rrset in response.answer for rdata in rrset} == GOOD_ANSWER
        finally:
            await server.close()

    asyncio.run(main())
