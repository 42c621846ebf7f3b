#!/usr/bin/env python3
"""Benchmark LogPose's DNS against NSD and dnslib's DNSServer, in one run.

The script starts a real ``logpose-server`` (default configuration, free
loopback ports, a temporary data directory) and registers S services of I
instances each over HTTP, with check ``none`` and a health report Healthy.
From that catalog it writes a zone for NSD (a C authoritative server, run in
the foreground on 127.0.0.1) and starts a dnslib ``DNSServer`` whose resolver
builds the same records per query. It then measures:

- queries/s of each server under dnsperf, a 50/50 mix of A and SRV queries for
  every service with EDNS0, as many outstanding as ``--in-flight``, and the
  ratios LogPose / NSD and LogPose / dnslib;
- the median latency at a fixed rate (``--rate``, default 1,000 queries/s);
- freshness: from the HTTP response of a health report (Healthy) or of a
  deregistration to the changed DNS answer of the same server, polled in a
  tight UDP loop;
- scale: a catalog of ``--scale-instances`` instances written straight into a
  new data directory with the product's own store, then a second server
  started on it: start-up time until /healthz responds, resident memory, and
  queries/s against the first server's figure.

Run it with the project's interpreter, from the repository root:

    .venv/bin/python bench/dns_bench.py
    .venv/bin/python bench/dns_bench.py --smoke

Every process it starts is stopped by its PID at the end and the temporary
directory is removed. It sends traffic to 127.0.0.1 only. The exit status is
0 when every step ran, 1 when one failed (the reason is printed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import httpx

from benchlib import BenchmarkError, free_port, print_rows, run_benchmark, stop_process
from probe_scale import (
    SERVER_DEFAULT_INTERVAL,
    DnsRun,
    Server,
    log,
    parse_dnsperf,
    percentile,
    resident_megabytes,
    send_all,
)

HOST = "127.0.0.1"
ZONE = "logpose.internal"
TTL = 5  # seconds, the server's default dns_ttl
STARTUP_TIMEOUT = 120.0  # seconds for a server to respond to /healthz; the scale catalog takes longest
STOP_TIMEOUT = 15.0
DNS_QUERY_TIMEOUT = 1.0  # seconds before dnsperf counts a query as lost
FRESHNESS_TIMEOUT = 5.0  # seconds to wait for one change to show in DNS
SEED_BATCH = 5000  # instances per store transaction when writing the scale catalog
SCALE_SAMPLE = 100  # services of the scale catalog in its cache-resident query mix
# Passes over the query file before measuring: the server's cache keeps up to 8 rotations
# of each answer, built at the first queries of a name.
# Each DNS process has its own cache, and the kernel picks the process by source port,
# so the warm-up spreads its passes over several client sockets.
WARM_UP_PASSES = 40
WARM_UP_CLIENTS = 16


@dataclass
class Options:
    services: int
    per_service: int
    seconds: float
    repeats: int
    in_flight: int
    clients: int
    dns_workers: int
    rate: int
    freshness_samples: int
    scale_instances: int
    scale_services: int
    smoke: bool


def parse_options(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description="Measure LogPose's DNS against NSD and dnslib's DNSServer.")
    parser.add_argument("--services", type=int, help="services in the catalog (default 100)")
    parser.add_argument("--per-service", type=int, help="healthy instances per service (default 3)")
    parser.add_argument("--seconds", type=float, help="seconds per dnsperf run (default 10)")
    parser.add_argument("--repeats", type=int, help="dnsperf runs per server; medians are reported (default 3)")
    parser.add_argument("--in-flight", type=int, default=100, help="queries outstanding in the rate runs (default 100)")
    parser.add_argument("--rate", type=int, default=1000, help="queries/s of the latency runs (default 1000)")
    parser.add_argument(
        "--clients", type=int, default=4,
        help="dnsperf client sockets (-c), so source ports; SO_REUSEPORT spreads them over processes (default 4)",
    )
    parser.add_argument(
        "--dns-workers", type=int, default=2,
        help="also measure a LogPose with this many DNS processes (--dns-workers); 1 skips it (default 2)",
    )
    parser.add_argument("--freshness-samples", type=int, help="changes timed, half health reports (default 200)")
    parser.add_argument("--scale-instances", type=int, help="instances of the scale catalog, 0 skips it (default 100000)")
    parser.add_argument("--scale-services", type=int, help="services of the scale catalog (default instances / 10)")
    parser.add_argument(
        "--smoke", action="store_true",
        help="a short run for CI: 10 services, 1 s runs, 10 freshness samples, a scale catalog of 2,000",
    )
    arguments = parser.parse_args(argv)
    presets = (
        {"services": 10, "per_service": 3, "seconds": 1.0, "repeats": 1, "freshness_samples": 10,
         "scale_instances": 2000}
        if arguments.smoke
        else {"services": 100, "per_service": 3, "seconds": 10.0, "repeats": 3, "freshness_samples": 200,
              "scale_instances": 100_000}
    )
    for name, value in presets.items():
        if getattr(arguments, name) is None:
            setattr(arguments, name, value)
    scale_services = arguments.scale_services or max(1, arguments.scale_instances // 10)
    if arguments.services < 1 or arguments.per_service < 1 or arguments.repeats < 1:
        parser.error("--services, --per-service and --repeats must be at least 1")
    if arguments.seconds <= 0 or arguments.rate < 1 or arguments.in_flight < 1 or arguments.clients < 1:
        parser.error("--seconds, --rate, --in-flight and --clients must be positive")
    if not 1 <= arguments.dns_workers <= 64:
        parser.error("--dns-workers must be from 1 to 64")
    if arguments.freshness_samples < 2:
        parser.error("--freshness-samples must be at least 2")
    if arguments.scale_instances and not 1 <= scale_services <= arguments.scale_instances:
        parser.error("--scale-services must be between 1 and --scale-instances")
    return Options(
        services=arguments.services,
        per_service=arguments.per_service,
        seconds=arguments.seconds,
        repeats=arguments.repeats,
        in_flight=arguments.in_flight,
        clients=arguments.clients,
        dns_workers=arguments.dns_workers,
        rate=arguments.rate,
        freshness_samples=arguments.freshness_samples,
        scale_instances=arguments.scale_instances,
        scale_services=scale_services,
        smoke=arguments.smoke,
    )


def require_programs() -> None:
    missing = [program for program in ("dnsperf", "nsd") if shutil.which(program) is None]
    if missing:
        raise BenchmarkError(f"{' and '.join(missing)} not installed; install the Debian packages dnsperf and nsd")


# ----- LogPose ------------------------------------------------------------------------


class LogPose(Server):
    """A ``logpose-server`` child process in its default configuration, on free loopback ports.

    Its probe interval and timeout are passed as the server's defaults, 10 and 2 s.
    """

    def __init__(self, name: str, work_dir: Path, dns_workers: int = 1) -> None:
        super().__init__(name, work_dir, _DefaultProbing())
        self.started_at = 0.0
        if dns_workers > 1:
            self.extra_args = ["--dns-workers", str(dns_workers)]

    def start(self) -> None:
        self.started_at = time.monotonic()
        super().start()

    def wait_ready(self) -> float:
        """Poll /healthz every 10 ms until it responds 200; return the seconds since ``start``."""
        assert self.process is not None
        deadline = self.started_at + STARTUP_TIMEOUT
        with httpx.Client(timeout=1) as client:
            while time.monotonic() < deadline:
                self.check_alive()
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(self.url + "/healthz").status_code == 200:
                        return time.monotonic() - self.started_at
                time.sleep(0.01)
        raise BenchmarkError(f"LogPose {self.name} did not respond to /healthz within {STARTUP_TIMEOUT:g} s")


@dataclass
class _DefaultProbing:
    """The probe settings ``probe_scale.Server`` passes on the command line: the server's defaults."""

    interval: float = SERVER_DEFAULT_INTERVAL
    timeout: float | None = None


