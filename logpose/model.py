"""Domain types of the catalog and the validators that build them from input.

Every type here is immutable: the registry replaces an object on change rather
than mutating it, so a reader may keep a reference without copying.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from logpose.errors import ValidationError, shown

# One DNS label in lower case (RFC 1035 §2.3.1 with digits allowed first, RFC 1123 §2.1).
SERVICE_CODE_PATTERN = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
# Codes that name something of the zone itself rather than a service.
RESERVED_SERVICE_CODES = frozenset({"ns"})

_HOST_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_DOTTED_NUMBERS = re.compile(r"[0-9.]+")

MAX_SERVICE_NAME_LENGTH = 200
MAX_TAGS = 64
MAX_TAG_LENGTH = 255
MAX_METADATA_ENTRIES = 64
MAX_METADATA_KEY_LENGTH = 128
MAX_METADATA_VALUE_LENGTH = 1024
MAX_OUTPUT_LENGTH = 4096
MAX_WEIGHT = 65535  # the SRV weight field is 16 bits (RFC 2782)


class Protocol(enum.Enum):
    """Application protocol an instance speaks; the value is the canonical spelling."""

    HTTP = "Http"
    HTTPS = "Https"
    GRPC = "Grpc"
    TCP = "Tcp"
    UDP = "Udp"

    @property
    def srv_labels(self) -> tuple[str, str]:
        """Return the RFC 2782 ``(_service, _proto)`` labels, e.g. ``("_http", "_tcp")``."""
        transport = "_udp" if self is Protocol.UDP else "_tcp"
        return f"_{self.value.lower()}", transport


class Health(enum.Enum):
    UNKNOWN = "Unknown"
    HEALTHY = "Healthy"
    UNHEALTHY = "Unhealthy"


class CheckType(enum.Enum):
    TCP = "tcp"
    HTTP = "http"
    TTL = "ttl"
    NONE = "none"


class AddressKind(enum.Enum):
    IPV4 = "ipv4"
    IPV6 = "ipv6"
    HOSTNAME = "hostname"


@dataclass(frozen=True, slots=True)
class Address:
    """An instance's ``host:port``; ``host`` is kept as given, minus IPv6 brackets."""

    host: str
    port: int
    kind: AddressKind

    @property
    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """Return the IP address, or None when the host is a DNS name."""
        if self.kind is AddressKind.HOSTNAME:
            return None
        return ipaddress.ip_address(self.host)

    @property
    def normalized_host(self) -> str:
        """Return the host as compared for re-registration: lower case, IPv6 compressed."""
        if self.kind is AddressKind.HOSTNAME:
            return self.host.lower().rstrip(".")
        if self.kind is AddressKind.IPV4:
            # parse_address accepted it as an IPv4Address, which rejects leading
            # zeros, so the text is already canonical; this runs per look-up.
            return self.host
        return str(ipaddress.IPv6Address(self.host))

    def __str__(self) -> str:
        if self.kind is AddressKind.IPV6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Check:
    """The settings that decide the health of an instance.

    Durations are seconds. None means "use the server-wide default" for
    ``interval``, ``timeout``, ``rise``, ``fall`` and ``deregister_after``.
    ``ttl`` applies to TTL checks only; ``path``, ``scheme``, ``tls_verify`` and
    ``expected_status`` to HTTP checks only.
    """

    type: CheckType = CheckType.TCP
    ttl: float | None = None
    interval: float | None = None
    timeout: float | None = None
    rise: int | None = None
    fall: int | None = None
    deregister_after: float | None = None
    path: str | None = None
    scheme: str | None = None
    tls_verify: bool = True
    expected_status: int | None = None

    @property
    def is_probed(self) -> bool:
        """Whether the prober runs this check, as opposed to waiting for reports."""
        return self.type in (CheckType.TCP, CheckType.HTTP)

    def to_json(self) -> dict[str, Any]:
        """Return the check as the API shows it, with only the fields that apply."""
        fields: dict[str, Any] = {"type": self.type.value}
        if self.type is CheckType.TTL:
            fields["ttl"] = self.ttl
        if self.type is CheckType.HTTP:
            fields.update(path=self.path, scheme=self.scheme, tls_verify=self.tls_verify,
                          expected_status=self.expected_status)
        for name in ("interval", "timeout", "rise", "fall", "deregister_after"):
            value = getattr(self, name)
            if value is not None:
                fields[name] = value
        return fields


@dataclass(frozen=True, slots=True)
class Service:
    code: str
    name: str
    created_index: int
    modify_index: int


