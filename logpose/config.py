"""Server settings: one frozen object, validated once at start.

Each setting comes from, in order of precedence: a command-line flag, a
``LOGPOSE_<KEY>`` environment variable, the TOML file given with ``--config``,
then the default. TOML keys are the flag names in snake_case.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from logpose.errors import ConfigError, shown

ENVIRONMENT_PREFIX = "LOGPOSE_"
MAX_DNS_WORKERS = 64  # dns_workers at most, the server process included
MIN_JWT_KEY_BYTES = 32  # RFC 7518 §3.2: an HS256 key has at least 256 bits

HostPort = tuple[str, int]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")
_LOGGER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


@dataclass(frozen=True, slots=True)
class Settings:
    http_listen: HostPort = ("127.0.0.1", 8470)
    dns_listen: tuple[HostPort, ...] = (("127.0.0.1", 8653),)
    data_dir: Path = Path("data")
    database_url: str | None = None  # None: SQLite file in data_dir
    domain: str = "logpose.internal"
    probe_interval: float = 10.0  # seconds
    probe_timeout: float = 2.0  # seconds
    probe_concurrency: int = 64  # probes in flight at most
    health_rise: int = 1  # consecutive successes to turn Healthy
    health_fall: int = 2  # consecutive failures to turn a Healthy instance Unhealthy
    deregister_after: float = 0.0  # seconds Unhealthy before removal; 0: never
    mass_failure_guard: bool = True
    mass_failure_share: float = 0.5  # share of instances failing at once that engages the guard
    dns_ttl: int = 5  # seconds
    dns_max_udp_payload: int = 1232  # bytes; EDNS0 size advertised and largest UDP answer
    dns_answer_limit: int = 0  # A/AAAA records per service name and answer; 0: no limit
    dns_reverse_zones: tuple[Network, ...] = ()  # networks answered with PTR records
    dns_allow: tuple[Network, ...] = ()  # networks that may query DNS; empty: everyone
    dns_rate_limit: int = 0  # UDP responses per second and source address; 0: no limit
    dns_workers: int = 1  # processes answering DNS on dns_listen, this one included (SO_REUSEPORT above 1)
    recursors: tuple[HostPort, ...] = ()  # resolvers for names outside the zone; empty: REFUSED
    recursor_timeout: float = 2.0  # seconds per recursor
    jwt_key: str | None = None  # None: a random key kept in data_dir/jwt.key
    token_lifetime: int = 3600  # seconds
    tls_cert: Path | None = None  # PEM certificate chain; with tls_key the HTTP API serves HTTPS
    tls_key: Path | None = None  # PEM private key of tls_cert, not encrypted
    tls_client_ca: Path | None = None  # PEM CA certificates; enables token requests by client certificate
    log_level: str = "INFO"
    log_levels: tuple[tuple[str, str], ...] = ()  # (logger, level) pairs that override log_level
    log_format: str = "text"  # "text" lines, or "json": one object per line
    access_log: bool = True  # one line per HTTP request on logpose.access


def parse_host_port(value: Any, key: str) -> HostPort:
    """Parse ``HOST:PORT`` or ``[IPv6]:PORT`` where HOST is an IP address; port 0 picks a free one."""
    if not isinstance(value, str):
        raise ConfigError(f"{key}: must be a string 'HOST:PORT', got {shown(value)}")
    if value.startswith("["):
        host, sep, port_text = value[1:].partition("]:")
    else:
        host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{key}: {value!r} is not 'HOST:PORT' (IPv6 in brackets: '[::1]:8653')")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{key}: {host!r} in {value!r} is not an IP address") from None
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{key}: port {port_text!r} in {value!r} must be from 0 to 65535")
    return host, int(port_text)


def _host_port_list(value: Any, key: str) -> tuple[HostPort, ...]:
    items = _list_items(value, key, "127.0.0.1:8653")
    if not items:
        raise ConfigError(f"{key}: must be one or more 'HOST:PORT' addresses, got {shown(value)}")
    return tuple(parse_host_port(item, key) for item in items)


def _list_items(value: Any, key: str, example: str) -> list[str]:
    """Split a list, a comma-separated string, or a list of such strings into items."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(f"{key}: must be a list of strings like {example!r}, got {shown(value)}")
    return [item.strip() for text in value for item in text.split(",") if item.strip()]


