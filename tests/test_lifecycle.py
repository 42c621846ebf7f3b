"""Signals to a real server process, start-up failures, and ``check-config``.

SIGTERM must let requests in flight finish and exit 0; SIGHUP must apply the
settings that can change while serving, log each change, leave restart-only
settings alone and survive an invalid file.
"""

from __future__ import annotations

import asyncio
import collections
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest

from conftest import ServerProcess, closed_port, wait_until
from logpose.config import Settings, load_settings
from logpose.errors import ConfigError
from logpose.nameserver import DnsServer, Responder, ZoneSettings
from logpose.prober import Prober
from logpose.registry import Registry
from logpose.server.reload import Reloader, ReloadTargets, describe
from logpose.server.systemd import SystemdNotifier
from test_dns_clients import register_healthy

ZONE = "logpose.internal"
SERVER = [sys.executable, "-m", "logpose.server.main"]
JWT_KEY = "0123456789abcdef" * 4  # a test key, never a real one
STOP_TIMEOUT = 20.0  # seconds; the drain gives requests up to 10 s


def token_request_parts(server: ServerProcess) -> tuple[bytes, bytes]:
    """Return a token request cut in two: the headers with the first bytes of the body, and the rest."""
    body = json.dumps({"common_name": "admin", "secret": "not-the-secret-" * 3}).encode()
    head = (
        f"POST /api/auth/token HTTP/1.1\r\nHost: 127.0.0.1:{server.http_port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    return head + body[:10], body[10:]


def read_response(connection: socket.socket) -> bytes:
    connection.settimeout(STOP_TIMEOUT)
    data = b""
    while chunk := connection.recv(65536):
        data += chunk
    return data


def is_complete(response: bytes) -> bool:
    head, sep, body = response.partition(b"\r\n\r\n")
    lengths = [line.split(b":", 1)[1].strip() for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
    return bool(sep) and len(lengths) == 1 and len(body) == int(lengths[0])


def accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def query(server: ServerProcess, name: str, qtype: str = "A") -> dns.message.Message:
    return dns.query.udp(dns.message.make_query(name, qtype), "127.0.0.1", port=server.dns_port, timeout=2)


# ----- SIGTERM ---------------------------------------------------------------


def test_sigterm_finishes_requests_in_flight(server):
    """Requests whose bodies arrive after SIGTERM still get whole responses, then the server exits 0."""
    connections = []
    for _ in range(3):
        first, rest = token_request_parts(server)
        connection = socket.create_connection(("127.0.0.1", server.http_port), timeout=5)
        connection.sendall(first)
        connections.append((connection, rest))
    time.sleep(0.2)  # the server has read the headers: these requests are in flight

    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    stopped_accepting = wait_until(lambda: not accepts_connections(server.http_port), timeout=5)
    responses = []
    for connection, rest in connections:
        connection.sendall(rest)
        responses.append(read_response(connection))
        connection.close()
    exit_code = server.process.wait(timeout=STOP_TIMEOUT)

    assert stopped_accepting, server.log()
    for response in responses:
        assert response.startswith(b"HTTP/1.1 401 "), response[:200]
        assert is_complete(response), response
    assert exit_code == 0, server.log()
    assert time.monotonic() - started < STOP_TIMEOUT
    assert "LogPose stopped" in server.log()


def test_sigterm_during_burst_truncates_no_response(server):
    """Under a burst of requests, SIGTERM ends in refused connections or whole responses, never half of one.

    A connection still waiting in the kernel's accept queue when the listener
    closes is reset by the kernel before any response byte, so resets are
    counted but not failed.
    """
    outcomes: collections.Counter[str] = collections.Counter()
    deadline = time.monotonic() + 3.0
    request = "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()

    def send_requests() -> None:
        while time.monotonic() < deadline:
            try:
                connection = socket.create_connection(("127.0.0.1", server.http_port), timeout=5)
            except ConnectionRefusedError:
                outcomes["refused"] += 1
                time.sleep(0.01)
                continue
            try:
                connection.sendall(request)
                response = read_response(connection)
            except ConnectionResetError:
                outcomes["reset before any response byte"] += 1
                continue
            finally:
                connection.close()
            outcomes["complete" if response.startswith(b"HTTP/1.1 200 ") and is_complete(response)
                     else f"broken: {response[:40]!r}"] += 1

    threads = [threading.Thread(target=send_requests) for _ in range(6)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    server.process.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join()
    exit_code = server.process.wait(timeout=STOP_TIMEOUT)

    assert [outcome for outcome in outcomes if outcome.startswith("broken")] == [], outcomes
    assert outcomes["complete"] > 0, outcomes
    assert outcomes["refused"] > 0, outcomes
    assert exit_code == 0, server.log()


# ----- SIGHUP ----------------------------------------------------------------


def toml_value(value: object) -> str:
    """Return ``value`` as TOML: JSON strings, numbers and arrays are valid TOML too, tables are not."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(key)} = {toml_value(item)}" for key, item in value.items()) + " }"
    return json.dumps(value)


def write_config(path: Path, **settings: object) -> None:
    lines = [f"{key} = {toml_value(value)}" for key, value in settings.items()]
    path.write_text("\n".join(lines) + "\n")


def hang_up_and_wait(server: ServerProcess, expected: str) -> None:
    before = server.log().count("SIGHUP received")
    server.process.send_signal(signal.SIGHUP)
    assert wait_until(lambda: server.log().count("SIGHUP received") > before and expected in server.log(), timeout=10), (
        server.log()
    )


def test_sighup_reloads_dns_settings_and_log_levels(server_factory, tmp_path, tcp_listener):
    config = tmp_path / "logpose.toml"
    write_config(config, dns_ttl=5)
    server = server_factory(extra_args=["--config", str(config)])
    with server.client() as api:
        register_healthy(server, api, "web", tcp_listener)
    assert query(server, f"web.{ZONE}").answer[0].ttl == 5

    write_config(config, dns_ttl=42, log_levels={"logpose.dns": "DEBUG"},
                 domain="other.internal", jwt_key=JWT_KEY)
    hang_up_and_wait(server, "Reloaded dns_ttl: 5 -> 42")
    answer = query(server, f"web.{ZONE}")

    assert answer.answer[0].ttl == 42
    assert "Reloaded log_levels: unset -> logpose.dns=DEBUG" in server.log()
    assert wait_until(lambda: f"web.{ZONE}" in server.log(), timeout=5), "no DNS query log at DEBUG"
    assert "domain changed (logpose.internal -> other.internal)" in server.log()
    assert "takes effect only after a restart" in server.log()
    assert "jwt_key changed (unset -> (secret, not shown))" in server.log()
    assert JWT_KEY not in server.log()
    assert query(server, "web.other.internal").rcode() == dns.rcode.REFUSED  # the zone is still the old one

    write_config(config, dns_ttl=42, dns_allow=["10.0.0.0/8"])
    hang_up_and_wait(server, "Reloaded dns_allow: unset -> 10.0.0.0/8")
    assert query(server, f"web.{ZONE}").rcode() == dns.rcode.REFUSED


def test_sighup_rejects_invalid_file_and_keeps_serving(server_factory, tmp_path, tcp_listener):
    config = tmp_path / "logpose.toml"
    write_config(config, dns_ttl=7)
    server = server_factory(extra_args=["--config", str(config)])
    with server.client() as api:
        register_healthy(server, api, "web", tcp_listener)

    config.write_text("dns_ttl = 60\nprobe_concurency = 3\n")
    hang_up_and_wait(server, "Configuration reload rejected")
    rejected = [line for line in server.log().splitlines() if "Configuration reload rejected" in line]
    config.write_text("dns_ttl = -1\n")
    hang_up_and_wait(server, "dns_ttl in")

    assert len(rejected) == 1
    assert "unknown key 'probe_concurency'" in rejected[0]
    assert server.process.poll() is None
    assert query(server, f"web.{ZONE}").answer[0].ttl == 7
    assert "Reloaded dns_ttl" not in server.log()


def test_reload_applies_health_and_dns_settings():
    """The reloader replaces the registry's check defaults, the guard, the prober limit and the DNS settings."""

    async def scenario() -> tuple[Registry, Responder, DnsServer, Prober, Reloader, list[bool]]:
        start = Settings()
        registry = Registry(None)
        prober = Prober(registry, concurrency=start.probe_concurrency)
        zone = ZoneSettings(ttl=start.dns_ttl)
        responder = Responder(registry, zone)
        dns_server = DnsServer(responder, [("127.0.0.1", 0)])
        reloaded = replace(
            start, probe_interval=3.0, probe_timeout=1.0, probe_concurrency=2, health_rise=3, health_fall=4,
            deregister_after=60.0, mass_failure_guard=False, mass_failure_share=0.75, dns_ttl=30,
            dns_rate_limit=10, http_listen=("127.0.0.1", 1),
        )
        sources = iter([reloaded, ConfigError("dns_ttl: invalid")])

        def load() -> Settings:
            item = next(sources)
            if isinstance(item, ConfigError):
                raise item
            return item

        reloader = Reloader(start, load, ReloadTargets(registry, prober, responder, dns_server, zone),
                            SystemdNotifier(None))
        results = [reloader.reload(), reloader.reload()]
        await asyncio.sleep(0)  # lets the prober's slot reservations run
        return registry, responder, dns_server, prober, reloader, results

    registry, responder, dns_server, prober, reloader, results = asyncio.run(scenario())
    defaults = registry.health_defaults

    assert results == [True, False]
    assert (defaults.interval, defaults.timeout, defaults.rise, defaults.fall) == (3.0, 1.0, 3, 4)
    assert defaults.deregister_after == 60.0
    assert registry.guard.enabled is False
    assert registry.guard.share == 0.75
    assert registry.guard.window == 3.0
    assert prober._concurrency == 2
    assert responder._settings.ttl == 30
    assert responder._settings.negative_ttl == 30
    assert dns_server._rate_limiter is not None
    assert reloader.settings.http_listen == Settings().http_listen  # restart-only: kept
    assert reloader.settings.dns_ttl == 30


@pytest.mark.parametrize(("key", "value", "shown"), [
    ("jwt_key", JWT_KEY, "(secret, not shown)"),
    ("database_url", "postgresql://logpose:hunter22@127.0.0.1/logpose", "postgresql://logpose:***@127.0.0.1/logpose"),
    ("dns_listen", (("127.0.0.1", 53), ("::1", 53)), "127.0.0.1:53, [::1]:53"),
    ("dns_allow", (), "unset"),
    ("mass_failure_guard", False, "false"),
    ("probe_interval", 2.5, "2.5"),
])
def test_reload_log_values(key, value, shown):
    assert describe(key, value) == shown


# ----- start-up failures -------------------------------------------------------


def run_server(tmp_path: Path, *arguments: str, environment: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [*SERVER, "--data-dir", str(tmp_path / "data"), "--http-listen", "127.0.0.1:0",
               "--dns-listen", "127.0.0.1:0", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env=environment)


def test_database_unreachable_exits_with_store_code(tmp_path):
    url = f"postgresql://logpose@127.0.0.1:{closed_port()}/logpose"
    environment = {"PATH": "/usr/bin:/bin", "LOGPOSE_JWT_KEY": JWT_KEY}

    result = run_server(tmp_path, "--database-url", url, environment=environment)
    lines = result.stderr.strip().splitlines()

    assert result.returncode == 3, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("logpose-server: cannot open database postgresql+asyncpg://logpose@127.0.0.1:")
    assert "refused" in lines[0].lower()


def test_invalid_setting_is_one_line_naming_it(tmp_path):
    result = run_server(tmp_path, "--dns-ttl", "soon")

    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "logpose-server: invalid configuration: --dns-ttl: must be a whole number of seconds from 0 to 86400, got 'soon'"
    ]
    assert not (tmp_path / "data").exists()


# ----- check-config --------------------------------------------------------------


def check_config(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*SERVER, "check-config", str(path)], capture_output=True, text=True, timeout=60)


def test_check_config_accepts_example():
    example = Path(__file__).parent.parent / "conf" / "logpose.toml"

    result = check_config(example)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{example}: configuration OK"


@pytest.mark.parametrize(("content", "fragment"), [
    ("probe_interval = 0\n", "probe_interval in"),
    ("dns_listen = [\"localhost:53\"]\n", "dns_listen in"),
    ("log_levels = \"logpose.dns=LOUD\"\n", "log_levels in"),
    ("log_format = \"xml\"\n", "log_format in"),
    ("colour = true\n", "unknown key 'colour'"),
    ("probe_timeout = 20\n", "probe_timeout must be less than probe_interval"),
    ("tls_cert = \"/nonexistent/server.crt\"\ntls_key = \"/nonexistent/server.key\"\n", "tls_cert"),
    ("database_url = \"mysql://db/logpose\"\n", "database_url"),
    ("dns_ttl = \n", "not valid TOML"),
    (b"\xff\xfe dns_ttl = 5\n", "byte 0 is not UTF-8 text"),
    ("dns_workers = true\n", "from 1 to 64, got true"),
])
def test_check_config_rejects_with_one_line(tmp_path, content, fragment):
    path = tmp_path / "bad.toml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)

    result = check_config(path)
    lines = result.stderr.strip().splitlines()

    assert result.returncode == 2
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("logpose-server: invalid configuration: ")
    assert fragment in lines[0]
    assert result.stdout == ""


def test_check_config_ignores_environment(tmp_path, monkeypatch):
    path = tmp_path / "ok.toml"
    path.write_text("dns_ttl = 9\n")
    monkeypatch.setenv("LOGPOSE_DNS_TTL", "forever")

    assert check_config(path).returncode == 0
    assert load_settings({}, {}, path).dns_ttl == 9