@dataclass(frozen=True, slots=True)
class Instance:
    """One registered endpoint of a service.

    ``registered_at`` and ``updated_at`` are Unix times in seconds; ``metadata``
    must not be mutated by callers.
    """

    id: str
    service: str
    address: Address
    protocol: Protocol
    health: Health
    check: Check
    tags: tuple[str, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)
    weight: int = 1
    output: str = ""
    created_index: int = 0
    modify_index: int = 0
    registered_at: float = 0.0
    updated_at: float = 0.0
    maintenance_reason: str | None = None  # None: not in maintenance (drained)
    maintenance_since: float | None = None
    last_report_at: float | None = None  # Unix time of the last health report, if any

    @property
    def in_maintenance(self) -> bool:
        return self.maintenance_reason is not None

    @property
    def registration_key(self) -> tuple[str, str, int, str]:
        return registration_key(self.service, self.address, self.protocol)


@dataclass(frozen=True, slots=True)
class ClientRecord:
    """A client allowed to obtain tokens; ``secret_hash`` is a salted scrypt hash."""

    common_name: str
    role: str
    services: tuple[str, ...]
    secret_hash: str
    created_at: float


@dataclass(frozen=True, slots=True)
class InstanceSpec:
    """A validated registration request, before the registry assigns an id."""

    address: Address
    protocol: Protocol
    check: Check
    tags: tuple[str, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)
    weight: int = 1
    # The optional fields the request carried; re-registration replaces only these.
    sent: frozenset[str] = frozenset({"check", "tags", "metadata", "weight"})


def registration_key(service: str, address: Address, protocol: Protocol) -> tuple[str, str, int, str]:
    """Return the key under which registering again updates instead of duplicating."""
    return service, address.normalized_host, address.port, protocol.value


def parse_service_code(value: Any, field_name: str = "code") -> str:
    """Validate a service code: one lower-case DNS label that is not reserved."""
    if not isinstance(value, str):
        raise ValidationError(field_name, f"must be a string, got {_json_type(value)}")
    if not SERVICE_CODE_PATTERN.fullmatch(value):
        if SERVICE_CODE_PATTERN.fullmatch(value.lower()):
            raise ValidationError(
                field_name,
                f"{value!r} must be lower case; use {value.lower()!r}",
            )
        raise ValidationError(
            field_name,
            f"{value!r} is not a DNS label: use 1-63 characters of a-z, 0-9 and '-', "
            "starting and ending with a letter or digit",
        )
    if value in RESERVED_SERVICE_CODES:
        raise ValidationError(field_name, f"{value!r} is reserved for the zone's name server")
    return value


def parse_service_name(value: Any, field_name: str = "name") -> str:
    if not isinstance(value, str):
        raise ValidationError(field_name, f"must be a string, got {_json_type(value)}")
    if not value.strip():
        raise ValidationError(field_name, "must not be empty")
    if len(value) > MAX_SERVICE_NAME_LENGTH:
        raise ValidationError(field_name, f"must be at most {MAX_SERVICE_NAME_LENGTH} characters")
    return value


