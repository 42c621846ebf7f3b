"""Fixtures that run the real ``logpose-server`` process on free loopback ports."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

STARTUP_TIMEOUT = 20.0  # seconds; a cold start on a loaded 2-core machine


def free_port(host: str = "127.0.0.1") -> int:
    """Return a port that is free for both TCP and UDP on ``host``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _attempt in range(50):
        with socket.socket(family, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = tcp.getsockname()[1]
            with socket.socket(family, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((host, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free for both TCP and UDP")


class ServerProcess:
    """A ``logpose-server`` child process with its data directory and ports."""

    def __init__(self, data_dir: Path, extra_args: list[str] | None = None, ca_file: Path | None = None) -> None:
        self.data_dir = data_dir
        self.ca_file = ca_file  # CA of the server's TLS certificate; None: the server speaks plain HTTP
        self.http_port = free_port()
        self.dns_port = free_port()
        self.extra_args = extra_args or []
        self.environment: dict[str, str] = {}  # LOGPOSE_* variables for the server
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}-server.log"

    @property
    def url(self) -> str:
        scheme = "https" if self.ca_file else "http"
        return f"{scheme}://127.0.0.1:{self.http_port}"

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """The ``verify`` argument for httpx: a context that trusts ``ca_file``, or True."""
        return ssl.create_default_context(cafile=self.ca_file) if self.ca_file else True

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "logpose.server.main",
            "--data-dir", str(self.data_dir),
            "--http-listen", f"127.0.0.1:{self.http_port}",
            "--dns-listen", f"127.0.0.1:{self.dns_port}",
            "--probe-interval", "0.5",
            "--probe-timeout", "0.3",
            *self.extra_args,
        ]

    def start(self) -> "ServerProcess":
        environment = {key: value for key, value in os.environ.items() if not key.startswith("LOGPOSE_")}
        environment.update(self.environment)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=log, env=environment)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1, verify=self.verify).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server did not answer /healthz within {STARTUP_TIMEOUT} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int | None:
        """Stop with SIGTERM and return the exit code."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def kill(self) -> None:
        """Kill with SIGKILL, as a crash or power cut would, with no chance to flush."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def admin_secret(self) -> str:
        return (self.data_dir / "admin.secret").read_text().strip()

    def token(self) -> str:
        answer = httpx.post(
            self.url + "/api/auth/token",
            json={"common_name": "admin", "secret": self.admin_secret()},
            timeout=10,
            verify=self.verify,
        )
        answer.raise_for_status()
        return answer.json()["access_token"]

    def client(self) -> httpx.Client:
        """Return an HTTP client with the admin's Bearer token."""
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.token()}"}, timeout=10, verify=self.verify
        )


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator:
    """Make servers on demand; every one is stopped at the end of the test."""
    servers: list[ServerProcess] = []

    def make(
        name: str = "data", extra_args: list[str] | None = None, environment: dict[str, str] | None = None
    ) -> ServerProcess:
        server = ServerProcess(tmp_path / name, extra_args)
        server.environment = environment or {}
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def server(server_factory) -> ServerProcess:
    return server_factory()


@pytest.fixture
def api(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


class TcpListener:
    """A real TCP listener on loopback that accepts and closes connections in a thread."""

    def __init__(self) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(64)
        self.socket.settimeout(0.2)
        self.port = self.socket.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                connection, _peer = self.socket.accept()
            except (TimeoutError, OSError):
                continue
            connection.close()

    def close(self) -> None:
        """Stop listening: later connections to the port are refused."""
        self._closed.set()
        self._thread.join()
        self.socket.close()


@pytest.fixture
def tcp_listener() -> Iterator[TcpListener]:
    listener = TcpListener()
    yield listener
    listener.close()


def closed_port() -> int:
    """Return a loopback TCP port that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(condition, timeout: float, interval: float = 0.05):
    """Poll ``condition`` until it returns a truthy value; return it, or the last value at timeout."""
    deadline = time.monotonic() + timeout
    value = condition()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = condition()
    return value


def run_bench_smoke(script: Path, timeout: float, cwd: Path) -> str:
    """Run a benchmark script with ``--smoke``; return its output once it exits 0."""
    process = subprocess.Popen(
        [sys.executable, str(script), "--smoke"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM lets the script stop the servers and listeners it started.
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
        pytest.fail(f"the smoke run of {script.name} did not finish within {timeout:g} s:\n{stderr}")
    assert process.returncode == 0, stderr
    return stdout


def run_cli(server: ServerProcess, *arguments: str, credentials: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``logpose-command`` against ``server``, as admin unless ``credentials`` is False."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("LOGPOSE_")}
    environment["LOGPOSE_URL"] = server.url
    if credentials:
        environment["LOGPOSE_COMMON_NAME"] = "admin"
        environment["LOGPOSE_SECRET_FILE"] = str(server.data_dir / "admin.secret")
    result = subprocess.run(
        [sys.executable, "-c", "from logpose.cli.app import main; main()", *arguments],
        capture_output=True, text=True, env=environment, timeout=30,
    )
    assert "Traceback" not in result.stderr
    return result


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """Return the CLI's error line, checking it is the only line on stderr."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


PROBLEM_CONTENT_TYPE = "application/problem+json"


def assert_problem(answer: httpx.Response, status: int, field: str | None = None) -> dict:
    """Check that ``answer`` is an RFC 9457 problem with ``status`` (naming ``field``), and return it."""
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith(PROBLEM_CONTENT_TYPE)
    problem = answer.json()
    assert problem["status"] == status
    assert problem["type"]
    assert problem["title"]
    assert problem["detail"]
    if field is not None:
        assert [error["field"] for error in problem["errors"]] == [field], problem
    return problem
