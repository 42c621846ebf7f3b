"""DNS worker processes (``--dns-workers``) beside the real server process.

Each query below goes out from a new UDP socket, so from a new source port, and
the kernel hands it to one of the processes sharing the port (SO_REUSEPORT).
Forty such queries reach every one of three processes with near certainty, so
when all forty responses are right, every process follows the catalog.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import httpx
import pytest

from conftest import ServerProcess, wait_until
from test_lifecycle import hang_up_and_wait, write_config
from test_metrics import Scrape

ZONE = "logpose.internal"
WORKERS = 3
SAMPLES = 40  # queries from distinct source ports per check
WORKER_MODULE = "logpose.nameserver.workers"


def worker_pids(server: ServerProcess) -> set[int]:
    """Return the process ids of the server's DNS workers, read from /proc."""
    assert server.process is not None
    pids = set()
    for task in Path(f"/proc/{server.process.pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            try:
                command = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if WORKER_MODULE.encode() in command:
                pids.add(int(child))
    return pids


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def ask(
    server: ServerProcess, name: str, rdtype: str = "A", timeout: float = 2.0, tcp: bool = False
) -> dns.message.Message:
    # dnspython opens a new socket per call, on a port the kernel picks.
    query = dns.query.tcp if tcp else dns.query.udp
    return query(dns.message.make_query(name, rdtype), "127.0.0.1", port=server.dns_port, timeout=timeout)


def all_answers(server: ServerProcess, name: str, rdtype: str = "A") -> set[tuple[int, tuple[str, ...]]]:
    """Ask SAMPLES times from distinct ports, a quarter over TCP; return the distinct (rcode, sorted records) seen."""
    seen = set()
    for number in range(SAMPLES):
        reply = ask(server, name, rdtype, tcp=number % 4 == 0)
        seen.add((reply.rcode(), tuple(sorted(rdata.to_text() for rrset in reply.answer for rdata in rrset))))
    return seen


def register(api: httpx.Client, code: str, address: str) -> dict:
    created = api.post(f"/api/services/{code}/instances", json={"address": address, "protocol": "Http", "check": {"type": "none"}})
    assert created.status_code == 201, created.text
    return created.json()


def report(api: httpx.Client, instance: dict, status: str) -> None:
    # Twice: a Healthy instance turns Unhealthy at the second failure (health_fall 2).
    for _ in range(2 if status == "Unhealthy" else 1):
        answer = api.post(f"/api/instances/{instance['id']}/health", json={"status": status})
        assert answer.status_code == 200, answer.text


@pytest.fixture(scope="module")
def workers_server(tmp_path_factory) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path_factory.mktemp("workers") / "data", ["--dns-workers", str(WORKERS)]).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def workers_api(workers_server) -> Iterator[httpx.Client]:
    with workers_server.client() as client:
        yield client


def test_server_starts_the_workers(workers_server):
    assert len(worker_pids(workers_server)) == WORKERS - 1
    assert workers_server.log().count("DNS worker ") >= WORKERS - 1
    assert "DNS worker 2 started" in workers_server.log()


def test_every_process_follows_changes(workers_server, workers_api):
    name = f"follow.{ZONE}"
    instance = register(workers_api, "follow", "10.20.0.1:8080")
    assert all_answers(workers_server, name) == {(dns.rcode.NXDOMAIN, ())}

    report(workers_api, instance, "Healthy")
    assert all_answers(workers_server, name) == {(dns.rcode.NOERROR, ("10.20.0.1",))}

    second = register(workers_api, "follow", "10.20.0.2:8080")
    report(workers_api, second, "Healthy")
    assert all_answers(workers_server, name) == {(dns.rcode.NOERROR, ("10.20.0.1", "10.20.0.2"))}

    report(workers_api, instance, "Unhealthy")
    assert all_answers(workers_server, name) == {(dns.rcode.NOERROR, ("10.20.0.2",))}

    drained = workers_api.post(f"/api/instances/{second['id']}/maintenance", json={"enabled": True, "reason": "upgrade"})
    assert drained.status_code == 200, drained.text
    assert all_answers(workers_server, name) == {(dns.rcode.NXDOMAIN, ())}

    assert workers_api.delete(f"/api/instances/{instance['id']}").status_code == 204
    assert workers_api.delete(f"/api/instances/{second['id']}").status_code == 204
    assert all_answers(workers_server, f"follow.{ZONE}", "SRV") == {(dns.rcode.NXDOMAIN, ())}


