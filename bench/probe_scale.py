#!/usr/bin/env python3
"""Benchmark the health prober at scale against an idle prober, in one run.

The script starts a child process with N/2 real TCP listeners on 127.0.0.1,
two real ``logpose-server`` processes on free loopback ports (default
configuration otherwise), and registers the same N instances on both: half
at the listeners, half at closed ports. Server A probes them with TCP checks.
Server B has the same catalog with check ``none`` and the same health, set
by health reports, so its prober has nothing to do. It then measures:

- the registration rate on A, and the time until A has no ``Unknown`` instance;
- the CPU time of each server over a few probe intervals, per interval;
- the age of A's last check results, which shows whether A keeps its interval;
- the DNS query rate of A while it probes and of B, with the same query load
  (``dnsperf`` when installed, else a Python UDP load generator), and the ratio.

Run it with the project's interpreter, from the repository root:

    .venv/bin/python bench/probe_scale.py [--instances N] [--interval S] [--seconds S]
    .venv/bin/python bench/probe_scale.py --smoke

Every process it starts is stopped by its PID at the end and the temporary
directory is removed. It sends traffic to 127.0.0.1 only. The exit status is
0 when every check passed, 1 when one failed (the reason is printed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import multiprocessing
import os
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import httpx

from benchlib import BenchmarkError, free_port, print_rows, run_benchmark

HOST = "127.0.0.1"
ZONE = "logpose.internal"  # the server's default zone
SERVER_DEFAULT_INTERVAL = 10.0  # seconds, the server's default probe_interval
SERVER_DEFAULT_TIMEOUT = 2.0  # seconds, the server's default probe_timeout
STARTUP_TIMEOUT = 30.0  # seconds for a server to respond to /healthz on a loaded machine
STOP_TIMEOUT = 15.0  # seconds for a process to exit after SIGTERM before SIGKILL
FD_MARGIN = 256  # descriptors beyond the listeners: logs, pipes, the interpreter's own
SPLIT_TOLERANCE = 0.01  # share of instances allowed in the wrong health when classified
DNS_QUERY_TIMEOUT = 1.0  # seconds before an unanswered DNS query counts as lost
DNS_IN_FLIGHT = 64  # DNS queries outstanding at once, for both load generators


@dataclass
class Options:
    instances: int
    services: int
    interval: float
    timeout: float | None
    seconds: float
    rounds: int
    repeats: int
    concurrency: int
    dns_tool: str
    smoke: bool


def parse_options(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        description="Measure the LogPose prober with N TCP instances (half listening) against an idle prober.",
    )
    parser.add_argument("--instances", type=int, help="instances to register, an even number (default 10000)")
    parser.add_argument("--services", type=int, help="services to spread them over (default instances / 100)")
    parser.add_argument("--interval", type=float, help="probe interval in seconds (default 10, the server default)")
    parser.add_argument(
        "--timeout", type=float,
        help="probe timeout in seconds (default: the server's 2, or half the interval when that is not less)",
    )
    parser.add_argument("--seconds", type=float, help="seconds of DNS load per run (default 10)")
    parser.add_argument("--rounds", type=int, help="probe intervals over which CPU time is measured (default 3)")
    parser.add_argument("--repeats", type=int, help="DNS runs per server; the medians are reported (default 3)")
    parser.add_argument("--concurrency", type=int, default=32, help="HTTP requests in flight (default 32)")
    parser.add_argument(
        "--dns-tool", choices=("auto", "dnsperf", "python"), default="auto",
        help="DNS load generator: dnsperf, the Python one, or dnsperf when installed (default auto)",
    )
    parser.add_argument(
        "--smoke", action="store_true",
        help="a short run for CI: 200 instances, interval 1 s, 2 s of DNS load, one run per server",
    )
    arguments = parser.parse_args(argv)

    presets = (
        {"instances": 200, "interval": 1.0, "seconds": 2.0, "rounds": 2, "repeats": 1}
        if arguments.smoke
        else {"instances": 10_000, "interval": SERVER_DEFAULT_INTERVAL, "seconds": 10.0, "rounds": 3, "repeats": 3}
    )
    for name, value in presets.items():
        if getattr(arguments, name) is None:
            setattr(arguments, name, value)

    if arguments.instances < 2 or arguments.instances % 2:
        parser.error(f"--instances must be an even number of at least 2, got {arguments.instances}")
    services = arguments.services if arguments.services is not None else max(1, arguments.instances // 100)
    if not 1 <= services <= arguments.instances // 2:
        parser.error(f"--services must be between 1 and instances / 2, got {services}")
    if arguments.interval <= 0 or arguments.seconds <= 0:
        parser.error("--interval and --seconds must be positive")
    timeout = arguments.timeout
    if timeout is None and arguments.interval <= SERVER_DEFAULT_TIMEOUT:
        timeout = arguments.interval / 2  # the server rejects a timeout that is not less than the interval
    if arguments.rounds < 1 or arguments.repeats < 1 or arguments.concurrency < 1:
        parser.error("--rounds, --repeats and --concurrency must be at least 1")
    return Options(
        instances=arguments.instances,
        services=services,
        interval=arguments.interval,
        timeout=timeout,
        seconds=arguments.seconds,
        rounds=arguments.rounds,
        repeats=arguments.repeats,
        concurrency=arguments.concurrency,
        dns_tool=arguments.dns_tool,
        smoke=arguments.smoke,
    )


# ----- open file limit ----------------------------------------------------------

def ensure_file_limit(listeners: int) -> int:
    """Raise the soft open-file limit up to the hard one if needed; return the limit.

    Child processes inherit the raised limit, so this runs before any starts.
    """
    needed = listeners + FD_MARGIN
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise BenchmarkError(
            f"the open file limit is {soft} (hard limit {hard}), but {listeners} listeners need at least "
            f"{needed} descriptors; raise the hard limit (ulimit -Hn {needed}) or pass a smaller --instances"
        )
    return soft


# ----- the listener child ----------------------------------------------------------

class AcceptAndClose(asyncio.Protocol):
    """Accept a connection and close it at once, as a bare TCP service would for a probe."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