def _network_list(value: Any, key: str) -> tuple[Network, ...]:
    networks = []
    for item in _list_items(value, key, "10.0.0.0/8"):
        try:
            networks.append(ipaddress.ip_network(item))
        except ValueError as exc:
            raise ConfigError(f"{key}: {item!r} is not a network like '10.0.0.0/8' or 'fd00::/8' ({exc})") from None
    return tuple(networks)


def _recursor_list(value: Any, key: str) -> tuple[HostPort, ...]:
    recursors = tuple(parse_host_port(item, key) for item in _list_items(value, key, "127.0.0.53:53"))
    for host, port in recursors:
        if port == 0:
            raise ConfigError(f"{key}: the port of recursor {host} must be from 1 to 65535, got 0")
    return recursors


def _seconds(minimum: float, maximum: float) -> Callable[[Any, str], float]:
    def parse(value: Any, key: str) -> float:
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not minimum <= number <= maximum:
            raise ConfigError(f"{key}: must be a number of seconds from {minimum:g} to {maximum:g}, got {shown(value)}")
        return number

    return parse


def _whole(minimum: int, maximum: int, unit: str = "") -> Callable[[Any, str], int]:
    def parse(value: Any, key: str) -> int:
        text = str(value).strip()
        if isinstance(value, bool) or not text.lstrip("-").isdigit() or not minimum <= int(text) <= maximum:
            raise ConfigError(f"{key}: must be a whole number{unit} from {minimum} to {maximum}, got {shown(value)}")
        return int(text)

    return parse


