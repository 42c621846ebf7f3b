"""Reverse names: IP addresses under in-addr.arpa (RFC 1035 §3.5) and ip6.arpa (RFC 3596 §2.5)."""

from __future__ import annotations

import ipaddress
import math

from logpose.nameserver.zone import Network

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

IPV4_SUFFIX = (b"in-addr", b"arpa")
IPV6_SUFFIX = (b"ip6", b"arpa")
_HEX_DIGITS = frozenset(b"0123456789abcdef")


def reverse_apexes(networks: tuple[Network, ...]) -> list[tuple[bytes, ...]]:
    """Return the reverse zone apexes, as lower-case labels, that together cover ``networks``.

    A reverse name has one label per octet (IPv4) or per nibble (IPv6), so a prefix
    that ends inside a label is split into the smaller networks that end on a label
    boundary: 10.0.0.0/12 becomes the sixteen zones 0.10 to 15.10.in-addr.arpa. Each
    apex is given once, and longer apexes come first so the closest one matches first.
    """
    apexes: dict[tuple[bytes, ...], None] = {}
    for network in networks:
        bits_per_label = 8 if network.version == 4 else 4
        boundary = math.ceil(network.prefixlen / bits_per_label) * bits_per_label
        for subnet in network.subnets(new_prefix=boundary):
            apexes[_network_labels(subnet, bits_per_label)] = None
    return sorted(apexes, key=len, reverse=True)


def _network_labels(network: Network, bits_per_label: int) -> tuple[bytes, ...]:
    count = network.prefixlen // bits_per_label
    if network.version == 4:
        octets = network.network_address.packed[:count]
        return tuple(str(octet).encode("ascii") for octet in reversed(octets)) + IPV4_SUFFIX
    nibbles = network.network_address.packed.hex()[:count]
    return tuple(nibble.encode("ascii") for nibble in reversed(nibbles)) + IPV6_SUFFIX


def reverse_name(ip: IPAddress) -> tuple[bytes, ...]:
    """Return the lower-case labels of the reverse name of ``ip``."""
    if ip.version == 4:
        return tuple(str(octet).encode("ascii") for octet in reversed(ip.packed)) + IPV4_SUFFIX
    return tuple(nibble.encode("ascii") for nibble in reversed(ip.packed.hex())) + IPV6_SUFFIX


def address_of(labels: tuple[bytes, ...]) -> IPAddress | None:
    """Return the address that the lower-case reverse name ``labels`` stands for, or None.

    Only the canonical spelling counts: decimal octets without leading zeros, and one
    lower-case hex digit per nibble label. Any other name is not an address.
    """
    if len(labels) == 6 and labels[4:] == IPV4_SUFFIX:
        octets = labels[3::-1]
        if all(octet.isdigit() and octet == str(int(octet)).encode("ascii") and int(octet) <= 255 for octet in octets):
            return ipaddress.IPv4Address(bytes(int(octet) for octet in octets))
        return None
    if len(labels) == 34 and labels[32:] == IPV6_SUFFIX:
        nibbles = labels[31::-1]
        if all(len(nibble) == 1 and nibble[0] in _HEX_DIGITS for nibble in nibbles):
            return ipaddress.IPv6Address(bytes.fromhex(b"".join(nibbles).decode("ascii")))
    return None