def run_listeners(count: int, connection: Connection, parent_pid: int, max_seconds: float) -> None:
    """Serve ``count`` listening sockets until the parent sends "stop" or exits, or ``max_seconds`` pass."""
    asyncio.run(_serve_listeners(count, connection, parent_pid, max_seconds))


async def _serve_listeners(count: int, connection: Connection, parent_pid: int, max_seconds: float) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    try:
        for _ in range(count):
            listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listening.bind((HOST, 0))
            listening.listen(128)
            listening.setblocking(False)
            servers.append(await loop.create_server(AcceptAndClose, sock=listening))
    except OSError as exc:
        connection.send(("error", f"opening listener {len(servers) + 1} of {count} failed: {exc}"))
        return
    connection.send(("ports", [server.sockets[0].getsockname()[1] for server in servers]))

    deadline = time.monotonic() + max_seconds
    while time.monotonic() < deadline and os.getppid() == parent_pid and not connection.poll():
        await asyncio.sleep(0.5)
    for server in servers:
        server.close()


class ListenerProcess:
    """The child process with the listening sockets."""

    def __init__(self, count: int, max_seconds: float) -> None:
        context = multiprocessing.get_context("spawn")
        self._connection, child_end = context.Pipe()
        self.process = context.Process(
            target=run_listeners, args=(count, child_end, os.getpid(), max_seconds), name="bench-listeners"
        )
        self.process.start()
        child_end.close()
        if not self._connection.poll(max(30.0, count / 200)):
            raise BenchmarkError(f"the listener process did not report its {count} ports in time")
        kind, value = self._connection.recv()
        if kind == "error":
            raise BenchmarkError(f"the listener process failed: {value}")
        self.ports: list[int] = value

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._connection.send("stop")
        self.process.join(STOP_TIMEOUT)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(STOP_TIMEOUT)
        self._connection.close()


def ephemeral_port_floor() -> int:
    """Return the first port of the kernel's ephemeral range (32768 when it cannot be read)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def pick_closed_ports(count: int) -> list[int]:
    """Return ``count`` loopback TCP ports that were free: each is bound, then released.

    The ports come from below the ephemeral range. A connect to a free port in
    that range can pick the same port as its own source port and connect to
    itself (TCP simultaneous open), which would count a closed port as Healthy.
    """
    ports: list[int] = []
    for port in range(ephemeral_port_floor() - 1, 1023, -1):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((HOST, port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise BenchmarkError(f"found only {len(ports)} free ports below the ephemeral range, {count} needed")


# ----- servers ------------------------------------------------------------------------

def server_program() -> list[str]:
    """Return the command that runs this environment's ``logpose-server``."""
    script = Path(sys.executable).parent / "logpose-server"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "logpose.server.main"]