def _text(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: must be a non-empty string")
    return value


def _domain(value: Any, key: str) -> str:
    text = _text(value, key).lower().rstrip(".")
    labels = text.split(".")
    if len(text) > 200 or not all(label and len(label) <= 63 and label.replace("-", "").isalnum()
                                  and label.isascii() and not label.startswith("-") and not label.endswith("-")
                                  for label in labels):
        raise ConfigError(f"{key}: {value!r} is not a DNS domain name like 'logpose.internal'")
    return text


def _jwt_key(value: Any, key: str) -> str:
    text = _text(value, key)
    if len(text.encode()) < MIN_JWT_KEY_BYTES:
        raise ConfigError(
            f"{key}: must be at least {MIN_JWT_KEY_BYTES} bytes (256 bits, RFC 7518 §3.2), "
            f"got {len(text.encode())}; generate one with: openssl rand -hex 32"
        )
    return text


def _boolean(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"{key}: must be true or false, got {shown(value)}")


def _share(value: Any, key: str) -> float:
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not 0 < number < 1:
        raise ConfigError(f"{key}: must be a fraction between 0 and 1 (exclusive), like 0.5, got {shown(value)}")
    return number


def _log_level(value: Any, key: str) -> str:
    text = str(value).upper()
    if text not in LOG_LEVELS:
        raise ConfigError(f"{key}: must be one of {', '.join(LOG_LEVELS)}, got {shown(value)}")
    return text


def _logger_levels(value: Any, key: str) -> tuple[tuple[str, str], ...]:
    """Parse ``LOGGER=LEVEL`` items (comma-separated text or a list), or a TOML table of them."""
    example = "logpose.access=WARNING,logpose.dns=DEBUG"
    if isinstance(value, dict):
        pairs = [(str(name), level) for name, level in value.items()]
    else:
        pairs = []
        for item in _list_items(value, key, example):
            name, sep, level = item.partition("=")
            if not sep:
                raise ConfigError(f"{key}: {item!r} is not LOGGER=LEVEL, like {example!r}")
            pairs.append((name.strip(), level.strip()))
    levels = {}
    for name, level in pairs:
        if not _LOGGER_NAME.fullmatch(name):
            raise ConfigError(f"{key}: {name!r} is not a logger name like 'logpose.dns'")
        levels[name] = _log_level(level, f"{key} for logger {name}")
    return tuple(sorted(levels.items()))


def _log_format(value: Any, key: str) -> str:
    text = str(value).lower()
    if text not in LOG_FORMATS:
        raise ConfigError(f"{key}: must be one of {', '.join(LOG_FORMATS)}, got {shown(value)}")
    return text


_PARSERS: dict[str, Callable[[Any, str], Any]] = {
    "http_listen": parse_host_port,
    "dns_listen": _host_port_list,
    "data_dir": lambda value, key: Path(_text(value, key)),
    "database_url": _text,
    "domain": _domain,
    "probe_interval": _seconds(0.05, 86400),
    "probe_timeout": _seconds(0.01, 3600),
    "probe_concurrency": _whole(1, 10000),
    "health_rise": _whole(1, 100),
    "health_fall": _whole(1, 100),
    "deregister_after": _seconds(0, 86400 * 30),
    "mass_failure_guard": _boolean,
    "mass_failure_share": _share,
    "dns_ttl": _whole(0, 86400, " of seconds"),
    "dns_max_udp_payload": _whole(512, 65535, " of bytes"),
    "dns_answer_limit": _whole(0, 65535),
    "dns_reverse_zones": _network_list,
    "dns_allow": _network_list,
    "dns_rate_limit": _whole(0, 1_000_000, " of responses per second"),
    "dns_workers": _whole(1, MAX_DNS_WORKERS, " of processes"),
    "recursors": _recursor_list,
    "recursor_timeout": _seconds(0.01, 60),
    "jwt_key": _jwt_key,
    "token_lifetime": _whole(60, 86400 * 30, " of seconds"),
    "tls_cert": lambda value, key: Path(_text(value, key)),
    "tls_key": lambda value, key: Path(_text(value, key)),
    "tls_client_ca": lambda value, key: Path(_text(value, key)),
    "log_level": _log_level,
    "log_levels": _logger_levels,
    "log_format": _log_format,
    "access_log": _boolean,
}
SETTING_KEYS = tuple(field.name for field in fields(Settings))
assert set(_PARSERS) == set(SETTING_KEYS)


def load_settings(
    flags: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    config_file: Path | None = None,
    *,
    serving: bool = True,
) -> Settings:
    """Merge flags, environment and TOML file over the defaults, then validate.

    ``flags`` holds only the flags given (None values are ignored). Raise
    ConfigError naming the key and its source on the first bad value.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    if config_file is not None:
        for key, value in _read_toml(config_file).items():
            values[key] = _PARSERS[key](value, f"{key} in {config_file}")
    for key in SETTING_KEYS:
        variable = ENVIRONMENT_PREFIX + key.upper()
        if environ.get(variable, "") != "":
            values[key] = _PARSERS[key](environ[variable], variable)
    for key, value in flags.items():
        if value is not None:
            values[key] = _PARSERS[key](value, "--" + key.replace("_", "-"))
    if "data_dir" not in values and environ.get("STATE_DIRECTORY"):
        # systemd's StateDirectory= exports the directories it made, colon-separated.
        values["data_dir"] = Path(environ["STATE_DIRECTORY"].split(":")[0])
    settings = Settings(**values)
    if settings.probe_timeout >= settings.probe_interval:
        raise ConfigError(
            f"probe_timeout must be less than probe_interval "
            f"(got {settings.probe_timeout:g} >= {settings.probe_interval:g})"
        )
    if (settings.tls_cert is None) != (settings.tls_key is None):
        missing = "tls_key" if settings.tls_key is None else "tls_cert"
        raise ConfigError(f"{missing} is missing: HTTPS needs both tls_cert and tls_key")
    if settings.tls_client_ca is not None and settings.tls_cert is None:
        raise ConfigError("tls_client_ca needs tls_cert and tls_key: client certificates are checked only over HTTPS")
    # Only a serving node signs tokens: migrate and snapshot need no key.
    if serving and settings.database_url and settings.database_url.startswith("postgres") and settings.jwt_key is None:
        raise ConfigError(
            "jwt_key is required with a PostgreSQL database_url: every node sharing the database must sign and "
            "verify tokens with the same key; generate one with: openssl rand -hex 32"
        )
    return settings


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        # The TOML 1.0 specification requires UTF-8, and tomllib checks it before parsing.
        raise ConfigError(
            f"configuration file {path} is not valid TOML: byte {exc.start} is not UTF-8 text"
        ) from exc
    unknown = sorted(set(document) - set(SETTING_KEYS))
    if unknown:
        raise ConfigError(
            f"unknown key {unknown[0]!r} in {path}; accepted keys: {', '.join(SETTING_KEYS)}"
        )
    return document
