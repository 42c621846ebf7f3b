"""Forwarding of names outside the zone to configured recursive resolvers."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any, cast

from dnslib import EDNS0, RCODE, DNSHeader, DNSQuestion, DNSRecord

DEFAULT_MAX_PENDING = 256

# A recursor's reply with one of these codes gives no information about the name, so the
# next recursor is queried.
_RETRY_RCODES = frozenset({RCODE.SERVFAIL, RCODE.REFUSED, RCODE.NOTIMP, RCODE.FORMERR})


class ForwardError(Exception):
    """No recursor gave a usable answer; the message names each recursor's failure."""


class Forwarder:
    """Asks the recursors one after another, each within ``timeout`` seconds.

    Every upstream query gets a new random message ID and, over UDP, a new socket whose
    port the kernel picks. A reply counts only when its ID and question match, so a
    forged reply has to guess both (RFC 5452 §9). An answer cut short over UDP
    (TC) is asked again over TCP. At most ``max_pending`` forwarded queries run at once,
    and more raise ForwardError at once, so a flood cannot open sockets without bound.
    """

    def __init__(
        self,
        recursors: tuple[tuple[str, int], ...],
        timeout: float,
        *,
        udp_payload: int = 1232,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> None:
        if not recursors:
            raise ValueError("a Forwarder needs at least one recursor")
        self._recursors = recursors
        self._timeout = timeout
        self._udp_payload = udp_payload
        self._max_pending = max_pending
        self._pending = 0

    async def resolve(self, question: DNSQuestion, *, checking_disabled: bool, dnssec_ok: bool) -> DNSRecord:
        """Return the first usable answer to ``question``, or raise ForwardError."""
        if self._pending >= self._max_pending:
            raise ForwardError(f"{self._pending} forwarded queries are already waiting, the maximum")
        self._pending += 1
        try:
            failures = []
            for host, port in self._recursors:
                query = _make_query(question, checking_disabled, dnssec_ok, self._udp_payload)
                try:
                    reply = await asyncio.wait_for(self._ask(host, port, query), self._timeout)
                except TimeoutError:
                    failures.append(f"{format_address(host, port)} timed out after {self._timeout:g} s")
                    continue
                except (OSError, ForwardError) as exc:
                    failures.append(f"{format_address(host, port)} failed: {exc}")
                    continue
                if reply.header.rcode in _RETRY_RCODES:
                    failures.append(f"{format_address(host, port)} answered {RCODE.get(reply.header.rcode)}")
                    continue
                return reply
            raise ForwardError("; ".join(failures))
        finally:
            self._pending -= 1

    async def _ask(self, host: str, port: int, query: DNSRecord) -> DNSRecord:
        reply = await _ask_udp(host, port, query)
        if reply.header.tc:
            reply = await _ask_tcp(host, port, query)
        return reply


def _make_query(question: DNSQuestion, checking_disabled: bool, dnssec_ok: bool, udp_payload: int) -> DNSRecord:
    header = DNSHeader(id=secrets.randbits(16), rd=1, cd=int(checking_disabled))
    query = DNSRecord(header, questions=[DNSQuestion(question.qname, question.qtype, question.qclass)])
    query.add_ar(EDNS0(udp_len=udp_payload, flags="do" if dnssec_ok else ""))
    return query


def _check_reply(wire: bytes, query: DNSRecord) -> DNSRecord:
    """Return the parsed reply to ``query``, or raise ForwardError when it is not one."""
    try:
        reply = DNSRecord.parse(wire)
    except Exception as exc:
        # DNSError for most damage, but dnslib raises other errors too (see answer.py).
        raise ForwardError(f"cannot decode the reply: {exc!r}") from exc
    if reply.header.id != query.header.id or not reply.header.qr:
        raise ForwardError("the reply's ID or QR flag does not match the query")
    if len(reply.questions) != 1 or not _same_question(reply.questions[0], query.questions[0]):
        raise ForwardError("the reply's question does not match the query")
    return reply


def _same_question(first: DNSQuestion, second: DNSQuestion) -> bool:
    # Compared as sent: a resolver must echo the name's case (RFC 1035 §7.3 and the 0x20 practice).
    return (first.qname.label, first.qtype, first.qclass) == (second.qname.label, second.qtype, second.qclass)


class _ReplyProtocol(asyncio.DatagramProtocol):
    """Resolves ``reply`` with the first datagram that is an answer to ``query``."""

    def __init__(self, query: DNSRecord) -> None:
        self.query = query
        self.reply: asyncio.Future[DNSRecord] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.reply.done():
            return
        try:
            self.reply.set_result(_check_reply(data, self.query))
        except ForwardError:
            # Not the answer, and maybe a forged one: keep waiting until the timeout.
            pass

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable arrives here: nothing listens at the recursor's address.
        if not self.reply.done():
            self.reply.set_exception(exc)


async def _ask_udp(host: str, port: int, query: DNSRecord) -> DNSRecord:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: _ReplyProtocol(query), remote_addr=(host, port)
    )
    try:
        cast(asyncio.DatagramTransport, transport).sendto(bytes(query.pack()))
        return await cast(_ReplyProtocol, protocol).reply
    finally:
        transport.close()


async def _ask_tcp(host: str, port: int, query: DNSRecord) -> DNSRecord:
    wire = bytes(query.pack())
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(len(wire).to_bytes(2, "big") + wire)
        await writer.drain()
        length = int.from_bytes(await reader.readexactly(2), "big")
        return _check_reply(await reader.readexactly(length), query)
    except asyncio.IncompleteReadError as exc:
        raise ForwardError("the connection closed before a whole reply arrived") from exc
    finally:
        writer.close()


def format_address(host: str, port: int) -> str:
    """Return ``host:port``, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
