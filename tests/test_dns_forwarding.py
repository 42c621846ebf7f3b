"""Names outside the zone forwarded to recursors that the tests run themselves on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import selectors
import socket
import struct
import threading
import time

import dns.asyncquery
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from logpose.nameserver import DnsServer, Responder, ZoneSettings
from logpose.registry import Registry

TIMEOUT = 3.0  # seconds per query from the test
RECURSOR_TIMEOUT = 0.3  # seconds the server waits for each recursor
ANSWER = "192.0.2.10"  # a documentation address: only ever data in a reply, never a destination
BIG_TXT_COUNT = 60  # TXT records of big.forward.test: more than fit in a 512-byte UDP message


class TinyRecursor:
    """A stand-in recursive resolver on 127.0.0.1, UDP and TCP on one port, run in a thread.

    ``mode`` is "answer", "silent" (never replies), "servfail", or "forged-first" (sends a
    reply with a wrong ID before the real one). Every query received is kept in ``queries``.
    """

    def __init__(self, mode: str = "answer") -> None:
        self.mode = mode
        self.queries: list[tuple[str, dns.message.Message]] = []
        self.udp, self.tcp = self._bind()
        self.port = self.udp.getsockname()[1]
        self.address = ("127.0.0.1", self.port)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @staticmethod
    def _bind() -> tuple[socket.socket, socket.socket]:
        for _attempt in range(20):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("127.0.0.1", 0))
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                tcp.bind(("127.0.0.1", udp.getsockname()[1]))
            except OSError:
                udp.close()
                tcp.close()
                continue
            tcp.listen(8)
            return udp, tcp
        raise RuntimeError("no port free for both UDP and TCP on 127.0.0.1")

    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self.udp, selectors.EVENT_READ)
            selector.register(self.tcp, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _events in selector.select(timeout=0.05):
                    if key.fileobj is self.udp:
                        self._serve_udp()
                    else:
                        self._serve_tcp()

    def _serve_udp(self) -> None:
        wire, client = self.udp.recvfrom(65535)
        query = dns.message.from_wire(wire)
        self.queries.append(("udp", query))
        if self.mode == "silent":
            return
        if self.mode == "forged-first":
            forged = self._reply(query, "udp")
            forged.id = (query.id + 1) % 65536
            self.udp.sendto(forged.to_wire(), client)
        self.udp.sendto(self._reply(query, "udp").to_wire(), client)

    def _serve_tcp(self) -> None:
        connection, _client = self.tcp.accept()
        with connection:
            connection.settimeout(TIMEOUT)
            length = struct.unpack("!H", _read_exactly(connection, 2))[0]
            query = dns.message.from_wire(_read_exactly(connection, length))
            self.queries.append(("tcp", query))
            wire = self._reply(query, "tcp").to_wire(max_size=65535)
            connection.sendall(struct.pack("!H", len(wire)) + wire)

    def _reply(self, query: dns.message.Message, transport: str) -> dns.message.Message:
        reply = dns.message.make_response(query)
        reply.flags |= dns.flags.RA
        question = query.question[0]
        name = question.name.to_text().lower()
        if self.mode == "servfail":
            reply.set_rcode(dns.rcode.SERVFAIL)
        elif name == "forward.test." and question.rdtype == dns.rdatatype.A:
            reply.answer.append(dns.rrset.from_text(question.name, 60, "IN", "A", ANSWER))
        elif name == "big.forward.test." and question.rdtype == dns.rdatatype.TXT:
            if transport == "udp":
                reply.flags |= dns.flags.TC
            else:
                texts = [f'"record {index} {"x" * 40}"' for index in range(BIG_TXT_COUNT)]
                reply.answer.append(dns.rrset.from_text_list(question.name, 60, "IN", "TXT", texts))
        else:
            reply.set_rcode(dns.rcode.NXDOMAIN)
        return reply

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.udp.close()
        self.tcp.close()


def _read_exactly(connection: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed early")
        data += chunk
    return data


@pytest.fixture
def recursors():
    """Return a function that starts TinyRecursors; all are closed at the end of the test."""
    started: list[TinyRecursor] = []

    def start(mode: str = "answer") -> TinyRecursor:
        recursor = TinyRecursor(mode)
        started.append(recursor)
        return recursor

    yield start
    for recursor in started:
        recursor.close()


def run_server(test, recursor_addresses: list[tuple[str, int]]) -> None:
    """Run ``test(host, port)`` against a DnsServer on 127.0.0.1 that forwards to ``recursor_addresses``."""

    async def main() -> None:
        settings = ZoneSettings(recursors=recursor_addresses, recursor_timeout=RECURSOR_TIMEOUT)
        server = DnsServer(Responder(Registry(None), settings), [("127.0.0.1", 0)])
        await server.start()
        try:
            [(host, port)] = server.bound_addresses
            await asyncio.wait_for(test(host, port), 30)
        finally:
            await server.close()

    asyncio.run(main())


def addresses(response: dns.message.Message) -> list[str]:
    return [rdata.to_text() for rrset in response.answer for rdata in rrset]


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_forwarded_answer(recursors, transport):
    recursor = recursors()

    async def check(host: str, port: int) -> None:
        query = dns.message.make_query("FoRwArD.TeSt.", "A")
        send = dns.asyncquery.udp if transport == "udp" else dns.asyncquery.tcp
        response = await send(query, host, port=port, timeout=TIMEOUT)

        assert response.rcode() == dns.rcode.NOERROR
        assert addresses(response) == [ANSWER]
        assert response.id == query.id
        assert response.flags & dns.flags.RA
        assert response.flags & dns.flags.RD
        assert not response.flags & dns.flags.AA
        assert response.question[0].name.to_text() == "FoRwArD.TeSt."

    run_server(check, [recursor.address])

    [(_transport, upstream)] = recursor.queries
    assert upstream.flags & dns.flags.RD
    assert upstream.question[0].name.to_text() == "FoRwArD.TeSt."  # the case as asked


def test_upstream_id_is_new(recursors):
    recursor = recursors()

    async def check(host: str, port: int) -> None:
        for _ in range(4):
            query = dns.message.make_query("forward.test.", "A")
            query.id = 4242
            response = await dns.asyncquery.udp(query, host, port=port, timeout=TIMEOUT)
            assert response.id == 4242

    run_server(check, [recursor.address])

    upstream_ids = {query.id for _transport, query in recursor.queries}
    assert len(upstream_ids) > 1


def test_nxdomain_passed_on(recursors):
    recursor = recursors()

    async def check(host: str, port: int) -> None:
        query = dns.message.make_query("missing.forward.test.", "A")
        response = await dns.asyncquery.udp(query, host, port=port, timeout=TIMEOUT)

        assert response.rcode() == dns.rcode.NXDOMAIN
        assert response.flags & dns.flags.RA

    run_server(check, [recursor.address])


@pytest.mark.parametrize("first_mode", ["silent", "servfail"])
def test_next_recursor_after_failure(recursors, first_mode):
    first = recursors(first_mode)
    second = recursors()

    async def check(host: str, port: int) -> None:
        query = dns.message.make_query("forward.test.", "A")
        started = time.monotonic()
        response = await dns.asyncquery.udp(query, host, port=port, timeout=TIMEOUT)
        elapsed = time.monotonic() - started

        assert addresses(response) == [ANSWER]
        if first_mode == "silent":
            assert elapsed >= RECURSOR_TIMEOUT

    run_server(check, [first.address, second.address])

    assert len(first.queries) == 1
    assert len(second.queries) == 1


def test_all_recursors_failing_is_servfail(recursors, caplog):
    silent = recursors("silent")
    failing = recursors("servfail")

    async def check(host: str, port: int) -> None:
        query = dns.message.make_query("forward.test.", "A")
        response = await dns.asyncquery.udp(query, host, port=port, timeout=TIMEOUT)

        assert response.rcode() == dns.rcode.SERVFAIL
        assert response.flags & dns.flags.RA
        assert response.answer == []

    run_server(check, [silent.address, failing.address])

    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any("no recursor answered" in message and "timed out" in message for message in warnings)


def test_forged_reply_ignored(recursors):
    recursor = recursors("forged-first")

    async def check(host: str, port: int) -> None:
        query = dns.message.make_query("forward.test.", "A")
        response = await dns.asyncquery.udp(query, host, port=port, timeout=TIMEOUT)

        assert response.rcode() == dns.rcode.NOERROR
        assert addresses(response) == [ANSWER]

    run_server(check, [recursor.address])


def test_truncated_upstream_retried_over_tcp(recursors):
    recursor = recursors()

    async def check(host: str, port: int) -> None:
        query = dns.message.make_query("big.forward.test.", "TXT")
        udp = await dns.asyncquery.udp(query, host, port=port, timeout=TIMEOUT)
        tcp = await dns.asyncquery.tcp(query, host, port=port, timeout=TIMEOUT)

        # The full answer does not fit in 512 bytes: the client gets what fits, with TC.
        assert udp.flags & dns.flags.TC
        assert 0 < len(addresses(udp)) < BIG_TXT_COUNT
        assert not tcp.flags & dns.flags.TC
        assert len(addresses(tcp)) == BIG_TXT_COUNT

    run_server(check, [recursor.address])

    transports = [transport for transport, _query in recursor.queries]
    assert transports == ["udp", "tcp", "udp", "tcp"]


def test_refused_without_recursors():
    async def main() -> None:
        server = DnsServer(Responder(Registry(None), ZoneSettings()), [("127.0.0.1", 0)])
        await server.start()
        try:
            [(host, port)] = server.bound_addresses
            query = dns.message.make_query("forward.test.", "A")
            response = await dns.asyncquery.udp(query, host, port=port, timeout=TIMEOUT)
        finally:
            await server.close()

        assert response.rcode() == dns.rcode.REFUSED
        assert not response.flags & dns.flags.RA

    asyncio.run(main())


def test_server_process_forwards(server_factory, recursors):
    recursor = recursors()
    server = server_factory(extra_args=["--recursors", f"127.0.0.1:{recursor.port}", "--recursor-timeout", "1"])

    query = dns.message.make_query("forward.test.", "A")
    response = dns.query.udp(query, "127.0.0.1", port=server.dns_port, timeout=TIMEOUT)
    in_zone = dns.query.udp(dns.message.make_query("logpose.internal.", "SOA"), "127.0.0.1", port=server.dns_port, timeout=TIMEOUT)

    assert addresses(response) == [ANSWER]
    assert response.flags & dns.flags.RA
    assert in_zone.flags & dns.flags.RA
    assert in_zone.flags & dns.flags.AA