def service_code(number: int) -> str:
    return f"svc-{number:05d}"


def instance_address(service: int, position: int) -> str:
    # Check "none": nothing ever connects to these addresses.
    return f"127.{1 + service // 250 % 250}.{service % 250}.{position + 1}"


async def register_catalog(server: LogPose, services: int, per_service: int) -> list[dict]:
    """Register every instance with check ``none`` and report it Healthy; return the instances."""
    requests = [
        (
            f"/api/services/{service_code(service)}/instances",
            {"address": f"{instance_address(service, position)}:{8000 + position}", "protocol": "Http",
             "check": {"type": "none"}},
        )
        for service in range(services)
        for position in range(per_service)
    ]
    async with httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {server.token()}"}, timeout=60
    ) as client:
        instances = await send_all(client, requests, 32)
        reports = [(f"/api/instances/{instance['id']}/health", {"status": "Healthy"}) for instance in instances]
        await send_all(client, reports, 32)
    return instances


# ----- the records, for the baselines -----------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One record of the zone, relative to the apex: (owner, type, data as zone-file text)."""

    owner: str
    rtype: str
    data: str


def catalog_records(instances: list[dict]) -> list[Record]:
    """Return the A and SRV records LogPose serves for these healthy instances."""
    records = []
    for instance in instances:
        host, port = instance["address"].rsplit(":", 1)
        target = f"{instance['id']}.{instance['service']}"
        records.append(Record(instance["service"], "A", host))
        records.append(Record(instance["service"], "SRV", f"1 {instance.get('weight', 1)} {port} {target}"))
        records.append(Record(target, "A", host))
    return records


