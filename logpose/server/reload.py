"""SIGHUP: read the settings again and apply those that can change while serving.

The settings come from the same sources as at start: the command-line flags
given then, the process environment (which a signal cannot change) and the
``--config`` file, read again. Settings outside ``RELOADABLE`` are bound to
open sockets, files or keys, so a change to them is logged and waits for a
restart. An invalid file is rejected as a whole and the running settings stay.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from logpose.config import SETTING_KEYS, Settings
from logpose.errors import ConfigError
from logpose.health import HealthDefaults
from logpose.log import server_log
from logpose.logsetup import configure_logging
from logpose.nameserver import DnsServer, Responder, ZoneSettings
from logpose.nameserver.workers import DnsWorkers
from logpose.prober import Prober
from logpose.registry import Registry
from logpose.server.systemd import SystemdNotifier

LOG_SETTINGS = frozenset({"log_level", "log_levels", "log_format", "access_log"})
HEALTH_SETTINGS = frozenset({
    "probe_interval", "probe_timeout", "probe_concurrency", "health_rise", "health_fall",
    "deregister_after", "mass_failure_guard", "mass_failure_share",
})
DNS_SETTINGS = frozenset({"dns_ttl", "dns_allow", "dns_rate_limit"})
RELOADABLE = LOG_SETTINGS | HEALTH_SETTINGS | DNS_SETTINGS
SECRET_SETTINGS = frozenset({"jwt_key"})


def health_defaults_for(settings: Settings) -> HealthDefaults:
    return HealthDefaults(
        interval=settings.probe_interval,
        timeout=settings.probe_timeout,
        rise=settings.health_rise,
        fall=settings.health_fall,
        deregister_after=settings.deregister_after or None,
    )


@dataclass(frozen=True, slots=True)
class ReloadTargets:
    """The running parts that a reload reconfigures."""

    registry: Registry
    prober: Prober
    responder: Responder
    dns_server: DnsServer
    zone: ZoneSettings  # the zone settings the responder started with
    dns_workers: DnsWorkers | None = None


class Reloader:
    """Applies new settings to a running server, one SIGHUP at a time.

    ``load`` returns freshly read settings or raises ConfigError. ``settings``
    is what the server runs with: the last accepted settings, with every
    restart-only key still at its start-up value.
    """

    def __init__(
        self,
        settings: Settings,
        load: Callable[[], Settings],
        targets: ReloadTargets,
        notifier: SystemdNotifier,
    ) -> None:
        self.settings = settings
        self._load = load
        self._targets = targets
        self._zone = targets.zone
        self._notifier = notifier

    async def run(self, requested: asyncio.Event) -> None:
        """Reload each time ``requested`` is set, until cancelled."""
        while True:
            await requested.wait()
            requested.clear()
            try:
                self.reload()
            except Exception:  # a bug in one reload must not stop the later ones
                server_log.exception("Configuration reload failed; the settings may be partly applied")

    def reload(self) -> bool:
        """Read the settings again and apply what may change; return whether they were accepted."""
        # systemd.service(5), Type=notify-reload: RELOADING=1 with the monotonic
        # time in microseconds, then READY=1 once the reload is over.
        self._notifier.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            accepted = self._reload()
        finally:
            self._notifier.notify("READY=1", f"STATUS=Serving zone {self.settings.domain}")
        return accepted

    def _reload(self) -> bool:
        server_log.info("SIGHUP received: reading the configuration again")
        try:
            new = self._load()
        except ConfigError as exc:
            server_log.error("Configuration reload rejected, the running settings stay: %s", exc.detail)
            return False
        old = self.settings
        changed = [key for key in SETTING_KEYS if getattr(new, key) != getattr(old, key)]
        needs_restart = [key for key in changed if key not in RELOADABLE]
        for key in needs_restart:
            server_log.warning(
                "%s changed (%s -> %s) but takes effect only after a restart; still using the old value",
                key, describe(key, getattr(old, key)), describe(key, getattr(new, key)),
            )
        effective = dataclasses.replace(new, **{key: getattr(old, key) for key in needs_restart})
        try:
            # Built, and so validated, before anything running is changed.
            zone = dataclasses.replace(
                self._zone, ttl=effective.dns_ttl, negative_ttl=effective.dns_ttl, allow=effective.dns_allow
            )
        except ConfigError as exc:
            server_log.error("Configuration reload rejected, the running settings stay: %s", exc.detail)
            return False

        # Logged before the new log levels apply, so raising a level does not hide these lines.
        for key in changed:
            if key in RELOADABLE:
                server_log.info("Reloaded %s: %s -> %s", key, describe(key, getattr(old, key)),
                                describe(key, getattr(new, key)))
        if not changed:
            server_log.info("Configuration reloaded: no setting changed")
        self._apply(effective, changed, zone)
        self.settings = effective
        return True

    def _apply(self, settings: Settings, changed: list[str], zone: ZoneSettings) -> None:
        targets = self._targets
        defaults = health_defaults_for(settings)
        workers = targets.dns_workers
        if LOG_SETTINGS.intersection(changed):
            configure_logging(settings)
            if workers is not None:
                workers.configure_logging(settings)
        if HEALTH_SETTINGS.intersection(changed):
            targets.registry.health_defaults = defaults
            targets.registry.guard.configure(
                share=settings.mass_failure_share,
                window=settings.probe_interval,
                enabled=settings.mass_failure_guard,
            )
            targets.prober.reconfigure(settings.probe_concurrency)
        if {"dns_ttl", "dns_allow"}.intersection(changed):
            targets.responder.update_settings(zone)
            if workers is not None:
                workers.update_settings(zone)
            self._zone = zone
        if "dns_rate_limit" in changed:
            targets.dns_server.set_rate_limit(settings.dns_rate_limit)
            if workers is not None:
                workers.set_rate_limit(settings.dns_rate_limit)


def describe(key: str, value: Any) -> str:
    """Format a setting's value for a log line; never returns a secret."""
    if value is None or value == ():
        return "unset"
    if key in SECRET_SETTINGS:
        return "(secret, not shown)"
    if key == "database_url":
        try:
            return make_url(value).render_as_string(hide_password=True)
        except ArgumentError:
            return "(not shown)"
    if key in ("http_listen",):
        return _host_port(value)
    if key in ("dns_listen", "recursors"):
        return ", ".join(_host_port(item) for item in value)
    if key == "log_levels":
        return ", ".join(f"{name}={level}" for name, level in value)
    if isinstance(value, tuple):
        return ", ".join(str(item) for item in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _host_port(value: tuple[str, int]) -> str:
    host, port = value
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