class Server:
    """A ``logpose-server`` child process with its own data directory and free ports."""

    def __init__(self, name: str, work_dir: Path, options: Options) -> None:
        self.name = name
        self.data_dir = work_dir / f"{name}-data"
        self.log_path = work_dir / f"{name}-server.log"
        self.http_port = free_port()
        self.dns_port = free_port()
        self.url = f"http://{HOST}:{self.http_port}"
        self._options = options
        self.extra_args: list[str] = []  # more logpose-server flags
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [
            *server_program(),
            "--data-dir", str(self.data_dir),
            "--http-listen", f"{HOST}:{self.http_port}",
            "--dns-listen", f"{HOST}:{self.dns_port}",
            "--probe-interval", f"{self._options.interval:g}",
        ]
        if self._options.timeout is not None:
            command += ["--probe-timeout", f"{self._options.timeout:g}"]
        command += self.extra_args
        # The server reads LOGPOSE_* variables; drop them so it runs with its defaults.
        environment = {key: value for key, value in os.environ.items() if not key.startswith("LOGPOSE_")}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=log, env=environment)

    def wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchmarkError(f"server {self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise BenchmarkError(f"server {self.name} did not respond to /healthz within {STARTUP_TIMEOUT:g} s")

    def token(self) -> str:
        secret = (self.data_dir / "admin.secret").read_text().strip()
        response = httpx.post(
            self.url + "/api/auth/token", json={"common_name": "admin", "secret": secret}, timeout=10
        )
        response.raise_for_status()
        return response.json()["access_token"]

    def check_alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise BenchmarkError(f"server {self.name} exited with {self.process.returncode}:\n{self.log_tail()}")

    def signal(self, number: int) -> None:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(number)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGCONT)  # a paused process cannot handle SIGTERM
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid


def cpu_seconds(pid: int) -> float:
    """Return the user plus system CPU time of process ``pid`` in seconds, from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    # Fields after the command name, which is in parentheses and may contain spaces.
    fields = text[text.rindex(")") + 2:].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def resident_megabytes(pid: int) -> float:
    """Return the resident set size of process ``pid`` in MiB, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchmarkError(f"/proc/{pid}/status has no VmRSS line")


# ----- registration ----------------------------------------------------------------------

@dataclass
class Target:
    """One instance to register: its service, port and whether something listens there."""

    service: str
    port: int
    listening: bool


def plan_targets(listen_ports: list[int], closed_ports: list[int], services: int) -> list[Target]:
    """Interleave listening and closed ports, and give each service as many of each."""
    targets = []
    for position, (open_port, closed) in enumerate(zip(listen_ports, closed_ports)):
        service = f"bench-{position % services:04d}"
        targets.append(Target(service, open_port, True))
        targets.append(Target(service, closed, False))
    return targets


async def send_all(client: httpx.AsyncClient, requests: list[tuple[str, dict]], concurrency: int) -> list[dict]:
    """POST every (path, body) with at most ``concurrency`` in flight; return the JSON responses in order."""
    answers: list[dict] = [{}] * len(requests)
    positions = iter(range(len(requests)))

    async def worker() -> None:
        for position in positions:
            path, body = requests[position]
            response = await client.post(path, json=body)
            if response.status_code not in (200, 201):
                raise BenchmarkError(f"POST {path} returned {response.status_code}: {response.text[:300]}")
            answers[position] = response.json()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return answers


def client_for(server: Server, concurrency: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=server.url,
        headers={"Authorization": f"Bearer {server.token()}"},
        timeout=60,
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
    )


async def register_probed(server: Server, targets: list[Target], concurrency: int) -> list[dict]:
    requests = [
        (f"/api/services/{target.service}/instances", {"address": f"{HOST}:{target.port}", "protocol": "Tcp"})
        for target in targets
    ]
    async with client_for(server, concurrency) as client:
        return await send_all(client, requests, concurrency)