def zone_text(records: list[Record]) -> str:
    lines = [
        f"$ORIGIN {ZONE}.",
        f"$TTL {TTL}",
        f"@ IN SOA ns hostmaster 1 3600 600 86400 {TTL}",
        "@ IN NS ns",
        f"ns IN A {HOST}",
    ]
    lines += [f"{record.owner} IN {record.rtype} {record.data}" for record in records]
    return "\n".join(lines) + "\n"


class Nsd:
    """NSD in the foreground (``-d``) on 127.0.0.1, one server process, serving the zone."""

    def __init__(self, work_dir: Path, records: list[Record]) -> None:
        self.folder = work_dir / "nsd"
        self.folder.mkdir()
        self.port = free_port()
        (self.folder / f"{ZONE}.zone").write_text(zone_text(records))
        config = self.folder / "nsd.conf"
        config.write_text(
            "server:\n"
            f"    ip-address: {HOST}@{self.port}\n"
            f"    port: {self.port}\n"
            "    do-ip6: no\n"
            "    server-count: 1\n"
            f'    zonesdir: "{self.folder}"\n'
            f'    pidfile: "{self.folder}/nsd.pid"\n'
            f'    xfrdfile: "{self.folder}/xfrd.state"\n'
            f'    zonelistfile: "{self.folder}/zone.list"\n'
            f'    logfile: "{self.folder}/nsd.log"\n'
            '    database: ""\n'
            '    username: ""\n'
            '    chroot: ""\n'
            "    hide-version: yes\n"
            # Response rate limiting would drop most of the load from one source.
            "    rrl-ratelimit: 0\n"
            "    rrl-whitelist-ratelimit: 0\n"
            "remote-control:\n"
            "    control-enable: no\n"
            "zone:\n"
            f"    name: {ZONE}\n"
            f'    zonefile: "{ZONE}.zone"\n'
        )
        self.log_path = self.folder / "nsd-output.log"
        with self.log_path.open("ab") as output:
            self.process = subprocess.Popen(["nsd", "-d", "-c", str(config)], stdout=output, stderr=output)

    def stop(self) -> None:
        stop_process(self.process, STOP_TIMEOUT)

    def log_tail(self) -> str:
        texts = [path.read_text(errors="replace") for path in (self.log_path, self.folder / "nsd.log") if path.exists()]
        return "\n".join(texts)[-2000:]


