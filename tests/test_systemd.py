"""The server under systemd: the notification protocol, the unit file and its sandbox.

No test here runs systemd itself (PID 1 is not systemd on the test machines). The
real server process is started the way systemd starts it, with ``NOTIFY_SOCKET``
and ``STATE_DIRECTORY`` set, and the test plays the service manager's end of
the socket. ``systemd-analyze`` checks the unit file offline.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

import dns.message
import dns.query
import dns.rcode
import httpx
import pytest

from conftest import STARTUP_TIMEOUT, ServerProcess
from logpose.config import load_settings
from logpose.server.systemd import SystemdNotifier
from test_dns_clients import register_healthy, require_program

ROOT = Path(__file__).parent.parent
UNIT = ROOT / "systemd" / "logpose.service"
SYSUSERS = ROOT / "systemd" / "logpose.sysusers"
ZONE = "logpose.internal"

PR_SET_MDWE = 65  # prctl(2), Linux 6.3 and later
PR_MDWE_REFUSE_EXEC_GAIN = 1
# Set the memory-deny-write-execute flag on this process, then execute the
# command in argv; the kernel keeps the flag across execve.
MDWE_WRAPPER = f"""
import ctypes, os, sys
if ctypes.CDLL(None, use_errno=True).prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
    sys.exit("prctl(PR_SET_MDWE) failed: " + os.strerror(ctypes.get_errno()))
os.execv(sys.argv[1], sys.argv[1:])
"""


class NotifyListener:
    """The service manager's end of sd_notify: a bound Unix datagram socket."""

    def __init__(self, address: str) -> None:
        """``address`` is a path, or ``@name`` for an abstract socket, written as in ``NOTIFY_SOCKET``."""
        self.address = address
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind("\0" + address[1:] if address.startswith("@") else address)
        self.messages: list[list[str]] = []

    def wait_for(self, assignment: str, timeout: float) -> list[str]:
        """Receive messages until one contains ``assignment``; return that message's lines."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.socket.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                datagram = self.socket.recv(4096)
            except TimeoutError:
                break
            lines = datagram.decode().split("\n")
            self.messages.append(lines)
            if assignment in lines:
                return lines
        raise AssertionError(f"no {assignment} within {timeout} s; received {self.messages}")

    def close(self) -> None:
        self.socket.close()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A directory with a short path: a Unix socket path has at most 107 bytes."""
    with tempfile.TemporaryDirectory(prefix="lp-") as directory:
        yield Path(directory)


