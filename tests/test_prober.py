"""The prober against real TCP and HTTP(S) listeners on loopback, in-process."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from aiohttp import web

from conftest import closed_port
from logpose.health import HealthDefaults, MassFailureGuard
from logpose.model import Health, parse_instance_spec
from logpose.prober import Prober
from logpose.registry import Registry

INTERVAL = 0.4  # seconds


def new_registry(**defaults) -> Registry:
    return Registry(
        None,
        defaults=HealthDefaults(**{"interval": INTERVAL, "timeout": 0.2, **defaults}),
        guard=MassFailureGuard(share=0.5, window=INTERVAL, enabled=False),
    )


async def wait_for_health(registry: Registry, instance_id: str, expected: Health, timeout: float) -> float:
    """Wait until the instance has ``expected`` health; return the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if registry.get_instance(instance_id).health is expected:
            return time.monotonic() - started
        await asyncio.sleep(0.01)
    raise AssertionError(
        f"instance stayed {registry.get_instance(instance_id).health.value}: {registry.get_instance(instance_id).output}"
    )


async def start_http(handler_status: int, ssl_context: ssl.SSLContext | None = None) -> tuple[web.AppRunner, int]:
    async def health(_request: web.Request) -> web.Response:
        return web.Response(status=handler_status, text=f"status {handler_status}")

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    return runner, runner.addresses[0][1]


async def run_with_prober(registry: Registry, scenario) -> None:
    prober = Prober(registry, concurrency=8)
    task = asyncio.create_task(prober.run())
    try:
        await scenario(prober)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def register(registry: Registry, service: str, body: dict):
    return registry.register(service, parse_instance_spec(body))


def test_first_probe_runs_at_once():
    async def scenario(_prober):
        server = await asyncio.start_server(lambda reader, writer: writer.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            instance, _ = await register(registry, "web", {"address": f"127.0.0.1:{port}", "protocol": "Tcp",
                                                             "check": {"type": "tcp", "interval": 30, "timeout": 1}})
            took = await wait_for_health(registry, instance.id, Health.HEALTHY, timeout=5)
            assert took < 5, "with a 30 s interval, only an immediate first probe explains this"
        finally:
            server.close()

    registry = new_registry()
    asyncio.run(run_with_prober(registry, scenario))


def test_closed_listener_turns_unhealthy_after_fall():
    async def scenario(_prober):
        server = await asyncio.start_server(lambda reader, writer: writer.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        instance, _ = await register(registry, "web", {"address": f"127.0.0.1:{port}", "protocol": "Tcp"})
        await wait_for_health(registry, instance.id, Health.HEALTHY, timeout=5)
        server.close()
        await server.wait_closed()
        await wait_for_health(registry, instance.id, Health.UNHEALTHY, timeout=5 * INTERVAL + 2)
        assert "refused" in registry.get_instance(instance.id).output
        history = registry.history(instance.id)
        assert [transition.health for transition in history] == [Health.HEALTHY, Health.UNHEALTHY]

    registry = new_registry()
    asyncio.run(run_with_prober(registry, scenario))


@pytest.mark.parametrize(
    "status, check, expected",
    [
        (200, {"type": "http", "path": "/health"}, Health.HEALTHY),
        (204, {"type": "http", "path": "/health"}, Health.HEALTHY),
        (503, {"type": "http", "path": "/health"}, Health.UNHEALTHY),
        (302, {"type": "http", "path": "/health"}, Health.UNHEALTHY),
        (503, {"type": "http", "path": "/health", "expected_status": 503}, Health.HEALTHY),
        (200, {"type": "http", "path": "/missing"}, Health.UNHEALTHY),
    ],
)
def test_http_check_status(status, check, expected):
    async def scenario(_prober):
        runner, port = await start_http(status)
        try:
            instance, _ = await register(registry, "web", {"address": f"127.0.0.1:{port}", "protocol": "Http",
                                                             "check": check})
            await wait_for_health(registry, instance.id, expected, timeout=5)
            assert "HTTP GET http://127.0.0.1" in registry.get_instance(instance.id).output
        finally:
            await runner.cleanup()

    registry = new_registry()
    asyncio.run(run_with_prober(registry, scenario))


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    certificate, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-keyout", str(key), "-out", str(certificate)],
        check=True, capture_output=True,
    )
    return certificate, key


@pytest.mark.parametrize("tls_verify, expected", [(False, Health.HEALTHY), (True, Health.UNHEALTHY)])
def test_https_check_with_and_without_verification(self_signed, tls_verify, expected):
    certificate, key = self_signed

    async def scenario(_prober):
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(certificate, key)
        runner, port = await start_http(200, context)
        try:
            check = {"type": "http", "path": "/health", "tls_verify": tls_verify}
            instance, _ = await register(registry, "web", {"address": f"127.0.0.1:{port}", "protocol": "Https",
                                                             "check": check})
            await wait_for_health(registry, instance.id, expected, timeout=5)
            output = registry.get_instance(instance.id).output
            assert output.startswith("HTTP GET https://")
            if not tls_verify:
                assert "200" in output
            else:
                assert "certificate" in output.lower()
        finally:
            await runner.cleanup()

    registry = new_registry()
    asyncio.run(run_with_prober(registry, scenario))


def test_probes_in_flight_are_bounded():
    async def scenario(prober):
        # Black-hole connections: a listener that never accepts keeps SYN-ACKed
        # sockets in its backlog, so make each probe slow with a slow HTTP handler instead.
        release = asyncio.Event()

        async def slow(_request):
            await release.wait()
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_get("/", slow)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            for number in range(20):
                await register(registry, f"svc{number}", {"address": f"127.0.0.1:{port}", "protocol": "Http",
                                                         "check": {"type": "http", "interval": 5, "timeout": 3}})
            peak = 0
            for _ in range(50):
                peak = max(peak, prober.in_flight)
                await asyncio.sleep(0.01)
            assert 0 < peak <= 8
        finally:
            release.set()
            await runner.cleanup()

    registry = new_registry()
    asyncio.run(run_with_prober(registry, scenario))


def test_deregistered_instance_is_no_longer_probed():
    async def scenario(prober):
        instance, _ = await register(registry, "web", {"address": f"127.0.0.1:{closed_port()}", "protocol": "Tcp"})
        await wait_for_health(registry, instance.id, Health.UNHEALTHY, timeout=5)
        await registry.deregister(instance.id)
        done = prober.probes_done
        await asyncio.sleep(3 * INTERVAL)
        assert prober.probes_done == done

    registry = new_registry()
    asyncio.run(run_with_prober(registry, scenario))
