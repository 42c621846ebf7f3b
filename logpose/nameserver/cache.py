"""Responses kept in wire format, and the reader that finds a query's cache key without dnslib.

A cached response was packed with the question name in lower case. Serving it to
another query of the same name, type and size class patches only the message ID, the
RD and CD flags and the question name's bytes (the query's own spelling, which has
the same length). Compression pointers into the question stay valid because no
offset moves, so owner names that point at the question read as the client spelled
them.

The cache also remembers, per transport, the exact bytes of recent queries that it
served, from the flags to the end, so a repeated query skips ``peek_query``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Hashable

HEADER_SIZE = 12
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
# A rough per-entry cost of the key, the entry and the dictionaries, counted with
# the wire bytes against the size bound.
ENTRY_OVERHEAD = 400

_OPT_TYPE = 41  # RFC 6891 §6.1.2
_DO_FLAG = 0x8000  # in the OPT record's TTL field (RFC 3225 §3)
_OPT_LENGTH = 11  # root name, type, class, TTL and a zero RDLENGTH
_MAX_NAME_LENGTH = 255
_MAX_LABEL_LENGTH = 63
_ECHOED_FLAGS = 0x0110  # RD and CD, copied from the query into the response
_header = struct.Struct("!HHHHHH")
_type_class = struct.Struct("!HH")
_opt_fields = struct.Struct("!HHIH")
_flags = struct.Struct("!H")

# Queries remembered per transport: past this many the table starts empty again.
MAX_KNOWN_QUERIES = 8192

# The bucket of the zone apex and ns.<zone>, whose answers do not belong to a service.
APEX_BUCKET = "."


@dataclass(frozen=True, slots=True)
class PeekedQuery:
    """The parts of a plain query that select its cached response.

    ``name_end`` is the offset just past the question name. ``udp_payload`` is the
    OPT record's payload size, or None without OPT.
    """

    name: bytes  # the question name as on the wire, lower case
    name_end: int
    qtype: int
    udp_payload: int | None
    dnssec_ok: bool


def peek_query(wire: bytes) -> PeekedQuery | None:
    """Read the header and the question of a plain query, or return None for anything else.

    A plain query has opcode QUERY, QR clear, one question of class IN whose name
    uses no compression, no answer or authority records, and at most one additional
    record: an OPT of EDNS version 0 without options or flags other than DO. Every
    other message, valid or not, returns None and takes the full parser.
    """
    size = len(wire)
    if size < HEADER_SIZE + 5:
        return None
    _id, flags, questions, answers, authority, additional = _header.unpack_from(wire)
    # QR and the opcode are the top five bits, and a plain query has all of them clear.
    if flags & 0xF800 or questions != 1 or answers or authority or additional > 1:
        return None

    position = HEADER_SIZE
    while True:
        length = wire[position]
        if length == 0:
            break
        if length > _MAX_LABEL_LENGTH:
            # A compression pointer or a reserved label type.
            return None
        position += length + 1
        if position >= size:
            return None
    name_end = position + 1
    if name_end - HEADER_SIZE > _MAX_NAME_LENGTH or name_end + 4 > size:
        return None
    qtype, qclass = _type_class.unpack_from(wire, name_end)
    if qclass != 1:
        return None
    position = name_end + 4

    udp_payload = None
    dnssec_ok = False
    if additional:
        if size - position != _OPT_LENGTH or wire[position] != 0:
            return None
        rtype, payload, ttl, rdlength = _opt_fields.unpack_from(wire, position + 1)
        # Extended RCODE, version and flags other than DO must all be zero here.
        if rtype != _OPT_TYPE or rdlength or ttl & ~_DO_FLAG:
            return None
        udp_payload = payload
        dnssec_ok = bool(ttl & _DO_FLAG)
    elif position != size:
        return None
    return PeekedQuery(wire[HEADER_SIZE:name_end].lower(), name_end, qtype, udp_payload, dnssec_ok)


def describe_response(response: bytes) -> tuple[int | None, int]:
    """Return the query type (None without a question) and the response code of a response this server packed.

    The question is the first name after the header and is never compressed
    (RFC 1035 §4.1.4 allows pointers only to earlier names). The response code's
    upper bits travel in the OPT record (RFC 6891 §6.1.3), which this server
    always packs last and without options. A message shorter than a header gives
    (None, -1).
    """
    size = len(response)
    if size < HEADER_SIZE:
        return None, -1
    rcode = response[3] & 0x0F
    if response[11] or response[10]:  # ARCOUNT > 0: the OPT record, if any, is the last record
        opt = response[-_OPT_LENGTH:]
        if size >= HEADER_SIZE + _OPT_LENGTH and opt[0] == 0 and opt[1] << 8 | opt[2] == _OPT_TYPE:
            rcode |= opt[5] << 4
    qtype = None
    if response[4] or response[5]:  # QDCOUNT > 0
        offset = HEADER_SIZE
        while offset < size and response[offset]:
            offset += response[offset] + 1
        if offset + 3 <= size:
            qtype = response[offset + 1] << 8 | response[offset + 2]
    return qtype, rcode


def patch_response(cached: bytes, wire: bytes, name_end: int) -> bytes:
    """Return ``cached`` with the ID, RD, CD and the question name's spelling of the query ``wire``.

    The caller guarantees that both messages' question names end at ``name_end`` and
    differ at most in letter case.
    """
    query_flags = wire[2] << 8 | wire[3]
    cached_flags = cached[2] << 8 | cached[3]
    flags = (cached_flags & ~_ECHOED_FLAGS) | (query_flags & _ECHOED_FLAGS)
    return b"".join((wire[:2], _flags.pack(flags), cached[4:HEADER_SIZE], wire[HEADER_SIZE:name_end], cached[name_end:]))


@dataclass(slots=True)
class CachedAnswer:
    """The responses to one name, type and size class: one per rotation position.

    ``rcode`` is the responses' response code. ``live`` turns False, and the
    variants are let go, when the cache drops the entry. ``variants[i]`` is the response packed when the rotation counter under
    ``rotation_key`` stood at a value ``i`` modulo ``period``, or None until a query
    needed it. ``index`` is the registry's change index when the response carries
    it (an SOA serial), and None when the response does not depend on it.
    """

    bucket: str
    period: int
    rotation_key: Hashable | None
    index: int | None
    rcode: int = 0
    variants: list[bytes | None] = field(default_factory=list)
    size: int = ENTRY_OVERHEAD
    live: bool = True


class AnswerCache:
    """Cached responses by key, grouped in buckets that are dropped together.

    A bucket is a service code, or ``APEX_BUCKET``. The total size of the stored
    responses, with ``ENTRY_OVERHEAD`` per entry, stays at most ``max_bytes``: a new
    entry first drops the oldest ones. A ``max_bytes`` of 0 stores nothing.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be 0 or more, got {max_bytes}")
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self._entries: dict[Hashable, CachedAnswer] = {}
        self._buckets: dict[str, set[Hashable]] = {}
        self._size = 0
        # By transport: the query's bytes after the message ID -> (entry, name_end, qtype).
        # Read directly by the responder's fast path; filled by remember().
        self.known_queries: dict[str, dict[bytes, tuple[CachedAnswer, int, int]]] = {"udp": {}, "tcp": {}}

    def get(self, key: Hashable) -> CachedAnswer | None:
        return self._entries.get(key)

    def store(
        self,
        key: Hashable,
        *,
        bucket: str,
        period: int,
        rotation_key: Hashable | None,
        position: int,
        index: int | None,
        rcode: int,
        wire: bytes,
    ) -> None:
        """Keep ``wire`` as the response at rotation ``position`` (modulo ``period``) for ``key``."""
        if not self.max_bytes:
            return
        entry = self._entries.get(key)
        if entry is not None and (
            entry.period != period or entry.rotation_key != rotation_key or entry.index != index or entry.rcode != rcode
        ):
            # Built from another state of the catalog: start over.
            self._remove(key)
            entry = None
        if entry is None:
            entry = CachedAnswer(bucket, period, rotation_key, index, rcode, [None] * period)
            self._entries[key] = entry
            self._buckets.setdefault(bucket, set()).add(key)
            self._size += entry.size
        slot = position % period
        previous = entry.variants[slot]
        grown = len(wire) - (len(previous) if previous is not None else 0)
        entry.variants[slot] = wire
        entry.size += grown
        self._size += grown
        self._evict(keep=key)

    def remember(self, transport: str, wire: bytes, entry: CachedAnswer, name_end: int, qtype: int) -> None:
        """Record that the query ``wire`` over ``transport`` is served from ``entry``.

        The caller guarantees that ``wire`` is a plain query (see ``peek_query``)
        whose question name ends at ``name_end`` and selects ``entry``.
        """
        known = self.known_queries[transport]
        if len(known) >= MAX_KNOWN_QUERIES:
            known.clear()
        known[wire[2:]] = (entry, name_end, qtype)

    def drop_bucket(self, bucket: str) -> None:
        for key in self._buckets.pop(bucket, ()):
            self._let_go(self._entries.pop(key))

    def clear(self) -> None:
        for entry in self._entries.values():
            entry.live = False
        self._entries.clear()
        self._buckets.clear()
        for known in self.known_queries.values():
            known.clear()
        self._size = 0

    @property
    def size(self) -> int:
        """Bytes counted against ``max_bytes``."""
        return self._size

    def __len__(self) -> int:
        return len(self._entries)

    def _let_go(self, entry: CachedAnswer) -> None:
        # known_queries may point at the entry until that query comes again. Marked
        # dead and stripped of its responses, the entry costs little there.
        entry.live = False
        entry.variants = []
        self._size -= entry.size

    def _remove(self, key: Hashable) -> None:
        entry = self._entries.pop(key)
        self._let_go(entry)
        keys = self._buckets.get(entry.bucket)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._buckets[entry.bucket]

    def _evict(self, keep: Hashable) -> None:
        # Dictionaries keep insertion order, so the first keys are the oldest entries.
        while self._size > self.max_bytes and self._entries:
            oldest = next(iter(self._entries))
            self._remove(oldest)
            if oldest == keep:
                break