def start_as_systemd(server: ServerProcess, environment: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start ``server`` with ``environment`` added and without ``--data-dir``, as the unit does."""
    command = server.command()
    data_dir_at = command.index("--data-dir")
    del command[data_dir_at:data_dir_at + 2]
    child_environment = {key: value for key, value in os.environ.items() if not key.startswith("LOGPOSE_")}
    child_environment.update(environment)
    log = server.log_path.open("ab")
    server.process = subprocess.Popen(command, stdout=log, stderr=log, env=child_environment)
    return server.process


def query_soa(server: ServerProcess, transport) -> int:
    query = dns.message.make_query(ZONE, "SOA")
    return transport(query, "127.0.0.1", port=server.dns_port, timeout=2).rcode()


def test_ready_stopping_and_state_directory(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    listener = NotifyListener(f"@logpose-test-{uuid.uuid4().hex}")
    server = ServerProcess(state)
    try:
        process = start_as_systemd(
            server, {"NOTIFY_SOCKET": listener.address, "STATE_DIRECTORY": f"{state}:{tmp_path / 'second'}"}
        )

        ready = listener.wait_for("READY=1", STARTUP_TIMEOUT)
        # READY=1 comes after both listeners are bound, so each responds at once.
        healthz = httpx.get(server.url + "/healthz", timeout=2)
        udp_rcode = query_soa(server, dns.query.udp)
        tcp_rcode = query_soa(server, dns.query.tcp)
        process.send_signal(signal.SIGTERM)
        stopping = listener.wait_for("STOPPING=1", 15)
        exit_code = process.wait(timeout=15)
    finally:
        server.stop()
        listener.close()

    assert f"STATUS=Serving zone {ZONE}" in ready
    assert healthz.status_code == 200
    assert udp_rcode == dns.rcode.NOERROR
    assert tcp_rcode == dns.rcode.NOERROR
    assert "STATUS=Shutting down" in stopping
    assert exit_code == 0, server.log()
    assert [lines for lines in listener.messages if "READY=1" in lines] == [ready]
    # The data directory is the first entry of STATE_DIRECTORY.
    assert (state / "admin.secret").exists()
    assert (state / "logpose.db").exists()
    assert not (tmp_path / "second").exists()


def test_watchdog_pings_at_half_timeout(tmp_path, short_tmp):
    listener = NotifyListener(str(short_tmp / "notify"))
    server = ServerProcess(tmp_path / "data")
    timeout = 1.0  # seconds, so a ping every 0.5 s
    try:
        process = start_as_systemd(
            server,
            {
                "NOTIFY_SOCKET": listener.address,
                "STATE_DIRECTORY": str(tmp_path / "data"),
                "WATCHDOG_USEC": str(int(timeout * 1_000_000)),
            },
        )
        listener.wait_for("READY=1", STARTUP_TIMEOUT)
        started = time.monotonic()
        pings = 0
        while pings < 4:
            listener.wait_for("WATCHDOG=1", timeout)
            pings += 1
        elapsed = time.monotonic() - started
        process.send_signal(signal.SIGTERM)
        exit_code = process.wait(timeout=15)
    finally:
        server.stop()
        listener.close()

    # The first ping follows READY=1 at once, then one every 0.5 s: four take
    # about 1.5 s. Pings sent too often would arrive well before that.
    assert elapsed >= 3 * timeout / 2 * 0.8
    assert exit_code == 0, server.log()


def test_notifier_without_socket_sends_nothing():
    notifier = SystemdNotifier.from_environment({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.watchdog_timeout is None
    assert notifier.ready("Serving") is False


@pytest.mark.parametrize(
    ("environment", "expected_timeout"),
    [
        ({"NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "30000000"}, 30.0),
        ({"NOTIFY_SOCKET": "@n", "WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
        ({"NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
        ({"NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "0"}, None),
        ({"NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "soon"}, None),
        ({"NOTIFY_SOCKET": "/run/n"}, None),
    ],
)
def test_watchdog_timeout_from_environment(environment, expected_timeout):
    assert SystemdNotifier.from_environment(environment).watchdog_timeout == expected_timeout


def test_notifier_ignores_unsupported_socket():
    assert not SystemdNotifier.from_environment({"NOTIFY_SOCKET": "vsock:2:9999"}).enabled


def test_notifier_survives_missing_socket(short_tmp):
    notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": str(short_tmp / "gone")})
    assert notifier.enabled
    assert notifier.notify("WATCHDOG=1") is False
    assert notifier.notify("WATCHDOG=1") is False


@pytest.mark.parametrize(
    ("flags", "environ", "toml", "expected"),
    [
        ({}, {"STATE_DIRECTORY": "/var/lib/logpose:/var/lib/other"}, "", Path("/var/lib/logpose")),
        ({}, {"STATE_DIRECTORY": "/var/lib/logpose", "LOGPOSE_DATA_DIR": "/srv/lp"}, "", Path("/srv/lp")),
        ({"data_dir": "/opt/lp"}, {"STATE_DIRECTORY": "/var/lib/logpose"}, "", Path("/opt/lp")),
        ({}, {"STATE_DIRECTORY": "/var/lib/logpose"}, 'data_dir = "/data/lp"\n', Path("/data/lp")),
        ({}, {}, "", Path("data")),
    ],
)
def test_data_dir_defaults_to_state_directory(tmp_path, flags, environ, toml, expected):
    config = tmp_path / "logpose.toml"
    config.write_text(toml)
    assert load_settings(flags, environ, config).data_dir == expected


class MdweServerProcess(ServerProcess):
    """A server whose process may not map memory both writable and executable."""

    def command(self) -> list[str]:
        return [sys.executable, "-c", MDWE_WRAPPER, *super().command()]


def test_server_runs_without_writable_executable_memory(tmp_path, tcp_listener):
    """The unit sets MemoryDenyWriteExecute=yes; this shows the server still works under it.

    NOTE: systemd 252 enforces MemoryDenyWriteExecute= with a seccomp filter,
    and this test with the kernel's PR_SET_MDWE. Both refuse a mapping that is
    writable and executable, and turning a writable mapping executable.
    """
    probe = subprocess.run(
        [sys.executable, "-c", f"import ctypes, sys; sys.exit(ctypes.CDLL(None).prctl({PR_SET_MDWE}, 1, 0, 0, 0) != 0)"],
        capture_output=True,
        timeout=30,
    )
    if probe.returncode != 0:
        pytest.skip("this kernel has no prctl(PR_SET_MDWE) (Linux 6.3 and later)")
    server = MdweServerProcess(tmp_path / "data")
    try:
        server.start()
        with server.client() as api:
            instance = register_healthy(server, api, "mdwe-svc", tcp_listener)
        answer = dns.query.udp(
            dns.message.make_query(f"mdwe-svc.{ZONE}", "SRV"), "127.0.0.1", port=server.dns_port, timeout=2
        )
    finally:
        exit_code = server.stop()

    assert [record.target.to_text() for record in answer.answer[0]] == [f"{instance['id']}.mdwe-svc.{ZONE}."]
    assert exit_code == 0, server.log()


def installed_unit(directory: Path) -> Path:
    """Copy the unit into ``directory`` with ExecStart pointing at this environment's logpose-server."""
    executable = Path(sys.executable).parent / "logpose-server"
    assert executable.exists(), f"{executable} is missing: install the package (pip install -e .)"
    text = UNIT.read_text()
    exec_start = re.search(r"^ExecStart=(\S+)", text, re.MULTILINE)
    assert exec_start is not None
    copy = directory / "logpose.service"
    copy.write_text(text.replace(exec_start.group(1), str(executable)))
    return copy


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _sep, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_unit_passes_systemd_analyze_verify(tmp_path):
    systemd_analyze = require_program("systemd-analyze", "systemd")
    unit = installed_unit(tmp_path)

    verified = subprocess.run(
        [systemd_analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )

    assert verified.returncode == 0, verified.stderr
    assert "logpose.service" not in verified.stderr, verified.stderr


def test_unit_security_rating_ok_or_better(tmp_path):
    systemd_analyze = require_program("systemd-analyze", "systemd")
    unit = installed_unit(tmp_path)

    # --offline=yes rates the file itself; PID 1 need not be systemd.
    analysed = subprocess.run(
        [systemd_analyze, "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )

    overall = re.search(r"Overall exposure level for logpose\.service: (\d+\.\d) (\w+)", analysed.stdout)
    assert overall is not None, analysed.stdout + analysed.stderr
    assert overall.group(2) in ("PERFECT", "SAFE", "OK"), overall.group(0)


def test_unit_settings():
    settings = unit_settings()

    assert settings["Type"] == ["notify"]
    assert settings["User"] == ["logpose"]
    assert "DynamicUser" not in settings
    assert settings["StateDirectory"] == ["logpose"]
    assert settings["ConfigurationDirectory"] == ["logpose"]
    assert settings["ExecStart"][0].endswith(" --config /etc/logpose/logpose.toml")
    assert settings["EnvironmentFile"] == ["-/etc/logpose/logpose.env"]
    assert settings["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert settings["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    # In a user namespace CAP_NET_BIND_SERVICE would not reach the host's port 53.
    assert "PrivateUsers" not in settings
    assert settings["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]


def test_sysusers_creates_logpose_user(tmp_path):
    sysusers = require_program("systemd-sysusers", "systemd")
    (tmp_path / "etc").mkdir()

    created = subprocess.run(
        [sysusers, f"--root={tmp_path}", str(SYSUSERS)], capture_output=True, text=True, timeout=60
    )

    assert created.returncode == 0, created.stderr
    passwd = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc" / "passwd").read_text().splitlines()}
    assert passwd["logpose"][5] == "/var/lib/logpose"
    assert passwd["logpose"][6] == "/usr/sbin/nologin"
    assert int(passwd["logpose"][2]) < 1000  # a system user
    groups = [line.split(":")[0] for line in (tmp_path / "etc" / "group").read_text().splitlines()]
    assert "logpose" in groups
