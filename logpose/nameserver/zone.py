"""Settings of the zone the DNS front end is authoritative for."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Sequence, TypeAlias

from logpose.errors import ConfigError

_ZONE_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")

# The longest owner name the zone publishes is `<instance-id>.<service>.<zone>`: a 36-octet
# UUID label and a service label of up to 63 octets with their length octets take 101 of
# the 255 octets a name may have on the wire (RFC 1035 §2.3.4), so the zone gets the rest.
MAX_ZONE_LENGTH = 255 - 2 - (1 + 36) - (1 + 63)

MIN_UDP_PAYLOAD = 512  # RFC 1035 §4.2.1; EDNS sizes below it are taken as 512 (RFC 6891 §6.2.5)
MAX_MESSAGE_SIZE = 65535  # the 16-bit length prefix of DNS over TCP (RFC 1035 §4.2.2)
MAX_TTL = 2**31 - 1  # RFC 2181 §8
MAX_ANSWER_LIMIT = 65535
MAX_RECURSOR_TIMEOUT = 60.0  # seconds

Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class ZoneSettings:
    """The zone's name, TTLs and limits, validated when constructed.

    ``ttl`` and ``negative_ttl`` are seconds, and ``negative_ttl`` defaults to ``ttl``.
    ``ns_addresses`` are the IP addresses that ``ns.<domain>`` resolves to.
    ``max_udp_payload`` is the EDNS0 UDP payload size the server advertises and the
    largest UDP answer it sends.
    ``answer_limit`` caps the A or AAAA records of one service name per answer; 0 is no cap.
    ``reverse_zones`` are networks whose in-addr.arpa or ip6.arpa names get PTR answers.
    ``allow`` are the networks whose clients get answers; empty allows every client.
    ``recursors`` are (IP, port) pairs that names outside the zone are forwarded to, in
    order, each given ``recursor_timeout`` seconds; empty refuses those names.
    Sequences of text are parsed and stored as tuples of ``ipaddress`` objects.
    """

    domain: str = "logpose.internal"
    ttl: int = 5
    negative_ttl: int | None = None
    ns_addresses: Sequence[str] = ()
    max_udp_payload: int = 1232
    answer_limit: int = 0
    reverse_zones: Sequence[str | Network] = ()
    allow: Sequence[str | Network] = ()
    recursors: Sequence[tuple[str, int]] = ()
    recursor_timeout: float = 2.0

    def __post_init__(self) -> None:
        domain = self.domain.rstrip(".") if isinstance(self.domain, str) else self.domain
        _validate_domain(domain)
        object.__setattr__(self, "domain", domain)

        _validate_seconds("ttl", self.ttl)
        negative_ttl = self.ttl if self.negative_ttl is None else self.negative_ttl
        _validate_seconds("negative_ttl", negative_ttl)
        object.__setattr__(self, "negative_ttl", negative_ttl)

        if isinstance(self.ns_addresses, str):
            raise ConfigError(f"ns_addresses must be a list of IP addresses, got the string {self.ns_addresses!r}")
        for address in self.ns_addresses:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise ConfigError(f"ns_addresses: {address!r} is not an IPv4 or IPv6 address") from None
        object.__setattr__(self, "ns_addresses", tuple(self.ns_addresses))

        payload = self.max_udp_payload
        if isinstance(payload, bool) or not isinstance(payload, int) or not MIN_UDP_PAYLOAD <= payload <= MAX_MESSAGE_SIZE:
            raise ConfigError(
                f"max_udp_payload must be a whole number of bytes from {MIN_UDP_PAYLOAD} to {MAX_MESSAGE_SIZE}, "
                f"got {payload!r}; 1232 avoids IP fragmentation on common networks"
            )

        limit = self.answer_limit
        if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= MAX_ANSWER_LIMIT:
            raise ConfigError(f"answer_limit must be a whole number from 0 (no limit) to {MAX_ANSWER_LIMIT}, got {limit!r}")

        object.__setattr__(self, "reverse_zones", _networks("reverse_zones", self.reverse_zones))
        object.__setattr__(self, "allow", _networks("allow", self.allow))
        object.__setattr__(self, "recursors", _recursors(self.recursors))
        timeout = self.recursor_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_RECURSOR_TIMEOUT:
            raise ConfigError(
                f"recursor_timeout must be a number of seconds above 0 and at most {MAX_RECURSOR_TIMEOUT:g}, got {timeout!r}"
            )


def _validate_domain(domain: object) -> None:
    if not isinstance(domain, str) or not domain:
        raise ConfigError(f"domain must be a DNS name like 'logpose.internal', got {domain!r}")
    if len(domain) > MAX_ZONE_LENGTH:
        raise ConfigError(
            f"domain {domain[:40]!r}... is {len(domain)} characters; at most {MAX_ZONE_LENGTH} leave room "
            "for the instance and service labels below it"
        )
    for label in domain.split("."):
        if not _ZONE_LABEL.fullmatch(label):
            raise ConfigError(
                f"domain {domain!r}: label {label!r} must be 1-63 characters of letters, digits and '-', "
                "starting and ending with a letter or digit"
            )


def _validate_seconds(setting: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TTL:
        raise ConfigError(f"{setting} must be a whole number of seconds from 0 to {MAX_TTL}, got {value!r}")


def _networks(setting: str, values: object) -> tuple[Network, ...]:
    if isinstance(values, str) or not isinstance(values, (list, tuple)):
        raise ConfigError(f"{setting} must be a list of networks like '10.0.0.0/8', got {values!r}")
    networks = []
    for value in values:
        if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            networks.append(value)
            continue
        try:
            networks.append(ipaddress.ip_network(value))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{setting}: {value!r} is not a network like '10.0.0.0/8' or 'fd00::/8' ({exc})") from None
    return tuple(networks)


def _recursors(values: object) -> tuple[tuple[str, int], ...]:
    if isinstance(values, str) or not isinstance(values, (list, tuple)):
        raise ConfigError(f"recursors must be a list of (IP address, port) pairs, got {values!r}")
    recursors = []
    for value in values:
        host, port = value if isinstance(value, tuple) and len(value) == 2 else (None, None)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(f"recursors: {value!r} must be an (IP address, port) pair") from None
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ConfigError(f"recursors: port {port!r} of {host} must be from 1 to 65535")
        recursors.append((host, port))
    return tuple(recursors)