def parse_address(value: Any, field_name: str = "address") -> Address:
    """Parse ``host:port``: IPv4, ``[IPv6]:port`` or a DNS host name, port 1-65535."""
    if not isinstance(value, str):
        raise ValidationError(field_name, f"must be a string 'host:port', got {_json_type(value)}")
    if value.startswith("["):
        host, sep, port_text = value[1:].partition("]:")
        if not sep:
            raise ValidationError(field_name, f"{value!r} is not '[IPv6]:port'")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValidationError(field_name, f"{host!r} in {value!r} is not an IPv6 address") from None
        if "%" in host:
            raise ValidationError(field_name, f"{value!r}: a scoped IPv6 address cannot be published in DNS")
        # Kept compressed, so every spelling of one address shows and compares the same.
        compressed = str(ipaddress.IPv6Address(host))
        return Address(compressed, _parse_port(port_text, value, field_name), AddressKind.IPV6)

    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValidationError(field_name, f"{value!r} is not 'host:port' (IPv6 goes in brackets: '[::1]:80')")
    if ":" in host:
        raise ValidationError(field_name, f"{value!r}: put an IPv6 address in brackets, like '[{host}]:{port_text}'")
    port = _parse_port(port_text, value, field_name)
    if _DOTTED_NUMBERS.fullmatch(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValidationError(field_name, f"{host!r} in {value!r} is not a valid IPv4 address") from None
        return Address(host, port, AddressKind.IPV4)
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    if len(name) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise ValidationError(field_name, f"{host!r} in {value!r} is neither an IP address nor a valid host name")
    return Address(host, port, AddressKind.HOSTNAME)


def _parse_port(text: str, value: str, field_name: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValidationError(field_name, f"port {text!r} in {value!r} must be a number from 1 to 65535")
    return int(text)


def parse_protocol(value: Any, field_name: str = "protocol") -> Protocol:
    """Parse a protocol name case-insensitively ('http', 'HTTP' and 'Http' are all Http)."""
    accepted = ", ".join(p.value for p in Protocol)
    if not isinstance(value, str):
        raise ValidationError(field_name, f"must be a string, one of {accepted}")
    for protocol in Protocol:
        if protocol.value.lower() == value.lower():
            return protocol
    raise ValidationError(field_name, f"unknown protocol {value!r}; accepted: {accepted}")


def parse_health_report(value: Any, field_name: str = "status") -> Health:
    """Parse the status of a health report: only Healthy or Unhealthy may be reported."""
    if isinstance(value, str):
        for health in (Health.HEALTHY, Health.UNHEALTHY):
            if health.value.lower() == value.lower():
                return health
    raise ValidationError(field_name, f"must be 'Healthy' or 'Unhealthy', got {value!r}")


def parse_health(value: Any, field_name: str = "health") -> Health:
    if isinstance(value, str):
        for health in Health:
            if health.value.lower() == value.lower():
                return health
    accepted = ", ".join(h.value for h in Health)
    raise ValidationError(field_name, f"must be one of {accepted}, got {value!r}")


CHECK_FIELDS = {
    CheckType.TCP: {"interval", "timeout", "rise", "fall", "deregister_after"},
    CheckType.HTTP: {"interval", "timeout", "rise", "fall", "deregister_after",
                     "path", "scheme", "tls_verify", "expected_status"},
    CheckType.TTL: {"ttl", "rise", "fall", "deregister_after"},
    CheckType.NONE: {"rise", "fall", "deregister_after"},
}
MAX_CHECK_SECONDS = 86400.0


def parse_check(value: Any, protocol: Protocol, field_name: str = "check") -> Check:
    """Parse a check object; None picks the protocol's default.

    A TCP connect says nothing about a UDP service, so Udp instances default to
    ``none``; others default to ``tcp``. Fields that do not apply to the check
    type are rejected rather than ignored.
    """
    if value is None:
        return Check(CheckType.NONE if protocol is Protocol.UDP else CheckType.TCP)
    if not isinstance(value, dict):
        raise ValidationError(field_name, f"must be an object like {{\"type\": \"tcp\"}}, got {_json_type(value)}")
    type_value = value.get("type", "tcp")
    try:
        check_type = CheckType(type_value.lower() if isinstance(type_value, str) else type_value)
    except ValueError:
        accepted = ", ".join(kind.value for kind in CheckType)
        raise ValidationError(f"{field_name}.type", f"must be one of {accepted}, got {type_value!r}") from None
    allowed = CHECK_FIELDS[check_type] | {"type"}
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ValidationError(
            f"{field_name}.{unknown[0]}",
            f"does not apply to a {check_type.value} check; accepted: {', '.join(sorted(allowed))}",
        )

    def seconds(name: str, minimum: float) -> float | None:
        item = value.get(name)
        if item is None:
            return None
        if isinstance(item, bool) or not isinstance(item, (int, float)) or not minimum <= item <= MAX_CHECK_SECONDS:
            raise ValidationError(
                f"{field_name}.{name}", f"must be a number of seconds from {minimum:g} to {MAX_CHECK_SECONDS:g}, got {shown(item)}"
            )
        return float(item)

    def count(name: str) -> int | None:
        item = value.get(name)
        if item is None:
            return None
        if isinstance(item, bool) or not isinstance(item, int) or not 1 <= item <= 100:
            raise ValidationError(f"{field_name}.{name}", f"must be a whole number from 1 to 100, got {shown(item)}")
        return item

    interval = seconds("interval", 0.05)
    timeout = seconds("timeout", 0.01)
    if interval is not None and timeout is not None and timeout >= interval:
        raise ValidationError(
            f"{field_name}.timeout", f"must be less than {field_name}.interval (got {timeout:g} >= {interval:g})"
        )
    ttl = seconds("ttl", 1)
    if check_type is CheckType.TTL and ttl is None:
        raise ValidationError(f"{field_name}.ttl", "is required for a ttl check (seconds between reports)")

    check = Check(
        type=check_type,
        ttl=ttl,
        interval=interval,
        timeout=timeout,
        rise=count("rise"),
        fall=count("fall"),
        deregister_after=seconds("deregister_after", 1),
    )
    if check_type is CheckType.HTTP:
        check = _parse_http_check_fields(check, value, protocol, field_name)
    return check


def _parse_http_check_fields(check: Check, value: dict[str, Any], protocol: Protocol, field_name: str) -> Check:
    path = value.get("path", "/")
    if not isinstance(path, str) or not path.startswith("/") or len(path) > 1024 or any(
        ord(character) < 33 or ord(character) == 127 for character in path
    ):
        raise ValidationError(f"{field_name}.path", f"must be an absolute URL path like '/health' without spaces, got {path!r}")
    scheme = value.get("scheme", "https" if protocol is Protocol.HTTPS else "http")
    if scheme not in ("http", "https"):
        raise ValidationError(f"{field_name}.scheme", f"must be 'http' or 'https', got {scheme!r}")
    tls_verify = value.get("tls_verify", True)
    if not isinstance(tls_verify, bool):
        raise ValidationError(f"{field_name}.tls_verify", f"must be true or false, got {shown(tls_verify)}")
    expected = value.get("expected_status")
    if expected is not None and (isinstance(expected, bool) or not isinstance(expected, int) or not 100 <= expected <= 599):
        raise ValidationError(f"{field_name}.expected_status", f"must be an HTTP status from 100 to 599, got {shown(expected)}")
    return replace(check, path=path, scheme=scheme, tls_verify=tls_verify, expected_status=expected)


def parse_tags(value: Any, field_name: str = "tags") -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValidationError(field_name, f"must be a list of strings, got {_json_type(value)}")
    if len(value) > MAX_TAGS:
        raise ValidationError(field_name, f"must have at most {MAX_TAGS} entries, got {len(value)}")
    for position, tag in enumerate(value):
        if not isinstance(tag, str) or not tag or len(tag) > MAX_TAG_LENGTH:
            raise ValidationError(f"{field_name}[{position}]", f"must be a non-empty string of at most {MAX_TAG_LENGTH} characters")
    return tuple(dict.fromkeys(value))


def parse_metadata(value: Any, field_name: str = "metadata") -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValidationError(field_name, f"must be an object of string values, got {_json_type(value)}")
    if len(value) > MAX_METADATA_ENTRIES:
        raise ValidationError(field_name, f"must have at most {MAX_METADATA_ENTRIES} entries, got {len(value)}")
    for key, item in value.items():
        if not key or len(key) > MAX_METADATA_KEY_LENGTH:
            raise ValidationError(field_name, f"key {key[:40]!r} must be 1 to {MAX_METADATA_KEY_LENGTH} characters")
        if not isinstance(item, str) or len(item) > MAX_METADATA_VALUE_LENGTH:
            raise ValidationError(f"{field_name}.{key}", f"must be a string of at most {MAX_METADATA_VALUE_LENGTH} characters")
    return dict(value)


def parse_weight(value: Any, field_name: str = "weight") -> int:
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_WEIGHT:
        raise ValidationError(field_name, f"must be a whole number from 0 to {MAX_WEIGHT}, got {shown(value)}")
    return value


def parse_output(value: Any, field_name: str = "output") -> str:
    """Validate a check output; longer text is cut to the last-output cap, not rejected."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValidationError(field_name, f"must be a string, got {_json_type(value)}")
    return value[:MAX_OUTPUT_LENGTH]


def parse_instance_spec(body: Any) -> InstanceSpec:
    """Validate a registration body; only ``address`` and ``protocol`` are required."""
    if not isinstance(body, dict):
        raise ValidationError("body", f"must be a JSON object, got {_json_type(body)}")
    allowed = {"address", "protocol", "tags", "metadata", "weight", "check"}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ValidationError(unknown[0], f"unknown field; accepted: {', '.join(sorted(allowed))}")
    for required in ("address", "protocol"):
        if required not in body:
            raise ValidationError(required, "is required")
    protocol = parse_protocol(body["protocol"])
    return InstanceSpec(
        address=parse_address(body["address"]),
        protocol=protocol,
        check=parse_check(body.get("check"), protocol),
        tags=parse_tags(body.get("tags")),
        metadata=parse_metadata(body.get("metadata")),
        weight=parse_weight(body.get("weight")),
        sent=frozenset(name for name in ("check", "tags", "metadata", "weight") if body.get(name) is not None),
    )


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    if type(value) in names:
        return names[type(value)]
    if isinstance(value, (int, float)):
        return "a number"
    return type(value).__name__