def serve_dnslib(port: int, records: list[Record], connection: Connection, parent_pid: int) -> None:
    """Answer the zone's A and SRV records with dnslib's DNSServer, building every answer per query."""
    from dnslib import A, EDNS0, QTYPE, RCODE, RR, SRV, DNSLabel
    from dnslib.server import BaseResolver, DNSServer

    by_name: dict[str, list[Record]] = {}
    for record in records:
        by_name.setdefault(f"{record.owner}.{ZONE}.", []).append(record)

    class CatalogResolver(BaseResolver):
        def resolve(self, request, handler):
            reply = request.reply()
            reply.header.aa = 1
            question = request.q
            name = str(question.qname).lower()
            found = by_name.get(name)
            if found is None:
                reply.header.rcode = RCODE.NXDOMAIN
            for record in found or ():
                if record.rtype == "A" and question.qtype == QTYPE.A:
                    reply.add_answer(RR(question.qname, QTYPE.A, ttl=TTL, rdata=A(record.data)))
                elif record.rtype == "SRV" and question.qtype == QTYPE.SRV:
                    priority, weight, port_text, target = record.data.split()
                    target_name = DNSLabel(f"{target}.{ZONE}")
                    srv = SRV(priority=int(priority), weight=int(weight), port=int(port_text), target=target_name)
                    reply.add_answer(RR(question.qname, QTYPE.SRV, ttl=TTL, rdata=srv))
                    for glue in by_name.get(f"{target}.{ZONE}.", ()):
                        reply.add_ar(RR(target_name, QTYPE.A, ttl=TTL, rdata=A(glue.data)))
            if any(record.rtype == QTYPE.OPT for record in request.ar):
                reply.add_ar(EDNS0(udp_len=1232))
            return reply

    class QuietLogger:
        def __getattr__(self, _name):
            return lambda *args: None

    server = DNSServer(CatalogResolver(), port=port, address=HOST, logger=QuietLogger())
    server.start_thread()
    connection.send("ready")
    while os.getppid() == parent_pid and not connection.poll(0.5):
        pass
    server.stop()


class DnslibServer:
    def __init__(self, records: list[Record]) -> None:
        self.port = free_port()
        context = multiprocessing.get_context("spawn")
        self._connection, child_end = context.Pipe()
        self.process = context.Process(
            target=serve_dnslib, args=(self.port, records, child_end, os.getpid()), name="bench-dnslib"
        )
        self.process.start()
        child_end.close()
        if not self._connection.poll(30):
            raise BenchmarkError("the dnslib DNSServer did not start within 30 s")
        self._connection.recv()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._connection.send("stop")
        self.process.join(STOP_TIMEOUT)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(STOP_TIMEOUT)
        self._connection.close()

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid


# ----- DNS load ----------------------------------------------------------------------------


@dataclass
class LoadRun:
    run: DnsRun
    average_latency: float  # seconds, from dnsperf's summary
    median_latency: float | None = None  # seconds, from per-query lines when asked for


def write_queries(path: Path, services: list[str]) -> Path:
    path.write_text("".join(f"{code}.{ZONE} {kind}\n" for code in services for kind in ("A", "SRV")))
    return path


