#!/usr/bin/env python3
"""Measure how fast a write on one node changes the DNS answers of another.

Two real ``logpose-server`` processes share one PostgreSQL database (a fresh
database made next to the one ``--postgres-url`` names, dropped at the end).
For each sample an instance is registered and reported Healthy on node A;
once both nodes answer its DNS name, it is deregistered on A and the script
polls the instance's A record on node A (the baseline: same node) and on node
B (the change feed through LISTEN/NOTIFY) until each answers NXDOMAIN. The
delay is counted from the moment A acknowledged the deregistration.

    .venv/bin/python bench/propagation.py --postgres-url postgresql://postgres@127.0.0.1:5432/test
    .venv/bin/python bench/propagation.py --postgres-url ... --samples 200
    .venv/bin/python bench/propagation.py --postgres-url ... --smoke

Traffic goes to 127.0.0.1 only; every process started is stopped by its PID.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import httpx

from benchlib import free_port, stop_process

HOST = "127.0.0.1"
ZONE = "logpose.internal"
POLL_TIMEOUT = 5.0  # seconds to wait for one change to show
STARTUP_TIMEOUT = 30.0


class Node:
    def __init__(self, name: str, folder: Path, database_url: str, key: str) -> None:
        self.data_dir = folder / name
        self.http_port = free_port()
        self.dns_port = free_port()
        self.log = (folder / f"{name}.log").open("wb")
        environment = {k: v for k, v in os.environ.items() if not k.startswith("LOGPOSE_")}
        environment["LOGPOSE_JWT_KEY"] = key
        self.process = subprocess.Popen(
            [sys.executable, "-m", "logpose.server.main", "--data-dir", str(self.data_dir),
             "--http-listen", f"{HOST}:{self.http_port}", "--dns-listen", f"{HOST}:{self.dns_port}",
             "--database-url", database_url],
            stdout=self.log, stderr=self.log, env=environment,
        )
        self.url = f"http://{HOST}:{self.http_port}"
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"node {name} exited with {self.process.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise SystemExit(f"node {name} did not start within {STARTUP_TIMEOUT:g} s")

    def rcode(self, name: str) -> int:
        query = dns.message.make_query(name, "A")
        return dns.query.udp(query, HOST, port=self.dns_port, timeout=1).rcode()

    def stop(self) -> None:
        stop_process(self.process)
        self.log.close()


def wait_for(node: Node, name: str, rcode: int) -> float:
    """Poll ``name`` on ``node`` until it answers ``rcode``; return the monotonic time it did."""
    deadline = time.monotonic() + POLL_TIMEOUT
    while time.monotonic() < deadline:
        if node.rcode(name) == rcode:
            return time.monotonic()
        time.sleep(0.0005)
    raise SystemExit(f"{name} did not answer {dns.rcode.to_text(rcode)} on port {node.dns_port} in {POLL_TIMEOUT:g} s")


def sql(url: str, statement: str) -> None:
    import asyncpg

    async def run() -> None:
        connection = await asyncpg.connect(url, timeout=10)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    asyncio.run(run())


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres-url", default=os.environ.get("LOGPOSE_TEST_POSTGRES_URL"),
                        help="a PostgreSQL database URL; a scratch database is made beside it")
    parser.add_argument("--samples", type=int, default=200, help="deregistrations measured (default 200)")
    parser.add_argument("--smoke", action="store_true", help="10 samples, for CI")
    arguments = parser.parse_args()
    if not arguments.postgres_url:
        raise SystemExit("give --postgres-url or set LOGPOSE_TEST_POSTGRES_URL")
    samples = 10 if arguments.smoke else arguments.samples

    database = f"logpose_bench_{uuid.uuid4().hex[:10]}"
    base = arguments.postgres_url.rsplit("/", 1)[0]
    sql(arguments.postgres_url, f'CREATE DATABASE "{database}"')
    nodes: list[Node] = []
    try:
        with tempfile.TemporaryDirectory(prefix="logpose-propagation-") as folder:
            key = secrets.token_hex(32)
            nodes.append(Node("a", Path(folder), f"{base}/{database}", key))
            nodes.append(Node("b", Path(folder), f"{base}/{database}", key))
            node_a, node_b = nodes
            secret = (node_a.data_dir / "admin.secret").read_text().strip()
            token = httpx.post(node_a.url + "/api/auth/token",
                               json={"common_name": "admin", "secret": secret}).json()["access_token"]
            same_node: list[float] = []
            other_node: list[float] = []
            with httpx.Client(base_url=node_a.url, headers={"Authorization": f"Bearer {token}"}) as api:
                for number in range(samples):
                    instance = api.post("/api/services/prop/instances", json={
                        "address": f"10.9.{number // 250}.{number % 250 + 1}:80", "protocol": "Tcp",
                        "check": {"type": "none"}}).json()
                    api.post(f"/api/instances/{instance['id']}/health", json={"status": "Healthy"})
                    name = f"{instance['id']}.prop.{ZONE}"
                    wait_for(node_a, name, dns.rcode.NOERROR)
                    wait_for(node_b, name, dns.rcode.NOERROR)

                    answer = api.delete(f"/api/instances/{instance['id']}")
                    acknowledged = time.monotonic()
                    assert answer.status_code == 204, answer.text
                    same_node.append(wait_for(node_a, name, dns.rcode.NXDOMAIN) - acknowledged)
                    other_node.append(wait_for(node_b, name, dns.rcode.NXDOMAIN) - acknowledged)
    finally:
        for node in nodes:
            node.stop()
        sql(arguments.postgres_url, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')

    def row(label: str, values: list[float]) -> str:
        return (f"| {label} | {len(values)} | {statistics.median(values) * 1000:.2f} | "
                f"{percentile(values, 0.99) * 1000:.2f} | {max(values) * 1000:.2f} |")

    print("| DNS answer changed on | samples | median ms | p99 ms | max ms |")
    print("|---|---|---|---|---|")
    print(row("node A (same node, baseline)", same_node))
    print(row("node B (change feed)", other_node))
    print(f"\nratio of medians B/A: {statistics.median(other_node) / max(statistics.median(same_node), 1e-6):.1f}")
    print("note: node B's figure is measured after node A's answer changed, so it includes A's own delay")


if __name__ == "__main__":
    main()
