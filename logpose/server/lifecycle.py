"""The server's lifecycle: open the store, load the registry, start the prober,
bind DNS and HTTP, then on a signal stop accepting, drain and close."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import socket
import uuid
from pathlib import Path
from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from logpose.api import build_app
from logpose.api.access import AccessLogger
from logpose.api.problems import Handler
from logpose.auth import Authenticator, load_signing_key
from logpose.config import Settings
from logpose.errors import ConfigError, StoreUnavailableError
from logpose.health import MassFailureGuard
from logpose.log import access_log, server_log
from logpose.metrics import Metrics
from logpose.nameserver import DnsServer, Responder, ZoneSettings
from logpose.nameserver.workers import DnsWorkers
from logpose.prober import Prober
from logpose.registry import Registry
from logpose.server.drain import RequestDrain
from logpose.server.reload import Reloader, ReloadTargets, health_defaults_for
from logpose.server.systemd import SystemdNotifier
from logpose.server.tls import server_ssl_context
from logpose.store import SqlStore, database_url_for
from logpose.store.control import ControlChannel
from logpose.store.sql import CLIENT_CHANGE

EXIT_CONFIG = 2
EXIT_STORE = 3
EXIT_BIND = 4
SHUTDOWN_GRACE = 10.0  # seconds for in-flight HTTP requests to finish
# Seconds for responses to go out once connections close; requests still running then are cancelled.
HTTP_CLOSE_TIMEOUT = 2.0


class StartupError(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


async def serve(settings: Settings, reload_settings: Callable[[], Settings] | None = None) -> None:
    """Run the server until SIGTERM or SIGINT; raise StartupError if it cannot start.

    On SIGHUP, ``reload_settings`` reads the settings again (see
    ``logpose.server.reload``); without it a reload keeps ``settings``.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop.set)
    # A SIGHUP that arrives during start-up is applied once the server is ready.
    reload_requested = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, reload_requested.set)
    notifier = SystemdNotifier.from_environment()

    # Fail on a taken port before the data directory, keys or admin secret are
    # touched, so a second server started by mistake changes nothing.
    _check_ports_free(settings)

    if settings.data_dir.exists() and not settings.data_dir.is_dir():
        raise StartupError(f"data directory {settings.data_dir} is not a directory", EXIT_CONFIG)
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"cannot create data directory {settings.data_dir}: {exc.strerror}", EXIT_CONFIG) from exc

    try:
        ssl_context = server_ssl_context(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    except ConfigError as exc:
        raise StartupError(f"invalid configuration: {exc.detail}", EXIT_CONFIG) from exc

    try:
        store = SqlStore(database_url_for(settings.data_dir, settings.database_url))
        await store.open()
    except ConfigError as exc:
        raise StartupError(f"invalid configuration: {exc.detail}", EXIT_CONFIG) from exc
    except StoreUnavailableError as exc:
        raise StartupError(exc.detail, EXIT_STORE) from exc

    background: list[asyncio.Task[None]] = []
    reloads: set[asyncio.Task[None]] = set()  # client-table reloads the change feed asked for
    duties: ProberDuties | None = None
    dns_workers: DnsWorkers | None = None
    runner: web.AppRunner | None = None
    drain = RequestDrain()
    try:
        # The registry is loaded before any listener is bound, so a restarting
        # server never answers from an empty catalog.
        defaults = health_defaults_for(settings)
        guard = MassFailureGuard(
            share=settings.mass_failure_share, window=settings.probe_interval, enabled=settings.mass_failure_guard
        )
        registry = Registry(store, defaults=defaults, guard=guard)
        registry.node.node_id = _node_id(settings.data_dir)
        try:
            signing_key = load_signing_key(settings.data_dir, settings.jwt_key)
            authenticator = Authenticator(store, signing_key, settings.token_lifetime)
            await registry.load()
            await authenticator.load_clients()
            await authenticator.ensure_admin(settings.data_dir)
        except StoreUnavailableError as exc:
            raise StartupError(exc.detail, EXIT_STORE) from exc
        except OSError as exc:
            raise StartupError(f"cannot set up credentials in {settings.data_dir}: {exc}", EXIT_CONFIG) from exc

        prober = Prober(registry, concurrency=settings.probe_concurrency)
        metrics = Metrics(registry)
        metrics.watch_prober(prober)
        metrics.watch_store(store)
        duties = ProberDuties(registry, prober)
        background.append(asyncio.create_task(registry.run_health_writer(), name="health-writer"))
        if store.is_sqlite:
            duties.set_leader(True)
        else:
            # Several nodes may share this database: follow their changes, and
            # probe only while holding the prober lock.
            registry.node.shared = True
            registry.node.prober = False
            wake = asyncio.Event()
            channel = ControlChannel(
                store.url,
                node_id=registry.node.node_id,
                on_notify=wake.set,
                on_leadership=duties.set_leader,
                period=min(max(settings.probe_interval / 2, 0.5), 5.0),
            )
            registry.watch_kind(CLIENT_CHANGE, lambda: _spawn(reloads, _reload_clients(authenticator)))
            background.append(asyncio.create_task(registry.run_change_feed(wake), name="change-feed"))
            background.append(asyncio.create_task(channel.run(), name="control-channel"))

        zone = ZoneSettings(
            domain=settings.domain,
            ttl=settings.dns_ttl,
            negative_ttl=settings.dns_ttl,
            ns_addresses=_advertised_addresses(settings),
            max_udp_payload=settings.dns_max_udp_payload,
            answer_limit=settings.dns_answer_limit,
            reverse_zones=settings.dns_reverse_zones,
            allow=settings.dns_allow,
            recursors=settings.recursors,
            recursor_timeout=settings.recursor_timeout,
        )
        responder = Responder(registry, zone)
        metrics.watch_responder(responder)
        dns_server = DnsServer(
            responder, list(settings.dns_listen), rate_limit=settings.dns_rate_limit,
            reuse_port=settings.dns_workers > 1,
        )
        try:
            await dns_server.start()
        except OSError as exc:
            # DnsServer.start() puts the protocol, the address and the reason in strerror.
            message = exc.strerror or f"cannot listen for DNS on {_format_listen(settings.dns_listen)}: {exc}"
            raise StartupError(message, EXIT_BIND) from exc
        if settings.dns_workers > 1:
            dns_workers = DnsWorkers(
                registry, settings.dns_workers - 1, zone=zone, listen=dns_server.bound_addresses,
                rate_limit=settings.dns_rate_limit, settings=settings, tally=metrics.dns,
            )
            try:
                await dns_workers.start()
            except OSError as exc:
                raise StartupError(f"cannot start the DNS workers: {exc.strerror or exc}", EXIT_BIND) from exc

        app = build_app(registry, authenticator, metrics)
        app.middlewares.append(drain.middleware)
        if dns_workers is not None:
            app.middlewares.append(_await_workers(dns_workers))
        # The access logger stays attached even when access_log is off, so SIGHUP can turn it on.
        runner = web.AppRunner(
            app, access_log=access_log, access_log_class=AccessLogger, shutdown_timeout=HTTP_CLOSE_TIMEOUT
        )
        await runner.setup()
        host, port = settings.http_listen
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(f"cannot listen for HTTP on {_format_host_port(host, port)}: {_reason(exc)}", EXIT_BIND) from exc
        for bound in runner.addresses:
            scheme = "https" if ssl_context is not None else "http"
            server_log.info("HTTP API listening on %s://%s", scheme, _format_host_port(bound[0], bound[1]))
        server_log.info(
            "LogPose ready: zone %s, %d service(s), %d instance(s), index %d",
            settings.domain, len(registry.services()), len(registry.instances()), registry.index,
        )
        # READY=1 only now, with the catalog loaded and every listener bound, so
        # units ordered after LogPose find it answering.
        notifier.ready(f"Serving zone {settings.domain}")
        background.append(asyncio.create_task(notifier.run_watchdog(), name="systemd-watchdog"))
        reloader = Reloader(
            settings,
            reload_settings or (lambda: settings),
            ReloadTargets(registry, prober, responder, dns_server, zone, dns_workers),
            notifier,
        )
        background.append(asyncio.create_task(reloader.run(reload_requested), name="reload"))

        await stop.wait()
        server_log.info("Shutting down")
        notifier.stopping()
    finally:
        # Stop accepting first, then let in-flight requests finish, then stop
        # background work, and close the store last so pending health is written.
        if runner is not None:
            for http_site in list(runner.sites):
                await http_site.stop()
            if not await drain.wait_idle(SHUTDOWN_GRACE):
                server_log.warning(
                    "%d HTTP request(s) still in flight after %g s; cancelling them", drain.in_flight, SHUTDOWN_GRACE
                )
            await runner.cleanup()
        if dns_server is not None:
            await dns_server.close()
        if dns_workers is not None:
            await dns_workers.close()
        if duties is not None:
            duties.set_leader(False)
        for task in background:
            task.cancel()
        for task in background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(StoreUnavailableError):
            await registry.flush_health()
        await store.close()
        server_log.info("LogPose stopped")


NODE_ID_FILE_NAME = "node.id"
_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _await_workers(workers: DnsWorkers) -> Middleware:
    """Return a middleware that answers an HTTP write only once the DNS workers applied it.

    So whichever process answers the client's next DNS query shows its change.
    """

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        if request.method not in _READ_METHODS:
            await workers.wait_applied()
        return response

    return middleware


def _node_id(data_dir: Path) -> str:
    """Return this node's id, made once and kept in the data directory so restarts keep it."""
    path = data_dir / NODE_ID_FILE_NAME
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        node_id = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        path.write_text(node_id + "\n")
        return node_id


def _spawn(tasks: set[asyncio.Task[None]], coroutine) -> None:
    """Run ``coroutine`` as a task, keeping a strong reference until it ends."""
    task = asyncio.get_running_loop().create_task(coroutine)
    tasks.add(task)
    task.add_done_callback(tasks.discard)


async def _reload_clients(authenticator: Authenticator) -> None:
    """Reload the client table after another node changed it, so its revocations apply here too."""
    try:
        await authenticator.load_clients()
    except StoreUnavailableError as exc:
        # The change feed reads the log again once the database is back, and calls this again.
        server_log.warning("Could not reload clients changed on another node: %s", exc.detail)


class ProberDuties:
    """Start the prober and the health watchdog while this node leads, stop them when it does not."""

    def __init__(self, registry: Registry, prober: Prober) -> None:
        self._registry = registry
        self._prober = prober
        self._tasks: list[asyncio.Task[None]] = []

    def set_leader(self, leader: bool) -> None:
        self._registry.node.prober = leader
        if leader and not self._tasks:
            # Silence before the takeover was another node's to watch.
            self._registry.restart_deadlines()
            self._tasks = [
                asyncio.get_running_loop().create_task(self._prober.run(), name="prober"),
                asyncio.get_running_loop().create_task(self._registry.run_health_watchdog(), name="health-watchdog"),
            ]
        elif not leader:
            for task in self._tasks:
                task.cancel()
            self._tasks = []


def _check_ports_free(settings: Settings) -> None:
    """Raise StartupError when a fixed listen port is taken; port 0 is skipped, since the system picks a free one."""
    listeners = [("HTTP", socket.SOCK_STREAM, *settings.http_listen)]
    for host, port in settings.dns_listen:
        listeners += [("DNS", socket.SOCK_DGRAM, host, port), ("DNS", socket.SOCK_STREAM, host, port)]
    for protocol, kind, host, port in listeners:
        if port == 0:
            continue
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, kind) as probe:
            if kind == socket.SOCK_STREAM:
                # As the real listeners do, so a port in TIME_WAIT does not count as taken.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                transport = "udp" if kind == socket.SOCK_DGRAM else "tcp"
                raise StartupError(
                    f"cannot listen for {protocol} on {transport} {_format_host_port(host, port)}: {_reason(exc)}",
                    EXIT_BIND,
                ) from exc


def _reason(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else str(exc)


def _advertised_addresses(settings: Settings) -> list[str]:
    """Return the DNS listen addresses that clients can reach, for the apex's ``ns`` record."""
    addresses = []
    for host, _port in settings.dns_listen:
        if not ipaddress.ip_address(host).is_unspecified and host not in addresses:
            addresses.append(host)
    return addresses


def _format_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _format_listen(addresses: tuple[tuple[str, int], ...]) -> str:
    return ", ".join(_format_host_port(host, port) for host, port in addresses)
