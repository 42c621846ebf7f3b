"""Settings of the zone the DNS front end is authoritative for."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Sequence

from logpose.errors import ConfigError

_ZONE_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")

# The longest owner name the zone publishes is `<instance-id>.<service>.<zone>`: a 36-octet
# UUID label and a service label of up to 63 octets with their length octets take 101 of
# the 255 octets a name may have on the wire (RFC 1035 §2.3.4), so the zone gets the rest.
MAX_ZONE_LENGTH = 255 - 2 - (1 + 36) - (1 + 63)

MIN_UDP_PAYLOAD = 512  # RFC 1035 §4.2.1; EDNS sizes below it are taken as 512 (RFC 6891 §6.2.5)
MAX_MESSAGE_SIZE = 65535  # the 16-bit length prefix of DNS over TCP (RFC 1035 §4.2.2)
MAX_TTL = 2**31 - 1  # RFC 2181 §8


@dataclass(frozen=True)
class ZoneSettings:
    """The zone's name, TTLs and limits, validated when constructed.

    ``ttl`` and ``negative_ttl`` are seconds, and ``negative_ttl`` defaults to ``ttl``.
    ``ns_addresses`` are the IP addresses that ``ns.<domain>`` resolves to.
    ``max_udp_payload`` is the EDNS0 UDP payload size the server advertises and the
    largest UDP answer it sends.
    """

    domain: str = "logpose.internal"
    ttl: int = 5
    negative_ttl: int | None = None
    ns_addresses: Sequence[str] = ()
    max_udp_payload: int = 1232

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