def warm_up(port: int, query_file: Path) -> None:
    """Send every query of the file a few times, so each rotation of every answer was built once."""
    command = ["dnsperf", "-s", HOST, "-p", str(port), "-d", str(query_file), "-n", str(WARM_UP_PASSES),
               "-c", str(WARM_UP_CLIENTS), "-q", "20", "-t", f"{DNS_QUERY_TIMEOUT:g}", "-e"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise BenchmarkError(f"dnsperf exited with {result.returncode}: {result.stderr.strip() or result.stdout[-500:]}")


def dnsperf(
    port: int, query_file: Path, seconds: float, *, in_flight: int = 100, rate: int | None = None, clients: int = 1
) -> LoadRun:
    """Run dnsperf over UDP with EDNS0; with ``rate``, also return the median latency of the answered queries."""
    command = [
        "dnsperf", "-s", HOST, "-p", str(port), "-d", str(query_file), "-l", f"{seconds:g}",
        "-c", str(clients), "-q", str(in_flight), "-t", f"{DNS_QUERY_TIMEOUT:g}", "-e",
    ]
    if rate is not None:
        command += ["-Q", str(rate), "-v"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    if result.returncode != 0:
        raise BenchmarkError(f"dnsperf exited with {result.returncode}: {result.stderr.strip() or result.stdout[-500:]}")
    average = re.search(r"^\s*Average Latency \(s\):\s+([\d.]+)", result.stdout, re.MULTILINE)
    load = LoadRun(parse_dnsperf(result.stdout), float(average.group(1)) if average else float("nan"))
    if rate is not None:
        # Verbose lines end in the query's latency in seconds: "> NOERROR name A 0.000123".
        latencies = [float(match) for match in re.findall(r"^> \S+ .* ([\d.]+)$", result.stdout, re.MULTILINE)]
        load.median_latency = statistics.median(latencies) if latencies else None
    return load


# ----- freshness ---------------------------------------------------------------------------


def dns_query(name: str, kind: int, message_id: int, *, edns: bool = False) -> bytes:
    """Return a query of class IN with RD set; with ``edns``, an OPT record offers 1232 bytes."""
    labels = b"".join(bytes((len(label),)) + label.encode("ascii") for label in name.split("."))
    header = message_id.to_bytes(2, "big") + b"\x01\x00\x00\x01\x00\x00\x00\x00" + (b"\x00\x01" if edns else b"\x00\x00")
    question = labels + b"\x00" + kind.to_bytes(2, "big") + b"\x00\x01"
    opt = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00" if edns else b""
    return header + question + opt


def poll_until(sock: socket.socket, name: str, expected_rcode: int, started: float) -> float:
    """Query A ``name`` in a tight loop until the response has ``expected_rcode``; return the seconds since ``started``."""
    message_id = 0
    while time.perf_counter() - started < FRESHNESS_TIMEOUT:
        message_id = (message_id + 1) % 65536
        sock.send(dns_query(name, 1, message_id))
        try:
            while True:
                response = sock.recv(4096)
                if int.from_bytes(response[:2], "big") == message_id:
                    break
        except TimeoutError:
            continue
        if response[3] & 0x0F == expected_rcode:
            return time.perf_counter() - started
    raise BenchmarkError(f"{name} did not change to RCODE {expected_rcode} within {FRESHNESS_TIMEOUT:g} s")


def measure_freshness(server: LogPose, samples: int) -> dict[str, list[float]]:
    """Time health reports (NXDOMAIN to an answer) and deregistrations (an answer to NXDOMAIN)."""
    delays: dict[str, list[float]] = {"health report": [], "deregistration": []}
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((HOST, server.dns_port))
    sock.settimeout(0.5)
    headers = {"Authorization": f"Bearer {server.token()}"}
    try:
        with httpx.Client(base_url=server.url, headers=headers, timeout=30) as client:
            for sample in range(samples // 2):
                code = f"fresh-{sample:04d}"
                name = f"{code}.{ZONE}"
                created = client.post(
                    f"/api/services/{code}/instances",
                    json={"address": f"127.0.0.1:{9000 + sample}", "protocol": "Http", "check": {"type": "none"}},
                )
                created.raise_for_status()
                instance_id = created.json()["id"]
                # Ask first, so a stale cached NXDOMAIN would show as a delay.
                poll_until(sock, name, 3, time.perf_counter())

                client.post(f"/api/instances/{instance_id}/health", json={"status": "Healthy"}).raise_for_status()
                delays["health report"].append(poll_until(sock, name, 0, time.perf_counter()))

                client.delete(f"/api/instances/{instance_id}").raise_for_status()
                delays["deregistration"].append(poll_until(sock, name, 3, time.perf_counter()))
    finally:
        sock.close()
    return delays


# ----- scale -------------------------------------------------------------------------------


def seed_catalog(data_dir: Path, instances: int, services: int) -> None:
    """Write ``instances`` Healthy instances over ``services`` services with the product's store, in batches."""
    from logpose.model import Check, CheckType, Health, Instance, Protocol, Service, parse_address
    from logpose.registry import CatalogWrite, Registry
    from logpose.store import SqlStore, database_url_for

    async def write() -> None:
        store = SqlStore(database_url_for(data_dir, None))
        await store.open()
        try:
            codes = [service_code(number) for number in range(services)]
            await store.commit(CatalogWrite(upsert_services=[Service(code, code, 0, 0) for code in codes]))
            now = time.time()
            batch: list[Instance] = []
            for number in range(instances):
                service = number % services
                position = number // services
                batch.append(Instance(
                    id=str(uuid.uuid4()),
                    service=codes[service],
                    address=parse_address(f"{instance_address(service, position)}:{8000 + position % 1000}"),
                    protocol=Protocol.HTTP,
                    health=Health.HEALTHY,
                    check=Check(type=CheckType.NONE),
                    registered_at=now,
                    updated_at=now,
                ))
                if len(batch) == SEED_BATCH:
                    await store.commit(CatalogWrite(upsert_instances=batch))
                    batch = []
            if batch:
                await store.commit(CatalogWrite(upsert_instances=batch))
            # Read it back the way the server will, as a check.
            registry = Registry(store)
            await registry.load()
            if len(registry.instances()) != instances:
                raise BenchmarkError(f"the store contains {len(registry.instances())} instances, {instances} written")
        finally:
            await store.close()

    data_dir.mkdir(parents=True)
    asyncio.run(write())


@dataclass
class ScaleResult:
    startup_seconds: float = 0.0
    first_answer_rcode: int = -1
    first_answer_records: int = 0
    rss_megabytes: float = 0.0
    sample_runs: list[LoadRun] = field(default_factory=list)
    all_runs: list[LoadRun] = field(default_factory=list)


def answer_count(port: int, name: str, kind: int) -> tuple[int, int]:
    """Ask once over UDP with EDNS0; return the RCODE and the number of answer records."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((HOST, port))
        sock.settimeout(2)
        sock.send(dns_query(name, kind, 4242, edns=True))
        response = sock.recv(65535)
    return response[3] & 0x0F, int.from_bytes(response[6:8], "big")


def measure_scale(options: Options, work_dir: Path, cleanup: contextlib.ExitStack) -> ScaleResult:
    result = ScaleResult()
    data_dir = work_dir / "scale-data"
    log(f"writing {options.scale_instances} instances over {options.scale_services} services to the store")
    started = time.monotonic()
    seed_catalog(data_dir, options.scale_instances, options.scale_services)
    log(f"catalog written in {time.monotonic() - started:.1f} s")

    server = LogPose("scale", work_dir)
    assert server.data_dir == data_dir
    server.start()
    cleanup.callback(server.stop)
    result.startup_seconds = server.wait_ready()
    result.first_answer_rcode, result.first_answer_records = answer_count(
        server.dns_port, f"{service_code(options.scale_services - 1)}.{ZONE}", 1
    )
    log(f"scale server ready in {result.startup_seconds:.2f} s")

    step = max(1, options.scale_services // SCALE_SAMPLE)
    sample = [service_code(number) for number in range(0, options.scale_services, step)][:SCALE_SAMPLE]
    sample_file = write_queries(work_dir / "scale-sample.txt", sample)
    all_file = write_queries(work_dir / "scale-all.txt", [service_code(n) for n in range(options.scale_services)])
    warm_up(server.dns_port, sample_file)
    for repeat in range(options.repeats):
        log(f"scale run {repeat + 1}/{options.repeats}")
        result.sample_runs.append(
            dnsperf(server.dns_port, sample_file, options.seconds, in_flight=options.in_flight, clients=options.clients)
        )
    result.all_runs.append(
        dnsperf(server.dns_port, all_file, options.seconds, in_flight=options.in_flight, clients=options.clients)
    )
    result.rss_megabytes = resident_megabytes(server.pid)
    return result


# ----- the run -------------------------------------------------------------------------------


@dataclass
class Results:
    registration_seconds: float = 0.0
    rate_runs: dict[str, list[LoadRun]] = field(default_factory=dict)
    latency_runs: dict[str, LoadRun] = field(default_factory=dict)
    freshness: dict[str, list[float]] = field(default_factory=dict)
    rss_megabytes: float = 0.0
    scale: ScaleResult | None = None


def check_answers(name: str, port: int, code: str, per_service: int) -> None:
    """Raise unless the server answers A and SRV of the service with every instance."""
    for kind, label in ((1, "A"), (33, "SRV")):
        rcode, count = answer_count(port, f"{code}.{ZONE}", kind)
        if rcode != 0 or count != per_service:
            raise BenchmarkError(f"{name} answered {label} {code} with RCODE {rcode} and {count} records, "
                                 f"expected NOERROR and {per_service}")


def measure(options: Options, work_dir: Path, cleanup: contextlib.ExitStack) -> Results:
    results = Results()
    server = LogPose("main", work_dir)
    server.start()
    cleanup.callback(server.stop)
    server.wait_ready()
    log(f"LogPose ready, pid {server.pid}, DNS port {server.dns_port}")

    started = time.monotonic()
    instances = asyncio.run(register_catalog(server, options.services, options.per_service))
    results.registration_seconds = time.monotonic() - started
    log(f"registered {len(instances)} instances in {results.registration_seconds:.1f} s")

    records = catalog_records(instances)
    nsd = Nsd(work_dir, records)
    cleanup.callback(nsd.stop)
    dnslib_server = DnslibServer(records)
    cleanup.callback(dnslib_server.stop)
    ports = {"LogPose": server.dns_port, "NSD": nsd.port, "dnslib": dnslib_server.port}
    if options.dns_workers > 1:
        # The same catalog registered on a second server that answers DNS with several processes.
        several = LogPose("workers", work_dir, options.dns_workers)
        several.start()
        cleanup.callback(several.stop)
        several.wait_ready()
        asyncio.run(register_catalog(several, options.services, options.per_service))
        ports = {"LogPose": server.dns_port, several_name(options): several.dns_port, **ports}
    deadline = time.monotonic() + 30
    while True:
        try:
            for name, port in ports.items():
                check_answers(name, port, service_code(0), options.per_service)
            break
        except (TimeoutError, ConnectionRefusedError, BenchmarkError):
            if time.monotonic() > deadline or nsd.process.poll() is not None:
                raise BenchmarkError(f"a server does not answer the catalog; NSD log:\n{nsd.log_tail()}") from None
            time.sleep(0.2)
    log(f"NSD pid {nsd.process.pid} and dnslib pid {dnslib_server.pid} answer the same records")

    query_file = write_queries(work_dir / "queries.txt", [service_code(number) for number in range(options.services)])
    results.rate_runs = {name: [] for name in ports}
    for port in ports.values():
        warm_up(port, query_file)
    for repeat in range(options.repeats):
        for name, port in ports.items():
            log(f"rate run {repeat + 1}/{options.repeats} against {name}")
            results.rate_runs[name].append(
                dnsperf(port, query_file, options.seconds, in_flight=options.in_flight, clients=options.clients)
            )
    for name, port in ports.items():
        log(f"latency run at {options.rate} queries/s against {name}")
        results.latency_runs[name] = dnsperf(port, query_file, options.seconds, rate=options.rate, clients=options.clients)

    log(f"freshness: {options.freshness_samples} changes")
    results.freshness = measure_freshness(server, options.freshness_samples)
    results.rss_megabytes = resident_megabytes(server.pid)

    # The baselines are done; stop them so the scale run has the machine.
    nsd.stop()
    dnslib_server.stop()
    if options.scale_instances:
        results.scale = measure_scale(options, work_dir, cleanup)
    return results


# ----- report ----------------------------------------------------------------------------------


def several_name(options: Options) -> str:
    return f"LogPose, {options.dns_workers} processes"


def median_rate(runs: list[LoadRun]) -> float:
    return statistics.median(load.run.queries_per_second for load in runs)


def milliseconds(seconds: float | None) -> str:
    return "n/a" if seconds is None or seconds != seconds else f"{1000 * seconds:.3f} ms"


def print_table(options: Options, results: Results) -> None:
    rates = {name: median_rate(runs) for name, runs in results.rate_runs.items()}
    rows: list[tuple[str, str, str]] = [
        ("catalog", f"{options.services} services x {options.per_service} healthy instances",
         f"registered over HTTP in {results.registration_seconds:.1f} s"),
    ]
    for name, runs in results.rate_runs.items():
        lost = statistics.median(load.run.lost for load in runs)
        average = statistics.median(load.average_latency for load in runs)
        per_run = ", ".join(f"{load.run.queries_per_second:.0f}" for load in runs)
        rows.append((f"queries/s, {name}", f"{rates[name]:,.0f}",
                     f"runs {per_run}; lost {lost:.0f}; average latency {milliseconds(average)}"))
    rows.append(("ratio LogPose / NSD", f"{rates['LogPose'] / rates['NSD']:.2f}", "target 0.75"))
    rows.append(("ratio LogPose / dnslib", f"{rates['LogPose'] / rates['dnslib']:.1f}", "target 40"))
    several = several_name(options)
    if several in rates:
        rows.append((f"ratio {several} / NSD", f"{rates[several] / rates['NSD']:.2f}", "target 0.75"))
        rows.append((f"ratio {several} / dnslib", f"{rates[several] / rates['dnslib']:.1f}", "target 40"))
    for name, load in results.latency_runs.items():
        rows.append((f"median latency at {options.rate}/s, {name}", milliseconds(load.median_latency),
                     f"{load.run.queries_per_second:.0f} queries/s answered, lost {load.run.lost}"))
    logpose_latency = results.latency_runs["LogPose"].median_latency
    nsd_latency = results.latency_runs["NSD"].median_latency
    if logpose_latency and nsd_latency:
        rows.append(("latency ratio LogPose / NSD", f"{logpose_latency / nsd_latency:.2f}", "target at most 2"))
    combined: list[float] = []
    for kind, delays in results.freshness.items():
        combined += delays
        rows.append((f"freshness, {kind}", f"p50 {milliseconds(statistics.median(delays))}",
                     f"p99 {milliseconds(percentile(delays, 0.99))}, max {milliseconds(max(delays))}, "
                     f"{len(delays)} samples"))
    rows.append(("freshness, all changes", f"p99 {milliseconds(percentile(combined, 0.99))}",
                 f"{len(combined)} samples; target p99 under 5 ms"))
    rows.append(("RSS, LogPose", f"{results.rss_megabytes:.0f} MiB", "after the runs"))

    scale = results.scale
    if scale is not None:
        rows.append(("scale catalog", f"{options.scale_instances:,} instances / {options.scale_services:,} services",
                     "written with the store"))
        rows.append(("scale: start-up to /healthz", f"{scale.startup_seconds:.2f} s", "target under 5 s"))
        rows.append(("scale: first A answer", f"RCODE {scale.first_answer_rcode}",
                     f"{scale.first_answer_records} records, asked right after /healthz"))
        rows.append(("scale: RSS", f"{scale.rss_megabytes:.0f} MiB", "target under 500 MB"))
        sample_rate = median_rate(scale.sample_runs)
        rows.append((f"scale: queries/s, {SCALE_SAMPLE} services", f"{sample_rate:,.0f}",
                     "runs " + ", ".join(f"{load.run.queries_per_second:.0f}" for load in scale.sample_runs)
                     + f"; lost {statistics.median(load.run.lost for load in scale.sample_runs):.0f}"))
        rows.append(("scale: ratio to the small catalog", f"{sample_rate / rates['LogPose']:.2f}", "target 0.9"))
        everything = scale.all_runs[0]
        rows.append((f"scale: queries/s, all {options.scale_services:,} services", f"{everything.run.queries_per_second:,.0f}",
                     f"one run, lost {everything.run.lost}; answers mostly built, not cached"))

    print_rows([("", rows)])
    print()
    print(f"dnsperf: UDP, EDNS0, A and SRV of every service in turn, {options.seconds:g} s per run, "
          f"{options.clients} client sockets, "
          f"{options.in_flight} queries outstanding, median of {options.repeats} run(s); "
          f"latency runs at -Q {options.rate}")


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)

    def measure_all(work_dir: Path, cleanup: contextlib.ExitStack) -> Results:
        require_programs()
        return measure(options, work_dir, cleanup)

    return run_benchmark("dns_bench", "DNS benchmark", measure_all, lambda results: print_table(options, results))


if __name__ == "__main__":
    sys.exit(main())
