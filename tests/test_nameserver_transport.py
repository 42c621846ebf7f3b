"""A real DnsServer on loopback, queried with dnspython over UDP and TCP."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
from typing import Awaitable, Callable

import dns.asyncquery
import dns.flags
import dns.message
import dns.rcode
import pytest

from logpose.errors import ConfigError
from logpose.model import Check, Health, Instance, Protocol, Service, parse_address
from logpose.nameserver import DnsServer, Responder, ZoneSettings
from logpose.registry import CatalogSnapshot, Registry

ZONE = "logpose.internal"
TIMEOUT = 3.0  # seconds per query, which is plenty on loopback


def make_registry(big_count: int = 60) -> Registry:
    instances = [
        Instance(
            id="11111111-1111-4111-8111-111111111111",
            service="auth-svc",
            address=parse_address("10.0.0.1:8080"),
            protocol=Protocol.HTTP,
            health=Health.HEALTHY,
            check=Check(),
        ),
        *(
            Instance(
                id=f"{index:08x}-0000-4000-8000-000000000000",
                service="big",
                address=parse_address(f"[2001:db8::{index + 1:x}]:8080"),
                protocol=Protocol.HTTP,
                health=Health.HEALTHY,
                check=Check(),
            )
            for index in range(big_count)
        ),
    ]
    services = [Service(code=code, name=code, created_index=1, modify_index=1) for code in ("auth-svc", "big")]
    registry = Registry(None)
    registry.load_snapshot(CatalogSnapshot(services=services, instances=instances, index=3))
    return registry


LOOP_FACTORIES = {"asyncio": asyncio.new_event_loop}
try:
    import uvloop
except ImportError:  # uvloop is optional (it has no Windows wheels), so only the asyncio loop runs
    pass
else:
    LOOP_FACTORIES["uvloop"] = uvloop.new_event_loop


@pytest.fixture(params=sorted(LOOP_FACTORIES))
def run_with_server(request):
    """Return a function that starts a DnsServer on loopback port 0, runs a test coroutine against it, then closes it.

    Each test runs once per event loop the server may be run on.
    """
    loop_factory = LOOP_FACTORIES[request.param]

    def run(
        test: Callable[[DnsServer], Awaitable[None]],
        listen: list[tuple[str, int]] | None = None,
        zone: ZoneSettings | None = None,
        registry: Registry | None = None,
        **server_options,
    ) -> None:
        async def main() -> None:
            responder = Responder(registry or make_registry(), zone or ZoneSettings(ns_addresses=["127.0.0.1"]))
            server = DnsServer(responder, listen or [("127.0.0.1", 0)], **server_options)
            await server.start()
            try:
                await asyncio.wait_for(test(server), 30)
            finally:
                await server.close()

        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(main())

    return run


def ipv6_loopback_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def frame(message: dns.message.Message) -> bytes:
    wire = message.to_wire()
    return struct.pack("!H", len(wire)) + wire


async def read_framed(reader: asyncio.StreamReader) -> dns.message.Message:
    length = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), TIMEOUT))[0]
    return dns.message.from_wire(await asyncio.wait_for(reader.readexactly(length), TIMEOUT))


async def send_udp_raw(host: str, port: int, payload: bytes) -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, remote_addr=(host, port))
    transport.sendto(payload)
    transport.close()


def test_udp_and_tcp_share_picked_port(run_with_server):
    async def check(server: DnsServer) -> None:
        [(host, port)] = server.bound_addresses
        query = dns.message.make_query(f"auth-svc.{ZONE}", "A")

        udp = await dns.asyncquery.udp(query, host, port=port, timeout=TIMEOUT)
        tcp = await dns.asyncquery.tcp(query, host, port=port, timeout=TIMEOUT)

        assert host == "127.0.0.1"
        assert port != 0
        for response in (udp, tcp):
            assert response.rcode() == dns.rcode.NOERROR
            assert [rdata.to_text() for rrset in response.answer for rdata in rrset] == ["10.0.0.1"]

    run_with_server(check)


def test_ipv6_loopback(run_with_server):
    if not ipv6_loopback_available():
        pytest.skip("IPv6 loopback ::1 cannot be bound on this host")

    async def check(server: DnsServer) -> None:
        addresses = dict(server.bound_addresses)
        query = dns.message.make_query(f"auth-svc.{ZONE}", "A")

        for host in ("127.0.0.1", "::1"):
            udp = await dns.asyncquery.udp(query, host, port=addresses[host], timeout=TIMEOUT)
            tcp = await dns.asyncquery.tcp(query, host, port=addresses[host], timeout=TIMEOUT)
            assert udp.rcode() == dns.rcode.NOERROR
            assert tcp.rcode() == dns.rcode.NOERROR

    run_with_server(check, listen=[("127.0.0.1", 0), ("::1", 0)])


def test_listening_addresses_logged(caplog, run_with_server):
    caplog.set_level(logging.INFO, logger="logpose.dns")
    bound = []

    async def check(server: DnsServer) -> None:
        bound.extend(server.bound_addresses)

    run_with_server(check)

    [(host, port)] = bound
    messages = [record.getMessage() for record in caplog.records if record.name == "logpose.dns"]
    assert f"DNS listening on udp {host}:{port}" in messages
    assert f"DNS listening on tcp {host}:{port}" in messages


def test_tcp_pipelined_queries(run_with_server):
    async def check(server: DnsServer) -> None:
        [(host, port)] = server.bound_addresses
        queries = [
            dns.message.make_query(f"auth-svc.{ZONE}", "A"),
            dns.message.make_query(f"nothing.{ZONE}", "A"),
            dns.message.make_query(f"big.{ZONE}", "SRV"),
            dns.message.make_query(ZONE, "SOA"),
        ]
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(b"".join(frame(query) for query in queries))
            await writer.drain()
            responses = [await read_framed(reader) for _ in queries]
        finally:
            writer.close()

        assert [response.id for response in responses] == [query.id for query in queries]
        assert [response.rcode() for response in responses] == [
            dns.rcode.NOERROR,
            dns.rcode.NXDOMAIN,
            dns.rcode.NOERROR,
            dns.rcode.NOERROR,
        ]
        assert sum(len(rrset) for rrset in responses[2].answer) == 60

    run_with_server(check)


def test_truncated_udp_then_full_tcp(run_with_server):
    async def check(server: DnsServer) -> None:
        [(host, port)] = server.bound_addresses
        query = dns.message.make_query(f"big.{ZONE}", "SRV")

        udp = await dns.asyncquery.udp(query, host, port=port, timeout=TIMEOUT)
        tcp = await dns.asyncquery.tcp(query, host, port=port, timeout=TIMEOUT)

        assert udp.flags & dns.flags.TC
        assert 0 < sum(len(rrset) for rrset in udp.answer) < 60
        assert not tcp.flags & dns.flags.TC
        assert sum(len(rrset) for rrset in tcp.answer) == 60
        assert sum(len(rrset) for rrset in tcp.additional) == 60

    run_with_server(check)


def test_udp_garbage_then_good_query(run_with_server):
    async def check(server: DnsServer) -> None:
        [(host, port)] = server.bound_addresses
        garbage = [
            b"",
            b"\x00",
            b"\xff" * 11,
            b"\x12\x34" + b"\xff" * 600,
            b"\x12\x34\x81\x00" + b"\x00" * 8,  # QR set: dropped without a response
            b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01",  # pointer loop
        ]
        for payload in garbage:
            await send_udp_raw(host, port, payload)

        query = dns.message.make_query(f"auth-svc.{ZONE}", "A")
        response = await dns.asyncquery.udp(query, host, port=port, timeout=TIMEOUT)

        assert response.rcode() == dns.rcode.NOERROR
        assert response.id == query.id

    run_with_server(check)


def test_udp_formerr_reply_for_readable_header(run_with_server):
    async def check(server: DnsServer) -> None:
        [(host, port)] = server.bound_addresses
        loop = asyncio.get_running_loop()
        received: asyncio.Future[bytes] = loop.create_future()

        class Receiver(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr) -> None:
                if not received.done():
                    received.set_result(data)

        transport, _ = await loop.create_datagram_endpoint(Receiver, remote_addr=(host, port))
        try:
            transport.sendto(b"\xbe\xef\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05abc")
            reply = await asyncio.wait_for(received, TIMEOUT)
        finally:
            transport.close()

        response = dns.message.from_wire(reply)
        assert response.id == 0xBEEF
        assert response.rcode() == dns.rcode.FORMERR

    run_with_server(check)


def test_tcp_garbage_then_good_query_same_connection(run_with_server):
    async def check(server: DnsServer) -> None:
        [(host, port)] = server.bound_addresses
        garbage = b"\x43\x21\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x3fabc"
        query = dns.message.make_query(f"auth-svc.{ZONE}", "A")
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(struct.pack("!H", len(garbage)) + garbage + frame(query))
            await writer.drain()
            formerr = await read_framed(reader)
            answer = await read_framed(reader)
        finally:
            writer.close()

        assert formerr.id == 0x4321
        assert formerr.rcode() == dns.rcode.FORMERR
        assert answer.id == query.id
        assert answer.rcode() == dns.rcode.NOERROR

    run_with_server(check)


def test_tcp_message_without_header_closes_connection(run_with_server):
    async def check(server: DnsServer) -> None:
        [(host, port)] = server.bound_addresses
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(b"\x00\x03abc")
            await writer.drain()
            rest = await asyncio.wait_for(reader.read(), TIMEOUT)
        finally:
            writer.close()

        assert rest == b""
        query = dns.message.make_query(f"auth-svc.{ZONE}", "A")
        response = await dns.asyncquery.tcp(query, host, port=port, timeout=TIMEOUT)
        assert response.rcode() == dns.rcode.NOERROR

    run_with_server(check)


def test_tcp_answer_up_to_65535_bytes(run_with_server):
    # 1,200 SRV records with their AAAA records need more than 65,535 bytes.
    async def check(server: DnsServer) -> None:
        [(host, port)] = server.bound_addresses
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(frame(dns.message.make_query(f"big.{ZONE}", "SRV")))
            await writer.drain()
            length = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), TIMEOUT))[0]
            response = dns.message.from_wire(await asyncio.wait_for(reader.readexactly(length), TIMEOUT))
        finally:
            writer.close()

        assert 60_000 < length <= 65535
        assert response.flags & dns.flags.TC
        assert 0 < sum(len(rrset) for rrset in response.answer) < 1200

    run_with_server(check, registry=make_registry(big_count=1200))


@pytest.mark.parametrize(("allow", "rcode"), [(["192.0.2.0/24"], dns.rcode.REFUSED), (["127.0.0.0/8"], dns.rcode.NOERROR)])
def test_allow_list_checks_peer_address(run_with_server, allow, rcode):
    async def check(server: DnsServer) -> None:
        [(host, port)] = server.bound_addresses
        query = dns.message.make_query(f"auth-svc.{ZONE}", "A")

        udp = await dns.asyncquery.udp(query, host, port=port, timeout=TIMEOUT)
        tcp = await dns.asyncquery.tcp(query, host, port=port, timeout=TIMEOUT)

        assert udp.rcode() == rcode
        assert tcp.rcode() == rcode

    run_with_server(check, zone=ZoneSettings(allow=allow))


def test_udp_rate_limit_drops_excess_keeps_tcp(run_with_server, caplog):
    async def check(server: DnsServer) -> None:
        [(host, port)] = server.bound_addresses
        loop = asyncio.get_running_loop()
        replies: list[bytes] = []

        class Receiver(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr) -> None:
                replies.append(data)

        transport, _ = await loop.create_datagram_endpoint(Receiver, remote_addr=(host, port))
        try:
            for _ in range(20):
                transport.sendto(dns.message.make_query(f"auth-svc.{ZONE}", "A").to_wire())
            await asyncio.sleep(0.3)
        finally:
            transport.close()
        tcp = await dns.asyncquery.tcp(dns.message.make_query(f"auth-svc.{ZONE}", "A"), host, port=port, timeout=TIMEOUT)

        # A burst of 5, and at most a few more refilled at 5 per second while the test waits.
        assert 5 <= len(replies) <= 8
        assert tcp.rcode() == dns.rcode.NOERROR

    run_with_server(check, rate_limit=5)

    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert any("rate limit" in message for message in warnings)


def test_tcp_idle_connection_closed(run_with_server):
    async def check(server: DnsServer) -> None:
        [(host, port)] = server.bound_addresses
        reader, writer = await asyncio.open_connection(host, port)
        try:
            rest = await asyncio.wait_for(reader.read(), TIMEOUT)
        finally:
            writer.close()

        assert rest == b""

    run_with_server(check, tcp_idle_timeout=0.2)


def test_tcp_connection_limit(caplog, run_with_server):
    async def check(server: DnsServer) -> None:
        [(host, port)] = server.bound_addresses
        first = await asyncio.open_connection(host, port)
        second = await asyncio.open_connection(host, port)
        query = dns.message.make_query(f"auth-svc.{ZONE}", "A")
        # A round trip on each proves both are being served before the third arrives.
        for reader, writer in (first, second):
            writer.write(frame(query))
            await writer.drain()
            await read_framed(reader)

        third_reader, third_writer = await asyncio.open_connection(host, port)
        rest = await asyncio.wait_for(third_reader.read(), TIMEOUT)
        for _, writer in (first, second, (third_reader, third_writer)):
            writer.close()

        assert rest == b""

    run_with_server(check, max_tcp_connections=2)

    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert any("limit" in message for message in warnings)


def test_close_ends_connections_and_releases_ports(run_with_server):
    ports = []

    async def check(server: DnsServer) -> None:
        [(host, port)] = server.bound_addresses
        ports.append(port)
        reader, writer = await asyncio.open_connection(host, port)
        try:
            await asyncio.wait_for(server.close(), TIMEOUT)
            rest = await asyncio.wait_for(reader.read(), TIMEOUT)
        finally:
            writer.close()

        assert rest == b""
        assert server.bound_addresses == []

    run_with_server(check)

    [port] = ports
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", port))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind(("127.0.0.1", port))


def test_port_zero_retries_when_tcp_port_taken(monkeypatch, caplog):
    # The kernel picks the UDP port, and the same TCP port may be in use by someone else.
    # The first TCP bind is made to fail that way to show that another port is picked.
    from logpose.nameserver import transport

    real_bound_socket = transport._bound_socket
    failed_ports = []

    def bound_socket(family, kind, host, port, reuse_port=False):
        if kind == socket.SOCK_STREAM and not failed_ports:
            failed_ports.append(port)
            raise OSError(errno.EADDRINUSE, "address already in use (simulated)")
        return real_bound_socket(family, kind, host, port, reuse_port)

    monkeypatch.setattr(transport, "_bound_socket", bound_socket)
    caplog.set_level(logging.INFO, logger="logpose.dns")

    async def main() -> int:
        server = DnsServer(Responder(make_registry(), ZoneSettings()), [("127.0.0.1", 0)])
        await server.start()
        try:
            [(host, port)] = server.bound_addresses
            query = dns.message.make_query(f"auth-svc.{ZONE}", "A")
            response = await dns.asyncquery.tcp(query, host, port=port, timeout=TIMEOUT)
            assert response.rcode() == dns.rcode.NOERROR
            return port
        finally:
            await server.close()

    port = asyncio.run(main())

    assert len(failed_ports) == 1
    assert any("picking another port" in record.getMessage() for record in caplog.records)
    assert port != 0


def test_port_in_use_raises_and_binds_nothing():
    async def main() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
            taken.bind(("127.0.0.1", 0))
            port = taken.getsockname()[1]
            responder = Responder(make_registry(), ZoneSettings())
            server = DnsServer(responder, [("127.0.0.1", 0), ("127.0.0.1", port)])

            with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
                await server.start()

            assert server.bound_addresses == []

    asyncio.run(main())


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ([], "at least one"),
        ([("localhost", 8653)], "must be an IPv4 or IPv6 address"),
        ([("127.0.0.1", 70000)], "port 70000"),
    ],
)
def test_listen_addresses_validated(listen, message):
    responder = Responder(make_registry(), ZoneSettings())

    with pytest.raises(ConfigError, match=message):
        DnsServer(responder, listen)


@pytest.mark.parametrize("rate_limit", [-1, 1_000_001, 2.5, True])
def test_rate_limit_validated(rate_limit):
    responder = Responder(make_registry(), ZoneSettings())

    with pytest.raises(ConfigError, match="rate_limit"):
        DnsServer(responder, [("127.0.0.1", 0)], rate_limit=rate_limit)


def test_bind_error_is_one_sentence():
    async def main() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
            taken.bind(("127.0.0.1", 0))
            port = taken.getsockname()[1]
            server = DnsServer(Responder(make_registry(), ZoneSettings()), [("127.0.0.1", port)])

            with pytest.raises(OSError) as raised:
                await server.start()

        assert raised.value.errno == errno.EADDRINUSE
        assert raised.value.strerror.startswith(f"cannot listen for DNS over UDP on 127.0.0.1:{port}: ")
        assert raised.value.strerror.count("127.0.0.1") == 1

    asyncio.run(main())