def test_queries_spread_over_the_processes(workers_server, workers_api):
    instance = register(workers_api, "spread", "10.21.0.1:8080")
    report(workers_api, instance, "Healthy")
    pids = worker_pids(workers_server)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        outcomes = []
        for _ in range(SAMPLES):
            try:
                outcomes.append(ask(workers_server, f"spread.{ZONE}", timeout=0.3).rcode())
            except dns.exception.Timeout:
                outcomes.append("timeout")
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)

    # Queries that the kernel handed to a stopped worker wait in its socket.
    assert "timeout" in outcomes, outcomes
    assert dns.rcode.NOERROR in outcomes, outcomes
    assert all_answers(workers_server, f"spread.{ZONE}") == {(dns.rcode.NOERROR, ("10.21.0.1",))}


def test_worker_responses_reach_the_metrics(workers_server, workers_api):
    def total() -> float:
        text = workers_api.get("/metrics").text
        return sum(sample.value for sample in Scrape(text).samples if sample.name == "logpose_dns_queries_total")

    before = total()
    for _ in range(SAMPLES):
        ask(workers_server, f"metered-nothing.{ZONE}")
    # Workers report their counts once a second.
    assert wait_until(lambda: total() >= before + SAMPLES, timeout=10), (before, total())


def test_killed_worker_is_started_again(workers_server, workers_api):
    instance = register(workers_api, "restart", "10.22.0.1:8080")
    report(workers_api, instance, "Healthy")
    victim = sorted(worker_pids(workers_server))[0]
    os.kill(victim, signal.SIGKILL)

    assert wait_until(lambda: victim not in worker_pids(workers_server)
                      and len(worker_pids(workers_server)) == WORKERS - 1, timeout=15), workers_server.log()
    assert f"(pid {victim}) was killed by signal 9 (SIGKILL)" in workers_server.log()
    # The new worker started from the catalog as it is now.
    assert all_answers(workers_server, f"restart.{ZONE}") == {(dns.rcode.NOERROR, ("10.22.0.1",))}


def test_terminated_worker_stays_stopped(server_factory):
    server = server_factory("terminated", ["--dns-workers", "2"])
    (pid,) = worker_pids(server)

    os.kill(pid, signal.SIGTERM)

    stopped = f"DNS worker 1 (pid {pid}) stopped; 1 of 2 DNS processes remain"
    assert wait_until(lambda: stopped in server.log(), timeout=10), server.log()
    time.sleep(1.5)  # longer than the restart delay
    assert worker_pids(server) == set()
    assert ask(server, f"nothing.{ZONE}").rcode() == dns.rcode.NXDOMAIN


def test_workers_end_with_the_server(server_factory):
    server = server_factory("stopped", ["--dns-workers", "2"])
    pids = worker_pids(server)
    assert len(pids) == 1

    assert server.stop() == 0
    assert wait_until(lambda: not any(alive(pid) for pid in pids), timeout=10)
    assert "Traceback" not in server.log()


def test_workers_end_with_killed_server(server_factory):
    server = server_factory("killed", ["--dns-workers", "3"])
    pids = worker_pids(server)
    assert len(pids) == 2

    server.kill()

    # Their stdin closes with the server, and they exit on their own.
    assert wait_until(lambda: not any(alive(pid) for pid in pids), timeout=10)


def test_sighup_reaches_the_workers(server_factory, tmp_path):
    config = tmp_path / "logpose.toml"
    write_config(config, dns_ttl=5, dns_workers=WORKERS)
    server = server_factory("reloaded", ["--config", str(config)])
    assert len(worker_pids(server)) == WORKERS - 1
    with server.client() as api:
        report(api, register(api, "ttl", "10.23.0.1:8080"), "Healthy")

    def ttls() -> set[int]:
        return {ask(server, f"ttl.{ZONE}").answer[0].ttl for _ in range(SAMPLES)}

    assert ttls() == {5}
    write_config(config, dns_ttl=42, dns_workers=WORKERS)
    hang_up_and_wait(server, "Reloaded dns_ttl: 5 -> 42")
    assert wait_until(lambda: ttls() == {42}, timeout=5)


@pytest.mark.parametrize("value", ["0", "65", "two"])
def test_bad_worker_count_is_rejected(tmp_path, value):
    finished = subprocess.run(
        [sys.executable, "-m", "logpose.server.main", "--data-dir", str(tmp_path / "data"), "--dns-workers", value],
        capture_output=True, text=True, timeout=30,
    )
    assert finished.returncode == 2, finished.stderr
    assert "--dns-workers" in finished.stderr, finished.stderr
    assert "1 to 64" in finished.stderr, finished.stderr
    assert "Traceback" not in finished.stderr
    assert not (tmp_path / "data").exists()


def test_worker_module_needs_start_message():
    started = time.monotonic()
    finished = subprocess.run(
        [sys.executable, "-m", WORKER_MODULE], input=b"", capture_output=True, timeout=30,
    )
    assert finished.returncode == 2
    assert b"started by logpose-server" in finished.stderr
    assert b"Traceback" not in finished.stderr
    assert time.monotonic() - started < 30
