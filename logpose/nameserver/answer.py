"""DNS message in, answer out: the zone's names computed from the registry's memory.

No sockets here; ``logpose.nameserver.transport`` feeds this module's ``Responder``.
Only healthy instances (``Registry.discoverable``) exist in the zone. Names relative
to the zone apex:

    (apex)                              SOA, NS ns.<zone>
    ns                                  A/AAAA from ZoneSettings.ns_addresses
    <service>                           A/AAAA of the IP instances, SRV of all instances
    _<transport>.<service>              empty non-terminal (NODATA for every type)
    _<protocol>._<transport>.<service>  SRV of the instances of that protocol (RFC 2782)
    <instance-id>.<service>             A or AAAA, or CNAME to the instance's host name

With ``ZoneSettings.reverse_zones``, the server is also authoritative for the reverse
zones of those networks: ``<address>.in-addr.arpa`` and ``<address>.ip6.arpa`` get a
PTR to ``<instance-id>.<service>.<zone>`` of each healthy instance at that address.

A service without a healthy instance does not exist, and neither does any name below
it (NXDOMAIN, RFC 8020). SRV records all have priority 1 and carry the instance's
weight and port. An SRV target of an IP instance is ``<instance-id>.<service>.<zone>``,
whose address goes in the additional section. An SRV target of an instance registered
by host name is that host name, with no additional record.

Choices where the RFCs leave room:
- A message with QR set is dropped without a response, so two servers never
  respond to each other's responses in a loop.
- ANY gets one RRset that exists at the name: SOA, else A, else AAAA, else SRV
  (RFC 8482 §4.1), or NODATA.
- AXFR and IXFR are REFUSED: the zone lives in memory and has no secondaries.
- A message with bytes after its last record gets FORMERR, as BIND does.
- With recursors configured, a query outside the zone with RD set is forwarded, and
  RA is set on every response (RFC 1035 §4.1.1). Without RD it is REFUSED, because
  the client did not ask for recursion.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import struct
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, TypeVar

from dnslib import CLASS, CNAME, EDNS0, NS, OPCODE, PTR, QTYPE, RCODE, RR, SOA, SRV, A, AAAA, DNSHeader, DNSLabel, DNSQuestion, DNSRecord
from dnslib.label import DNSBuffer

from logpose.log import dns_log
from logpose.model import AddressKind, Instance
from logpose.nameserver.cache import (
    APEX_BUCKET,
    DEFAULT_MAX_BYTES,
    AnswerCache,
    CachedAnswer,
    PeekedQuery,
    describe_response,
    patch_response,
    peek_query,
)
from logpose.nameserver.forward import Forwarder, ForwardError
from logpose.nameserver.reverse import address_of, reverse_apexes, reverse_name
from logpose.nameserver.throttle import LogThrottle
from logpose.nameserver.zone import MAX_MESSAGE_SIZE, MIN_UDP_PAYLOAD, ZoneSettings

if TYPE_CHECKING:
    from logpose.registry import Change, Registry

HEADER_SIZE = 12
SRV_PRIORITY = 1
# Extended RCODE 16 (RFC 6891 §6.1.3): its upper 8 bits travel in the OPT record.
RCODE_BADVERS = 16

# SOA timers in seconds. No secondary server ever transfers this zone, so they only
# have to be plausible (RFC 1912 §2.2).
SOA_REFRESH = 3600
SOA_RETRY = 600
SOA_EXPIRE = 86400

_MAX_LABEL_LENGTH = 63  # RFC 1035 §2.3.4
_MAX_NAME_LENGTH = 255  # on the wire, length octets and root included
_ANY_PREFERENCE = (QTYPE.SOA, QTYPE.A, QTYPE.AAAA, QTYPE.SRV, QTYPE.PTR)
_ZONE_TRANSFER_TYPES = frozenset({QTYPE.AXFR, QTYPE.IXFR})
_QR_FLAG = 0x8000
_MAX_ROTATION_KEYS = 10_000
# Starting points of the rotation of one name's records, each a cached response: a
# service with more records starts its answers at this many points spread over them.
_MAX_ROTATIONS = 8
_FAILURE_LOG_INTERVAL = 10.0  # seconds between two logged SERVFAIL tracebacks or forwarding failures

_header_struct = struct.Struct("!HH")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_T = TypeVar("_T")


# ----- lookup outcomes that are not a positive answer ------------------------


class _QueryError(Exception):
    """A query that gets no positive answer. ``_rcode_for`` maps it to an RCODE."""


class _FormatError(_QueryError):
    """The message cannot be interpreted as a query (FORMERR, RFC 1035 §4.1.1)."""


class _OpcodeNotImplemented(_QueryError):
    """An opcode other than QUERY (NOTIMP)."""


class _BadEdnsVersion(_QueryError):
    """An OPT record of an EDNS version other than 0 (BADVERS, RFC 6891 §6.1.3)."""


class _Refused(_QueryError):
    """A question this server is not authoritative for or does not serve (REFUSED)."""


class _Forward(_QueryError):
    """A question outside the zone that goes to the recursors."""


class _NameNotFound(_QueryError):
    """The name does not exist in the zone (NXDOMAIN, RFC 2308 §2.1)."""


class _NoData(_QueryError):
    """The name exists but has no record of the requested type (NODATA, RFC 2308 §2.2)."""


@dataclass(frozen=True, slots=True)
class _ResponseCode:
    rcode: int
    authoritative: bool  # sets AA, and a negative authoritative answer carries the SOA


def _rcode_for(error: Exception) -> _ResponseCode:
    """Map a lookup outcome to its response code: the one place that does it.

    An exception that is no ``_QueryError`` is a bug, answered with SERVFAIL.
    """
    if isinstance(error, _NameNotFound):
        return _ResponseCode(RCODE.NXDOMAIN, authoritative=True)
    if isinstance(error, _NoData):
        return _ResponseCode(RCODE.NOERROR, authoritative=True)
    if isinstance(error, _Refused):
        return _ResponseCode(RCODE.REFUSED, authoritative=False)
    if isinstance(error, _FormatError):
        return _ResponseCode(RCODE.FORMERR, authoritative=False)
    if isinstance(error, _OpcodeNotImplemented):
        return _ResponseCode(RCODE.NOTIMP, authoritative=False)
    if isinstance(error, _BadEdnsVersion):
        return _ResponseCode(RCODE_BADVERS, authoritative=False)
    return _ResponseCode(RCODE.SERVFAIL, authoritative=False)


# ----- request and answer ----------------------------------------------------


@dataclass(slots=True)
class _Request:
    """Fields of the query that the response echoes, set as far as the query could be read."""

    id: int
    opcode: int
    rd: int
    cd: int
    question: DNSQuestion | None = None
    edns: RR | None = None  # the query's OPT record
    apex: DNSLabel | None = None  # the apex of the zone the question is in, once known
    # The question name's labels in lower case; responses are packed with it.
    lower_name: DNSLabel | None = None
    # The question name as asked, without compression: it replaces the lower-case
    # name in the packed response, at the same offset and with the same length.
    name_wire: bytes = b""
    # The cache bucket of a question in the forward zone whose response may be cached.
    cache_bucket: str | None = None


@dataclass(slots=True)
class _Answer:
    """A response's sections, with the additional records in groups.

    In answers from the zone, ``additional[i]`` lists the additional records of ``records[i]``.
    """

    rcode: int = RCODE.NOERROR
    authoritative: bool = True
    records: list[RR] = field(default_factory=list)
    additional: list[list[RR]] = field(default_factory=list)
    authority: list[RR] = field(default_factory=list)
    rotation: _Rotation | None = None  # how the records were rotated, for the cache
    cacheable: bool = True


@dataclass(frozen=True, slots=True)
class _Rotation:
    """The rotation of one answer: ``count`` under ``key``, over ``period`` records."""

    key: tuple[tuple[bytes, ...], int]
    period: int
    count: int


@dataclass(frozen=True, slots=True)
class _Zone:
    """A zone this server is authoritative for: the forward zone or a reverse zone."""

    labels: tuple[bytes, ...]  # lower case
    apex: DNSLabel
    reverse: bool


@dataclass(frozen=True, slots=True)
class ForwardedQuery:
    """A query that ``Responder.respond`` left to the recursors; pass it to ``Responder.forward``."""

    request: _Request
    transport: str
    peer: str


class _NodeKind(enum.Enum):
    APEX = "apex"
    POINTER = "pointer"
    NAMESERVER = "nameserver"
    SERVICE = "service"
    SRV_NAME = "srv-name"
    EMPTY_NON_TERMINAL = "empty-non-terminal"
    INSTANCE = "instance"


@dataclass(frozen=True, slots=True)
class _Node:
    """A name that exists in the zone, with the healthy instances it publishes."""

    kind: _NodeKind
    relative: tuple[bytes, ...]  # lower-case labels below the apex
    code: str = ""
    instances: tuple[Instance, ...] = ()


# ----- the responder ---------------------------------------------------------


class Responder:
    """Answers DNS queries for one zone from a registry's in-memory catalog.

    Calls only the registry's synchronous read methods, so answering never waits on I/O.
    Only ``forward`` waits, on the recursors.

    Responses from the forward zone are cached in wire format, at most ``cache_bytes``
    bytes (0 turns the cache off), one per rotation position of each name, type and
    size class. A registry change drops the cached responses of its service and of
    the apex, and a reload of the whole catalog drops them all. A response that
    carries the SOA serial is also dropped when the change index moves.
    """

    def __init__(self, registry: Registry, settings: ZoneSettings, *, cache_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self._registry = registry
        self._settings = settings
        self._zone = tuple(label.encode("ascii") for label in settings.domain.split("."))
        self._zone_lower = tuple(label.lower() for label in self._zone)
        self._apex = DNSLabel(self._zone)
        self._nameserver = DNSLabel((b"ns",) + self._zone)
        self._hostmaster = DNSLabel((b"hostmaster",) + self._zone)
        self._zones = [_Zone(self._zone_lower, self._apex, reverse=False)]
        self._zones += [_Zone(labels, DNSLabel(labels), reverse=True) for labels in reverse_apexes(settings.reverse_zones)]
        self._rotation: dict[tuple[tuple[bytes, ...], int], int] = {}
        self._failure_log = LogThrottle(_FAILURE_LOG_INTERVAL)
        self._forward_log = LogThrottle(_FAILURE_LOG_INTERVAL)
        self._forwarder = (
            Forwarder(settings.recursors, settings.recursor_timeout, udp_payload=settings.max_udp_payload)
            if settings.recursors
            else None
        )
        # Healthy instances by IP address, for PTR answers: rebuilt on the first reverse
        # query after a registry change.
        self._by_address: dict[IPAddress, list[Instance]] | None = None
        self._by_address_index = -1
        if settings.reverse_zones:
            registry.subscribe(self._forget_addresses)
        # Called with (transport, query type or None, response code, seconds) for every
        # response returned, when set (see logpose.metrics). A query type or response
        # code may be any number the wire allows.
        self.observe: Callable[[str, int | None, int, float], None] | None = None
        subscribe = getattr(registry, "subscribe", None)
        # Without change notices a cached response could outlive its records, so a
        # registry stand-in that cannot notify gets no cache.
        self._cache = AnswerCache(cache_bytes if subscribe is not None else 0)
        if subscribe is not None:
            subscribe(self._forget_answers)

    @property
    def cache(self) -> AnswerCache:
        """The wire-format response cache, for its counters; the caller must not change it."""
        return self._cache

    def update_settings(self, settings: ZoneSettings) -> None:
        """Answer the next queries with ``settings``' TTLs and allow list.

        The domain, reverse zones and recursors stay those given to the
        constructor: changing them needs a new Responder.
        """
        self._settings = settings
        # Cached responses carry the old TTLs and payload size.
        self._cache.clear()

    def respond_cached(self, wire: bytes, transport: str, source: str | None = None) -> bytes | None:
        """Return the cached response to a plain query ``wire``, or None when ``respond`` must build it.

        Takes the same arguments as ``respond`` except ``peer``, and returns what
        ``respond`` would, so a transport can skip formatting the peer's address.
        This is the path of nearly every query under load: a query whose exact bytes
        were answered before skips reading the question.
        """
        started = time.perf_counter()
        if self._settings.allow and not self._is_allowed(source):
            return None
        known = self._cache.known_queries[transport].get(wire[2:])
        if known is not None:
            entry, name_end, qtype = known
            reply = self._reply_from(entry, wire, name_end)
        else:
            peeked = peek_query(wire)
            if peeked is None:
                return None
            entry = self._cache.get(self._cache_key(peeked, transport))
            if entry is None:
                self._cache.misses += 1
                return None
            qtype = peeked.qtype
            reply = self._reply_from(entry, wire, peeked.name_end)
            # Queries spelled in lower case only: a resolver that randomises the case
            # of names (the 0x20 defence) sends each spelling once.
            if reply is not None and wire[HEADER_SIZE : peeked.name_end] == peeked.name:
                self._cache.remember(transport, wire, entry, peeked.name_end, qtype)
        if reply is not None and self.observe is not None:
            self.observe(transport, qtype, entry.rcode, time.perf_counter() - started)
        return reply

    def respond(
        self, wire: bytes, transport: str, peer: str = "-", source: str | None = None
    ) -> bytes | ForwardedQuery | None:
        """Return the response to the DNS message ``wire``, or None to send nothing.

        ``transport`` is "udp" or "tcp" and sets the size limit: a UDP response is cut
        to fit the client's EDNS0 size (512 bytes without EDNS0), a TCP response may use
        up to 65,535 bytes. ``source`` is the client's IP address, checked against
        ``ZoneSettings.allow``: a client outside it, or an unknown source when the list
        is set, gets REFUSED. ``peer`` only names the client in log lines. Bad input
        raises nothing: a message shorter than a header, or one with QR set, returns
        None, and anything else unreadable gets FORMERR. A question for the recursors
        returns a ``ForwardedQuery`` that the caller passes to ``forward``.

        A plain query (see ``peek_query``) whose response is cached gets that response
        with its own ID, RD and CD flags and question spelling, byte for byte what
        building it again would give.
        """
        if self.observe is None:
            return self._respond(wire, transport, peer, source)
        started = time.perf_counter()
        reply = self._respond(wire, transport, peer, source)
        if type(reply) is bytes:
            qtype, rcode = describe_response(reply)
            self.observe(transport, qtype, rcode, time.perf_counter() - started)
        return reply

    def _respond(self, wire: bytes, transport: str, peer: str, source: str | None) -> bytes | ForwardedQuery | None:
        if transport not in ("udp", "tcp"):
            raise ValueError(f"transport must be 'udp' or 'tcp', got {transport!r}")
        if len(wire) < HEADER_SIZE:
            dns_log.debug("Dropped a %d-byte message from %s: shorter than a DNS header", len(wire), peer)
            return None
        message_id, flags = _header_struct.unpack_from(wire)
        if flags & _QR_FLAG:
            dns_log.debug("Dropped a message from %s with QR set: it is a response, not a query", peer)
            return None

        peeked = peek_query(wire)
        cache_key = None
        if peeked is not None and (not self._settings.allow or self._is_allowed(source)):
            cache_key = self._cache_key(peeked, transport)
            reply = self._cached_reply(wire, peeked, cache_key)
            if reply is not None:
                if dns_log.isEnabledFor(logging.DEBUG):
                    dns_log.debug(
                        "%s %s %s %s -> cached response, %d bytes",
                        peer, transport, _name_text(wire[HEADER_SIZE : peeked.name_end]), QTYPE.get(peeked.qtype), len(reply),
                    )
                return reply

        request = _Request(
            id=message_id,
            opcode=(flags >> 11) & 0xF,
            rd=(flags >> 8) & 1,
            cd=(flags >> 4) & 1,
        )
        try:
            self._read_request(wire, request)
            if self._settings.allow and not self._is_allowed(source):
                raise _Refused(f"source {source} is not in the allow list")
            answer = self._lookup(request)
        except _Forward:
            return ForwardedQuery(request, transport, peer)
        except Exception as error:
            if not isinstance(error, (_NameNotFound, _NoData)):
                request.cache_bucket = None
            answer = self._answer_error(request, error, peer)
        reply = self._finish(request, answer, transport, peer)
        if cache_key is not None and request.cache_bucket is not None and answer.cacheable:
            assert peeked is not None
            self._store_reply(cache_key, peeked, request, answer, reply)
        return reply

    async def forward(self, query: ForwardedQuery) -> bytes:
        """Ask the recursors and return the response to send, SERVFAIL when none answered.

        The recursor's records are passed on with their TTLs, re-encoded to fit the
        client's size limit like an answer from the zone, without AA.
        """
        started = time.perf_counter()
        reply = await self._forward(query)
        if self.observe is not None:
            qtype, rcode = describe_response(reply)
            self.observe(query.transport, qtype, rcode, time.perf_counter() - started)
        return reply

    async def _forward(self, query: ForwardedQuery) -> bytes:
        request = query.request
        assert self._forwarder is not None and request.question is not None
        try:
            reply = await self._forwarder.resolve(
                request.question,
                checking_disabled=bool(request.cd),
                dnssec_ok=bool(request.edns is not None and request.edns.edns_do),
            )
        except ForwardError as error:
            held_back = self._forward_log.ready()
            if held_back is not None:
                dns_log.warning(
                    "SERVFAIL for %s %s from %s: no recursor answered (%s); %d earlier failure(s) not logged",
                    request.question.qname, QTYPE.get(request.question.qtype), query.peer, error, held_back,
                )
            answer = _Answer(rcode=RCODE.SERVFAIL, authoritative=False)
        else:
            answer = _forwarded_answer(reply)
        return self._finish(request, answer, query.transport, query.peer)

    def _finish(self, request: _Request, answer: _Answer, transport: str, peer: str) -> bytes:
        limit = self._size_limit(request, transport)
        try:
            reply, truncated = self._encode(request, answer, limit)
        except Exception as error:
            request.cache_bucket = None
            answer = self._answer_error(request, error, peer)
            reply, truncated = self._encode(request, answer, limit)
        if request.name_wire:
            # Packed with the lower-case name; the question goes back as it was asked.
            end = HEADER_SIZE + len(request.name_wire)
            reply = reply[:HEADER_SIZE] + request.name_wire + reply[end:]

        if dns_log.isEnabledFor(logging.DEBUG):
            question = request.question
            dns_log.debug(
                "%s %s %s %s -> %s, %d answer record(s), %d bytes%s",
                peer,
                transport,
                question.qname if question else "-",
                QTYPE.get(question.qtype) if question else "-",
                RCODE.get(answer.rcode, answer.rcode),
                len(answer.records),
                len(reply),
                ", truncated" if truncated else "",
            )
        return reply

    # ----- the response cache --------------------------------------------

    def _cache_key(self, query: PeekedQuery, transport: str) -> tuple[bytes, int, int, int]:
        if transport == "tcp":
            limit = MAX_MESSAGE_SIZE
        elif query.udp_payload is None:
            limit = MIN_UDP_PAYLOAD
        else:
            limit = max(MIN_UDP_PAYLOAD, min(query.udp_payload, self._settings.max_udp_payload))
        # 0: no OPT record, 1: OPT, 2: OPT with DO, which the response's OPT copies.
        edns = 0 if query.udp_payload is None else 1 + query.dnssec_ok
        return (query.name, query.qtype, limit, edns)

    def _cached_reply(self, wire: bytes, query: PeekedQuery, key: tuple[bytes, int, int, int]) -> bytes | None:
        entry = self._cache.get(key)
        if entry is None:
            self._cache.misses += 1
            return None
        return self._reply_from(entry, wire, query.name_end)

    def _reply_from(self, entry: CachedAnswer, wire: bytes, name_end: int) -> bytes | None:
        """Return ``entry``'s response patched for the query ``wire``, or None when it must be built."""
        cache = self._cache
        if not entry.live or (entry.index is not None and entry.index != self._registry.index):
            cache.misses += 1
            return None
        if entry.rotation_key is None:
            cached = entry.variants[0]
        else:
            count = self._rotation.get(entry.rotation_key, 0)
            cached = entry.variants[count % entry.period]
            if cached is None:
                # This rotation position was not built yet: the full path builds it
                # at the same count and stores it.
                cache.misses += 1
                return None
            self._advance_rotation(entry.rotation_key, count)
        cache.hits += 1
        return patch_response(cached, wire, name_end)

    def _store_reply(
        self, key: tuple[bytes, int, int, int], query: PeekedQuery, request: _Request, answer: _Answer, reply: bytes
    ) -> None:
        assert request.cache_bucket is not None
        # Stored with the lower-case name, which every spelling of the name patches over.
        canonical = reply[:HEADER_SIZE] + query.name + reply[query.name_end :]
        records = answer.records + answer.authority
        carries_serial = any(record.rtype == QTYPE.SOA for record in records)
        rotation = answer.rotation
        self._cache.store(
            key,
            bucket=request.cache_bucket,
            period=rotation.period if rotation else 1,
            rotation_key=rotation.key if rotation else None,
            position=rotation.count if rotation else 0,
            index=self._registry.index if carries_serial else None,
            rcode=answer.rcode,
            wire=canonical,
        )

    def _forget_answers(self, change: Change) -> None:
        if not change.service:
            # A reload of the whole catalog.
            self._cache.clear()
            return
        self._cache.drop_bucket(change.service)
        # The apex's SOA carries the change index as its serial.
        self._cache.drop_bucket(APEX_BUCKET)

    # ----- reading the query ---------------------------------------------

    def _is_allowed(self, source: str | None) -> bool:
        try:
            address = ipaddress.ip_address(source) if source is not None else None
        except ValueError:
            return False
        return address is not None and any(address in network for network in self._settings.allow)

    def _read_request(self, wire: bytes, request: _Request) -> None:
        # Checked before parsing: other opcodes (UPDATE, NOTIFY) give the sections
        # other meanings, and dnslib rejects their zero-length records.
        if request.opcode != OPCODE.QUERY:
            raise _OpcodeNotImplemented(f"opcode {OPCODE.get(request.opcode)} is not implemented")
        message = _parse_message(wire)

        options = [record for record in message.ar if record.rtype == QTYPE.OPT]
        if len(options) > 1:
            raise _FormatError(f"{len(options)} OPT records, but a message has at most one (RFC 6891 §6.1.1)")
        if options:
            request.edns = options[0]
        if len(message.questions) != 1:
            raise _FormatError(f"{len(message.questions)} questions, but a query has exactly one")
        question = message.questions[0]
        _validate_name(question.qname)
        request.question = question
        request.lower_name = DNSLabel(tuple(label.lower() for label in question.qname.label))
        request.name_wire = b"".join(bytes((len(label),)) + label for label in question.qname.label) + b"\x00"
        if request.edns is not None and request.edns.edns_ver != 0:
            raise _BadEdnsVersion(f"EDNS version {request.edns.edns_ver} is not supported, only version 0")

    # ----- finding the answer --------------------------------------------

    def _lookup(self, request: _Request) -> _Answer:
        question = request.question
        assert question is not None
        if question.qclass != CLASS.IN:
            raise _Refused(f"class {CLASS.get(question.qclass)} is not served, only IN")
        if question.qtype in _ZONE_TRANSFER_TYPES:
            raise _Refused("zone transfers are not offered")
        labels = tuple(label.lower() for label in question.qname.label)
        zone = self._zone_of(labels)
        if zone is None:
            if self._forwarder is not None and request.rd:
                raise _Forward()
            raise _Refused(f"{question.qname} is outside the zones of this server")
        request.apex = zone.apex

        relative = labels[: len(labels) - len(zone.labels)]
        if not zone.reverse:
            # PTR answers depend on every service, so reverse zones are not cached.
            below_apex = relative and relative != (b"ns",)
            request.cache_bucket = relative[-1].decode("utf-8", "replace") if below_apex else APEX_BUCKET
        node = self._find_reverse_node(relative, zone) if zone.reverse else self._find_node(relative)
        answer = _Answer()
        # Owners are packed in lower case: they compress to the question, which goes
        # back as asked, so they read as the client spelled them.
        assert request.lower_name is not None
        self._add_records(answer, node, request.lower_name, question.qtype)
        if not answer.records:
            raise _NoData(f"{question.qname} has no {QTYPE.get(question.qtype)} record")
        return answer

    def _zone_of(self, labels: tuple[bytes, ...]) -> _Zone | None:
        """Return the zone that contains the name, the closest one when zones nest."""
        for zone in self._zones:
            size = len(zone.labels)
            if len(labels) >= size and labels[len(labels) - size :] == zone.labels:
                return zone
        return None

    def _find_reverse_node(self, relative: tuple[bytes, ...], zone: _Zone) -> _Node:
        """Return what exists at the name below a reverse zone's apex, or raise _NameNotFound."""
        labels = relative + zone.labels
        by_address = self._healthy_by_address()
        ip = address_of(labels)
        instances = by_address.get(ip) if ip is not None else None
        if instances:
            # Also the apex when the reverse zone is a single address (a /32 or /128).
            return _Node(_NodeKind.POINTER, relative, instances=tuple(instances))
        if not relative:
            return _Node(_NodeKind.APEX, relative)
        if ip is not None:
            raise _NameNotFound(f"no healthy instance has the address {ip}")
        # A shorter name exists when an address lies below it (RFC 8020).
        size = len(labels)
        if any(reverse_name(address)[-size:] == labels for address in by_address):
            return _Node(_NodeKind.EMPTY_NON_TERMINAL, relative)
        raise _NameNotFound(f"no healthy instance has an address below {b'.'.join(labels)!r}")

    def _healthy_by_address(self) -> dict[IPAddress, list[Instance]]:
        registry = self._registry
        if self._by_address is None or self._by_address_index != registry.index:
            by_address: dict[IPAddress, list[Instance]] = {}
            for service in registry.services():
                for instance in registry.discoverable(service.code):
                    if instance.address.ip is not None:
                        by_address.setdefault(instance.address.ip, []).append(instance)
            self._by_address = by_address
            self._by_address_index = registry.index
        return self._by_address

    def _forget_addresses(self, _change: object) -> None:
        # Health changes may leave the index as it is, so every change clears the map.
        self._by_address = None

    def _find_node(self, relative: tuple[bytes, ...]) -> _Node:
        """Return what exists at the name below the apex, or raise _NameNotFound."""
        if not relative:
            return _Node(_NodeKind.APEX, relative)
        if relative == (b"ns",):
            return _Node(_NodeKind.NAMESERVER, relative)

        code = relative[-1].decode("utf-8", "replace")
        healthy = tuple(self._registry.discoverable(code))
        if not healthy:
            raise _NameNotFound(f"service {code!r} has no healthy instance")
        below = relative[:-1]
        if not below:
            return _Node(_NodeKind.SERVICE, relative, code, healthy)

        if len(below) == 1:
            label = below[0].decode("utf-8", "replace")
            if label in ("_tcp", "_udp"):
                if any(instance.protocol.srv_labels[1] == label for instance in healthy):
                    return _Node(_NodeKind.EMPTY_NON_TERMINAL, relative, code)
                raise _NameNotFound(f"service {code!r} has no healthy instance over {label}")
            for instance in healthy:
                if instance.id.lower() == label:
                    return _Node(_NodeKind.INSTANCE, relative, code, (instance,))
            raise _NameNotFound(f"service {code!r} has no healthy instance {label!r}")

        if len(below) == 2:
            srv_labels = (below[0].decode("utf-8", "replace"), below[1].decode("utf-8", "replace"))
            matching = tuple(instance for instance in healthy if instance.protocol.srv_labels == srv_labels)
            if matching:
                return _Node(_NodeKind.SRV_NAME, relative, code, matching)
        raise _NameNotFound(f"no name {b'.'.join(relative)!r} below the apex")

    def _add_records(self, answer: _Answer, node: _Node, owner: DNSLabel, qtype: int) -> None:
        """Add the node's records of ``qtype``, owned by ``owner`` as the query spelled it."""
        if qtype == QTYPE.ANY:
            for candidate in _ANY_PREFERENCE:
                self._add_records(answer, node, owner, candidate)
                if answer.records:
                    return
            return

        kind = node.kind
        if kind is _NodeKind.APEX:
            if qtype == QTYPE.SOA:
                self._add(answer, self._soa_record(owner))
            elif qtype == QTYPE.NS:
                glue = [self._address_record(self._nameserver, ipaddress.ip_address(address))
                        for address in self._settings.ns_addresses]
                self._add(answer, RR(owner, QTYPE.NS, ttl=self._settings.ttl, rdata=NS(self._nameserver)), glue)
        elif kind is _NodeKind.NAMESERVER:
            if qtype in (QTYPE.A, QTYPE.AAAA):
                for address in self._settings.ns_addresses:
                    ip = ipaddress.ip_address(address)
                    if _address_type(ip) == qtype:
                        self._add(answer, self._address_record(owner, ip))
        elif kind is _NodeKind.SERVICE:
            if qtype in (QTYPE.A, QTYPE.AAAA):
                addresses = self._rotated(
                    answer, node.relative, qtype, _unique_addresses(node.instances, qtype), self._settings.answer_limit
                )
                if self._settings.answer_limit:
                    # Rotation first, so every address still takes its turn at the front.
                    addresses = addresses[: self._settings.answer_limit]
                for ip in addresses:
                    self._add(answer, self._address_record(owner, ip))
            elif qtype == QTYPE.SRV:
                self._add_srv_records(answer, owner, node.code, self._rotated(answer, node.relative, qtype, node.instances))
        elif kind is _NodeKind.SRV_NAME:
            if qtype == QTYPE.SRV:
                self._add_srv_records(answer, owner, node.code, self._rotated(answer, node.relative, qtype, node.instances))
        elif kind is _NodeKind.INSTANCE:
            instance = node.instances[0]
            if instance.address.kind is AddressKind.HOSTNAME:
                # A CNAME answers every type at its name (RFC 1034 §3.6.2). The target is
                # outside the zone, so it is left to the client's resolver to follow.
                target = _host_label(instance.address.host)
                self._add(answer, RR(owner, QTYPE.CNAME, ttl=self._settings.ttl, rdata=CNAME(target)))
            elif instance.address.ip is not None and _address_type(instance.address.ip) == qtype:
                self._add(answer, self._address_record(owner, instance.address.ip))
        elif kind is _NodeKind.POINTER:
            if qtype == QTYPE.PTR:
                for instance in node.instances:
                    target = DNSLabel((instance.id.lower().encode("ascii"), instance.service.encode("ascii")) + self._zone)
                    self._add(answer, RR(owner, QTYPE.PTR, ttl=self._settings.ttl, rdata=PTR(target)))
            elif not node.relative:
                self._add_records(answer, _Node(_NodeKind.APEX, ()), owner, qtype)
        # An empty non-terminal has no records of any type.

    def _add_srv_records(self, answer: _Answer, owner: DNSLabel, code: str, instances: tuple[Instance, ...]) -> None:
        code_label = code.encode("ascii")
        for instance in instances:
            address = instance.address
            if address.kind is AddressKind.HOSTNAME:
                target = _host_label(address.host)
                glue = []
            else:
                target = DNSLabel((instance.id.lower().encode("ascii"), code_label) + self._zone)
                glue = [self._address_record(target, address.ip)]
            rdata = SRV(priority=SRV_PRIORITY, weight=instance.weight, port=address.port, target=target)
            self._add(answer, RR(owner, QTYPE.SRV, ttl=self._settings.ttl, rdata=rdata), glue)

    def _rotated(
        self, answer: _Answer, relative: tuple[bytes, ...], qtype: int, items: tuple[_T, ...], shown: int = 0
    ) -> tuple[_T, ...]:
        """Return ``items`` starting at the next starting point at every query for this name and type.

        Clients mostly take the first record, so rotating spreads the load. Up to
        ``_MAX_ROTATIONS`` records, every record starts an answer in turn. With more,
        that many starting points are spread evenly over them, each a cached response,
        unless answers cut to ``shown`` records would then leave some out: then there
        are enough starting points to show every record. The rotation is noted in
        ``answer`` so the cache can store the response under it.
        """
        size = len(items)
        if size < 2:
            return items
        period = min(size, max(_MAX_ROTATIONS, -(-size // shown) if shown else 0))
        key = (relative, qtype)
        count = self._rotation.get(key, 0)
        self._advance_rotation(key, count)
        if answer.rotation is not None:
            # Two rotations in one answer do not fit one rotation position.
            answer.cacheable = False
        answer.rotation = _Rotation(key, period, count)
        start = (count % period) * size // period
        return items[start:] + items[:start]

    def _advance_rotation(self, key: tuple[tuple[bytes, ...], int], count: int) -> None:
        if len(self._rotation) >= _MAX_ROTATION_KEYS and key not in self._rotation:
            # Bounds the table when many services come and go. Rotation restarts at 0.
            self._rotation.clear()
        self._rotation[key] = count + 1

    @staticmethod
    def _add(answer: _Answer, record: RR, additional: list[RR] | None = None) -> None:
        answer.records.append(record)
        answer.additional.append(additional or [])

    def _address_record(self, owner: DNSLabel, ip: IPAddress) -> RR:
        if ip.version == 4:
            return RR(owner, QTYPE.A, ttl=self._settings.ttl, rdata=A(tuple(ip.packed)))
        return RR(owner, QTYPE.AAAA, ttl=self._settings.ttl, rdata=AAAA(tuple(ip.packed)))

    def _soa_record(self, owner: DNSLabel) -> RR:
        # Both the record's TTL and MINIMUM are the negative TTL: resolvers cache a
        # negative answer for the smaller of the two (RFC 2308 §5).
        times = (
            self._registry.index % 2**32,
            SOA_REFRESH,
            SOA_RETRY,
            SOA_EXPIRE,
            self._settings.negative_ttl,
        )
        return RR(owner, QTYPE.SOA, ttl=self._settings.negative_ttl, rdata=SOA(self._nameserver, self._hostmaster, times))

    # ----- errors and encoding -------------------------------------------

    def _answer_error(self, request: _Request, error: Exception, peer: str) -> _Answer:
        code = _rcode_for(error)
        if isinstance(error, _FormatError):
            dns_log.debug("Malformed query from %s: %s", peer, error)
        elif not isinstance(error, _QueryError):
            self._log_failure(request, error, peer)
        answer = _Answer(rcode=code.rcode, authoritative=code.authoritative)
        if code.authoritative:
            # RFC 2308 §3: a negative answer carries the zone's SOA in the authority section.
            answer.authority.append(self._soa_record(request.apex or self._apex))
        return answer

    def _log_failure(self, request: _Request, error: Exception, peer: str) -> None:
        # An unexpected error is a bug, but one query could trigger it at packet rate,
        # so at most one traceback is logged per interval.
        held_back = self._failure_log.ready()
        if held_back is None:
            return
        question = request.question
        dns_log.error(
            "SERVFAIL for %s %s from %s (%d earlier failure(s) not logged)",
            question.qname if question else "-",
            QTYPE.get(question.qtype) if question else "-",
            peer,
            held_back,
            exc_info=error,
        )

    def _size_limit(self, request: _Request, transport: str) -> int:
        if transport == "tcp":
            return MAX_MESSAGE_SIZE
        if request.edns is None:
            return MIN_UDP_PAYLOAD
        return max(MIN_UDP_PAYLOAD, min(request.edns.edns_len, self._settings.max_udp_payload))

    def _encode(self, request: _Request, answer: _Answer, limit: int) -> tuple[bytes, bool]:
        """Pack the answer into at most ``limit`` bytes; return the wire and whether TC is set.

        Additional records go first (without TC, RFC 2181 §9), then whole answer
        records from the end, and only leaving out answer records sets TC.
        """
        additional = [record for group in answer.additional for record in group]
        wire = self._pack(request, answer, answer.records, additional, truncated=False)
        if len(wire) <= limit:
            return wire, False

        without_additional = self._pack(request, answer, answer.records, [], truncated=False)
        if len(without_additional) <= limit:
            wire = _largest_fitting(
                len(additional), lambda count: self._pack(request, answer, answer.records, additional[:count], False), limit
            )
            return wire, False

        wire = _largest_fitting(
            len(answer.records), lambda count: self._pack(request, answer, answer.records[:count], [], True), limit
        )
        return wire, True

    def _pack(self, request: _Request, answer: _Answer, records: list[RR], additional: list[RR], truncated: bool) -> bytes:
        header = DNSHeader(
            id=request.id,
            bitmap=0,
            qr=1,
            opcode=request.opcode,
            aa=int(answer.authoritative),
            tc=int(truncated),
            rd=request.rd,
            ra=int(self._forwarder is not None),
            cd=request.cd,
            rcode=answer.rcode & 0xF,
        )
        question = request.question
        if question is not None and request.lower_name is not None:
            question = DNSQuestion(request.lower_name, question.qtype, question.qclass)
        message = DNSRecord(
            header,
            questions=[question] if question is not None else [],
            rr=list(records),
            auth=list(answer.authority),
            ar=list(additional),
        )
        if request.edns is not None:
            # RFC 6891 §6.1.1 and §7: a query with OPT gets OPT back, truncated or not.
            # The DO bit is copied (RFC 3225 §3) although no record here is signed.
            message.add_ar(
                EDNS0(
                    udp_len=self._settings.max_udp_payload,
                    ext_rcode=answer.rcode >> 4,
                    flags="do" if request.edns.edns_do else "",
                )
            )
        return bytes(message.pack())


def _largest_fitting(total: int, pack: Callable[[int], bytes], limit: int) -> bytes:
    """Binary-search the largest count in 0..total whose ``pack(count)`` fits in ``limit``.

    ``pack(0)`` must fit, and a larger count never packs smaller.
    """
    low, high = 0, total
    best = pack(0)
    while low < high:
        middle = (low + high + 1) // 2
        wire = pack(middle)
        if len(wire) <= limit:
            low, best = middle, wire
        else:
            high = middle - 1
    return best


def _parse_message(wire: bytes) -> DNSRecord:
    """Decode a query as ``DNSRecord.parse`` does, and reject bytes after its last record."""
    buffer = DNSBuffer(wire)
    try:
        header = DNSHeader.parse(buffer)
        questions = [DNSQuestion.parse(buffer) for _ in range(header.q)]
        sections = [[RR.parse(buffer) for _ in range(count)] for count in (header.a, header.auth, header.ar)]
    except Exception as exc:
        # dnslib raises DNSError for most damage, but a long chain of compression
        # pointers raises RecursionError, so every exception means "malformed".
        raise _FormatError(f"cannot decode the message: {exc!r}") from exc
    if buffer.offset != len(wire):
        raise _FormatError(f"{len(wire) - buffer.offset} bytes after the last record")
    return DNSRecord(header, questions, sections[0], auth=sections[1], ar=sections[2])


def _forwarded_answer(reply: DNSRecord) -> _Answer:
    """Return a recursor's reply as an answer of this server, without AA."""
    options = [record for record in reply.ar if record.rtype == QTYPE.OPT]
    extended = (options[0].ttl >> 24) << 4 if options else 0  # RFC 6891 §6.1.3
    additional = [record for record in reply.ar if record.rtype != QTYPE.OPT]
    return _Answer(
        rcode=extended | reply.header.rcode,
        authoritative=False,
        records=list(reply.rr),
        additional=[additional],
        authority=list(reply.auth),
    )


def _name_text(name_wire: bytes) -> str:
    """Return an uncompressed name in wire format as text, for log lines."""
    labels = []
    position = 0
    while name_wire[position]:
        length = name_wire[position]
        labels.append(name_wire[position + 1 : position + 1 + length].decode("ascii", "backslashreplace"))
        position += length + 1
    return ".".join(labels) + "."


def _validate_name(name: DNSLabel) -> None:
    # dnslib reads label lengths 64-191 (reserved label types) as plain lengths and
    # does not add up a name built from compression pointers, so both limits of
    # RFC 1035 §2.3.4 are checked here.
    for label in name.label:
        if len(label) > _MAX_LABEL_LENGTH:
            raise _FormatError(f"a label of {len(label)} octets, above the maximum of {_MAX_LABEL_LENGTH}")
    wire_length = sum(len(label) + 1 for label in name.label) + 1
    if wire_length > _MAX_NAME_LENGTH:
        raise _FormatError(f"a name of {wire_length} octets, above the maximum of {_MAX_NAME_LENGTH}")


def _unique_addresses(instances: tuple[Instance, ...], qtype: int) -> tuple[IPAddress, ...]:
    """Return the instances' IP addresses of the type's family, each once, in instance order.

    Instances that share an address (several ports or protocols) give one record.
    """
    addresses = (instance.address.ip for instance in instances)
    return tuple(dict.fromkeys(ip for ip in addresses if ip is not None and _address_type(ip) == qtype))


def _address_type(ip: IPAddress) -> int:
    return QTYPE.A if ip.version == 4 else QTYPE.AAAA


def _host_label(host: str) -> DNSLabel:
    """Return a registered host name as an absolute DNS name."""
    return DNSLabel(tuple(host.rstrip(".").encode("ascii").split(b".")))