async def register_idle(server: Server, targets: list[Target], concurrency: int) -> None:
    """Register with check ``none``, then report each instance's health as server A found it."""
    requests = [
        (
            f"/api/services/{target.service}/instances",
            {"address": f"{HOST}:{target.port}", "protocol": "Tcp", "check": {"type": "none"}},
        )
        for target in targets
    ]
    async with client_for(server, concurrency) as client:
        instances = await send_all(client, requests, concurrency)
        reports = [
            (f"/api/instances/{instance['id']}/health", {"status": "Healthy" if target.listening else "Unhealthy"})
            for instance, target in zip(instances, targets)
        ]
        await send_all(client, reports, concurrency)


def server_status(server: Server, token: str) -> dict:
    response = httpx.get(server.url + "/api/status", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    response.raise_for_status()
    return response.json()


def status_counts(server: Server, token: str) -> dict:
    return server_status(server, token)["instances"]


def wait_classified(server: Server, expected: int, timeout: float) -> tuple[float, dict]:
    """Poll /api/status until no instance is Unknown; return the time it took and the counts."""
    token = server.token()
    started = time.monotonic()
    deadline = started + timeout
    while True:
        counts = status_counts(server, token)
        if counts["total"] == expected and counts["Unknown"] == 0:
            return time.monotonic() - started, counts
        if time.monotonic() > deadline:
            raise BenchmarkError(f"instances still Unknown after {timeout:g} s: {counts}")
        server.check_alive()
        time.sleep(0.1)


def check_split(counts: dict, expected_each: int) -> None:
    """Raise unless about half the instances are Healthy and half Unhealthy."""
    allowed = max(1, int(2 * expected_each * SPLIT_TOLERANCE))
    if abs(counts["Healthy"] - expected_each) > allowed or abs(counts["Unhealthy"] - expected_each) > allowed:
        raise BenchmarkError(
            f"wrong health split: {counts['Healthy']} Healthy and {counts['Unhealthy']} Unhealthy, "
            f"expected {expected_each} of each (within {allowed})"
        )


def last_check_ages(server: Server) -> list[float]:
    """Return, per probed instance, the seconds since its last check result (one-second resolution)."""
    response = httpx.get(
        server.url + "/api/instances", headers={"Authorization": f"Bearer {server.token()}"}, timeout=60
    )
    response.raise_for_status()
    now = datetime.datetime.now(datetime.timezone.utc)
    ages = []
    for instance in response.json():
        checked = (instance.get("check_status") or {}).get("last_checked_at")
        if checked is None:
            continue
        at = datetime.datetime.strptime(checked, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
        ages.append((now - at).total_seconds())
    return ages


# ----- DNS load ------------------------------------------------------------------------------

@dataclass
class DnsRun:
    sent: int
    completed: int
    lost: int
    queries_per_second: float
    response_codes: dict[str, int] = field(default_factory=dict)


def dns_queries(services: list[str]) -> list[tuple[str, str]]:
    """Return an A and an SRV query for every service name."""
    queries = []
    for service in services:
        queries.append((f"{service}.{ZONE}", "A"))
        queries.append((f"{service}.{ZONE}", "SRV"))
    return queries


def run_dnsperf(port: int, queries: list[tuple[str, str]], seconds: float, work_dir: Path) -> DnsRun:
    data_file = work_dir / "dnsperf-queries.txt"
    data_file.write_text("".join(f"{name} {kind}\n" for name, kind in queries))
    command = [
        "dnsperf", "-s", HOST, "-p", str(port), "-d", str(data_file), "-l", f"{seconds:g}",
        "-q", str(DNS_IN_FLIGHT), "-t", f"{DNS_QUERY_TIMEOUT:g}", "-e",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30)
    if result.returncode != 0:
        raise BenchmarkError(f"dnsperf exited with {result.returncode}: {result.stderr.strip() or result.stdout}")
    return parse_dnsperf(result.stdout)


def parse_dnsperf(output: str) -> DnsRun:
    def number(label: str) -> float:
        match = re.search(rf"^\s*{label}:\s+([\d.]+)", output, re.MULTILINE)
        if match is None:
            raise BenchmarkError(f"dnsperf output has no '{label}' line:\n{output}")
        return float(match.group(1))

    codes_line = re.search(r"^\s*Response codes:\s+(.*)$", output, re.MULTILINE)
    codes = {code: int(count) for code, count in re.findall(r"([A-Z]+) (\d+)", codes_line.group(1))} if codes_line else {}
    return DnsRun(
        sent=int(number("Queries sent")),
        completed=int(number("Queries completed")),
        lost=int(number("Queries lost")),
        queries_per_second=number("Queries per second"),
        response_codes=codes,
    )


RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


def udp_load(port: int, queries: list[tuple[str, str]], seconds: float, connection: Connection) -> None:
    """Send queries over UDP for ``seconds``, DNS_IN_FLIGHT outstanding, and send back a DnsRun."""
    from dnslib import EDNS0, DNSRecord

    wires = []
    for name, kind in queries:
        record = DNSRecord.question(name, kind)
        record.add_ar(EDNS0(udp_len=1232))
        wires.append(bytearray(record.pack()))

    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.connect((HOST, port))
    sender.setblocking(False)
    outstanding: dict[int, float] = {}  # query id -> send time
    codes: dict[str, int] = {}
    sent = completed = lost = 0
    next_id = 0
    started = time.monotonic()
    stop_sending = started + seconds
    give_up = stop_sending + DNS_QUERY_TIMEOUT

    while True:
        now = time.monotonic()
        if now >= give_up or (now >= stop_sending and not outstanding):
            break
        for query_id, sent_at in list(outstanding.items()):
            if now - sent_at > DNS_QUERY_TIMEOUT:
                del outstanding[query_id]
                lost += 1
        while now < stop_sending and len(outstanding) < DNS_IN_FLIGHT:
            next_id = (next_id + 1) % 65536
            if next_id in outstanding:
                break
            wire = wires[sent % len(wires)]
            wire[0:2] = next_id.to_bytes(2, "big")
            try:
                sender.send(wire)
            except BlockingIOError:
                break
            outstanding[next_id] = now
            sent += 1
        readable, _, _ = select.select([sender], [], [], 0.05)
        while readable:
            try:
                answer = sender.recv(65535)
            except (BlockingIOError, ConnectionRefusedError):
                break
            query_id = int.from_bytes(answer[0:2], "big")
            if len(answer) >= 4 and outstanding.pop(query_id, None) is not None:
                completed += 1
                code = RCODE_NAMES.get(answer[3] & 0x0F, str(answer[3] & 0x0F))
                codes[code] = codes.get(code, 0) + 1
    lost += len(outstanding)
    sender.close()
    connection.send(DnsRun(sent, completed, lost, completed / seconds, codes))


def run_python_load(port: int, queries: list[tuple[str, str]], seconds: float) -> DnsRun:
    """Run udp_load in a separate process, so it does not share this interpreter's CPU time."""
    context = multiprocessing.get_context("spawn")
    receiver, child_end = context.Pipe(duplex=False)
    process = context.Process(target=udp_load, args=(port, queries, seconds, child_end), name="bench-dns-load")
    process.start()
    child_end.close()
    try:
        if not receiver.poll(seconds + 30):
            raise BenchmarkError("the Python DNS load generator sent no result in time")
        return receiver.recv()
    finally:
        process.join(STOP_TIMEOUT)
        if process.is_alive():
            process.terminate()
            process.join(STOP_TIMEOUT)
        receiver.close()


# ----- the run -----------------------------------------------------------------------------------

@dataclass
class Results:
    registration_seconds: float = 0.0
    classified_after_last: float = 0.0
    counts: dict = field(default_factory=dict)
    cpu_probing: float = 0.0
    cpu_idle: float = 0.0
    window_seconds: float = 0.0
    ages: list[float] = field(default_factory=list)
    rss_probing: float = 0.0
    rss_idle: float = 0.0
    dns_tool: str = ""
    dns_probing: list[DnsRun] = field(default_factory=list)
    dns_idle: list[DnsRun] = field(default_factory=list)
    status_after_dns: dict = field(default_factory=dict)


def choose_dns_tool(requested: str) -> str:
    if requested == "auto":
        return "dnsperf" if shutil.which("dnsperf") else "python"
    if requested == "dnsperf" and not shutil.which("dnsperf"):
        raise BenchmarkError("dnsperf is not installed (Debian package dnsperf); use --dns-tool python")
    return requested


def measure(options: Options, work_dir: Path, cleanup: contextlib.ExitStack) -> Results:
    results = Results(dns_tool=choose_dns_tool(options.dns_tool))
    half = options.instances // 2
    # The listeners outlive the run at most by this long if the cleanup never happens.
    listeners = ListenerProcess(half, max_seconds=3600 + 20 * options.interval)
    cleanup.callback(listeners.stop)
    closed_ports = pick_closed_ports(half)
    targets = plan_targets(listeners.ports, closed_ports, options.services)
    log(f"{half} listeners and {half} closed ports ready")

    probing = Server("probing", work_dir, options)
    idle = Server("idle", work_dir, options)
    for server in (probing, idle):
        server.start()
        cleanup.callback(server.stop)
    for server in (probing, idle):
        server.wait_ready()
    log(f"servers ready: probing pid {probing.pid}, idle pid {idle.pid}")

    started = time.monotonic()
    asyncio.run(register_probed(probing, targets, options.concurrency))
    results.registration_seconds = time.monotonic() - started
    log(f"registered {options.instances} instances in {results.registration_seconds:.1f} s")
    timeout = 120 + 3 * options.interval
    results.classified_after_last, results.counts = wait_classified(probing, options.instances, timeout)
    check_split(results.counts, half)
    log(f"classified {results.classified_after_last:.2f} s after the last registration: {results.counts}")

    asyncio.run(register_idle(idle, targets, options.concurrency))
    idle_counts = status_counts(idle, idle.token())
    check_split(idle_counts, half)
    log("idle server holds the same catalog and health")

    measure_cpu(options, probing, idle, results)
    results.ages = last_check_ages(probing)
    measure_dns(options, probing, idle, [f"bench-{index:04d}" for index in range(options.services)], work_dir, results)
    results.status_after_dns = server_status(probing, probing.token())
    results.rss_probing = resident_megabytes(probing.pid)
    results.rss_idle = resident_megabytes(idle.pid)
    for server in (probing, idle):
        server.check_alive()
    return results


def measure_cpu(options: Options, probing: Server, idle: Server, results: Results) -> None:
    """Measure both servers' CPU time over ``rounds`` probe intervals, with no requests sent."""
    log(f"measuring CPU time over {options.rounds} interval(s) of {options.interval:g} s")
    before = (cpu_seconds(probing.pid), cpu_seconds(idle.pid))
    started = time.monotonic()
    time.sleep(options.rounds * options.interval)
    results.window_seconds = time.monotonic() - started
    results.cpu_probing = cpu_seconds(probing.pid) - before[0]
    results.cpu_idle = cpu_seconds(idle.pid) - before[1]


def measure_dns(
    options: Options, probing: Server, idle: Server, services: list[str], work_dir: Path, results: Results
) -> None:
    """Alternate DNS runs against both servers, pausing the other one during each run.

    SIGSTOP keeps the other server off the CPU, so the probing server's prober
    does not slow the idle server's run. A resumed probing server fires the
    probes that fell due while paused, so the next run waits one interval.
    """
    queries = dns_queries(services)
    for repeat in range(options.repeats):
        for server, other, runs in ((probing, idle, results.dns_probing), (idle, probing, results.dns_idle)):
            log(f"DNS run {repeat + 1}/{options.repeats} against the {server.name} server ({results.dns_tool})")
            other.signal(signal.SIGSTOP)
            try:
                if results.dns_tool == "dnsperf":
                    runs.append(run_dnsperf(server.dns_port, queries, options.seconds, work_dir))
                else:
                    runs.append(run_python_load(server.dns_port, queries, options.seconds))
            finally:
                other.signal(signal.SIGCONT)
            server.check_alive()
        if repeat + 1 < options.repeats:
            time.sleep(options.interval)


# ----- report --------------------------------------------------------------------------------------

def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def format_codes(runs: list[DnsRun]) -> str:
    totals: dict[str, int] = {}
    for run in runs:
        for code, count in run.response_codes.items():
            totals[code] = totals.get(code, 0) + count
    answered = sum(totals.values()) or 1
    return ", ".join(f"{code} {100 * count / answered:.0f}%" for code, count in sorted(totals.items()))


def print_table(options: Options, results: Results) -> None:
    half = options.instances // 2
    rounds = results.window_seconds / options.interval
    cpu_round_probing = results.cpu_probing / rounds
    cpu_round_idle = results.cpu_idle / rounds
    ages = results.ages or [float("nan")]
    qps_probing = statistics.median(run.queries_per_second for run in results.dns_probing)
    qps_idle = statistics.median(run.queries_per_second for run in results.dns_idle)
    lost_probing = statistics.median(run.lost for run in results.dns_probing)
    lost_idle = statistics.median(run.lost for run in results.dns_idle)
    timeout = f"{options.timeout:g} s" if options.timeout is not None else f"{SERVER_DEFAULT_TIMEOUT:g} s (default)"

    rows = [
        ("instances (listening / closed)", f"{options.instances} ({half} / {half})", ""),
        ("services", f"{options.services}", ""),
        ("probe interval / timeout", f"{options.interval:g} s / {timeout}", ""),
        ("registration rate, probing server", f"{options.instances / results.registration_seconds:.0f} /s",
         f"{results.registration_seconds:.1f} s, {options.concurrency} requests in flight"),
        ("all classified, after last registration", f"{results.classified_after_last:.2f} s",
         f"{results.counts['Healthy']} Healthy, {results.counts['Unhealthy']} Unhealthy"),
        ("all classified, after first registration",
         f"{results.registration_seconds + results.classified_after_last:.1f} s", ""),
        ("CPU per interval, probing server", f"{cpu_round_probing:.2f} s",
         f"{100 * results.cpu_probing / results.window_seconds:.0f}% of one core"),
        ("CPU per interval, idle server", f"{cpu_round_idle:.2f} s",
         f"{100 * results.cpu_idle / results.window_seconds:.0f}% of one core"),
        ("CPU per interval, prober (difference)", f"{cpu_round_probing - cpu_round_idle:.2f} s",
         f"{1000 * (cpu_round_probing - cpu_round_idle) / options.instances:.3f} ms per probe"),
        ("age of last check, median / p99 / max", f"{statistics.median(ages):.0f} / {percentile(ages, 0.99):.0f} / "
         f"{max(ages):.0f} s", f"{len(results.ages)} probed instances, 1 s resolution"),
        ("RSS, probing / idle server", f"{results.rss_probing:.0f} / {results.rss_idle:.0f} MiB", ""),
    ]
    after = results.status_after_dns
    guard = after["mass_failure_guard"]
    health_after = (
        "health after the DNS runs, probing server",
        f"{after['instances']['Healthy']} / {after['instances']['Unhealthy']} / {after['instances']['Unknown']}",
        f"Healthy / Unhealthy / Unknown; mass-failure guard engaged {guard['engagements']} time(s)",
    )
    dns_rows = [
        ("DNS queries/s, probing server", f"{qps_probing:.0f}", format_codes(results.dns_probing)),
        ("DNS queries/s, idle server", f"{qps_idle:.0f}", format_codes(results.dns_idle)),
        ("DNS rate ratio, probing / idle", f"{qps_probing / qps_idle:.2f}" if qps_idle else "n/a", ""),
        ("DNS lost queries, probing / idle", f"{lost_probing:.0f} / {lost_idle:.0f}",
         f"unanswered within {DNS_QUERY_TIMEOUT:g} s"),
        health_after,
    ]
    dns_note = f"{results.dns_tool}, {options.seconds:g} s per run, median of {options.repeats} run(s) per server"

    print_rows([("", rows), (f"DNS load: {dns_note}", dns_rows)])
    print()
    for label, runs in (("probing", results.dns_probing), ("idle", results.dns_idle)):
        per_run = ", ".join(f"{run.queries_per_second:.0f}" for run in runs)
        print(f"DNS queries/s per run, {label} server: {per_run}")


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)

    def measure_all(work_dir: Path, cleanup: contextlib.ExitStack) -> Results:
        limit = ensure_file_limit(options.instances // 2)
        log(f"open file limit {limit}")
        return measure(options, work_dir, cleanup)

    return run_benchmark("probe_scale", "prober benchmark", measure_all, lambda results: print_table(options, results))


if __name__ == "__main__":
    sys.exit(main())
