#!/usr/bin/env python3
"""HTTP discovery and registration throughput, each beside its baseline in one run.

Discovery: wrk (Debian package ``wrk``) sends ``GET /api/discover/bench`` with
a valid Bearer token over 50 connections to a real ``logpose-server`` (default
configuration, temporary SQLite data directory), then the same load to a
minimal aiohttp app on the same event loop (uvloop) that returns a
pre-serialised body of the same size without any check. Runs alternate and
the medians give the ratio.

Registration: wrk registers new instances over 32 connections for the same
time; the baseline is rows of the same shape inserted directly with aiosqlite
(WAL, synchronous=FULL), 32 tasks each committing its own insert, as durable
as a 201.

    .venv/bin/python bench/http_bench.py                # 10 s wrk runs, 3 repeats, 3,000 raw inserts
    .venv/bin/python bench/http_bench.py --smoke        # a few seconds, for CI

Traffic goes to 127.0.0.1 only; every process started is stopped by its PID.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiosqlite
import httpx

from benchlib import free_port, stop_process

HOST = "127.0.0.1"
STARTUP_TIMEOUT = 30.0  # seconds
WRK_CONNECTIONS = 50
WRITE_CLIENTS = 32

# The baseline app: the same body, no token check, no registry.
BASELINE_APP = r'''
import sys, uvloop
from aiohttp import web
body = open(sys.argv[2], "rb").read()
async def discover(request):
    return web.Response(body=body, content_type="application/json")
app = web.Application()
app.router.add_get("/api/discover/bench", discover)
uvloop.run(web._run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None))
'''


def wait_http(url: str, process: subprocess.Popen, headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{url} exited with {process.returncode} before answering")
        try:
            if httpx.get(url, headers=headers, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise SystemExit(f"{url} did not answer within {STARTUP_TIMEOUT:g} s")


def run_wrk(url: str, seconds: float, token: str | None) -> float:
    command = ["wrk", "-t2", f"-c{WRK_CONNECTIONS}", f"-d{seconds:g}s", url]
    if token:
        command[1:1] = ["-H", f"Authorization: Bearer {token}"]
    output = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if match is None or "Non-2xx" in output:
        raise SystemExit(f"wrk failed or got errors:\n{output}")
    return float(match.group(1))


# wrk script for registrations: every request registers a new address, so each is a 201.
REGISTER_SCRIPT = r"""
local threads = 0
function setup(thread)
  thread:set("id", threads)
  threads = threads + 1
end
function init(args)
  counter = 0
end
function request()
  counter = counter + 1
  local octets = string.format("10.%d.%d.%d:%d", 8 + id, math.floor(counter / 250) % 250, counter % 250 + 1,
                               1000 + math.floor(counter / 62500))
  local body = '{"address": "' .. octets .. '", "protocol": "Tcp", "check": {"type": "none"}}'
  return wrk.format("POST", "/api/services/w" .. (counter % 50) .. "/instances",
                    {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. token}, body)
end
"""


def register_many(url: str, token: str, seconds: float, folder: str) -> float:
    """Register new instances with wrk over WRITE_CLIENTS connections; return registrations/s."""
    script = Path(folder) / "register.lua"
    script.write_text(f'token = "{token}"\n' + REGISTER_SCRIPT)
    output = subprocess.run(
        ["wrk", "-t2", f"-c{WRITE_CLIENTS}", f"-d{seconds:g}s", "-s", str(script), url],
        capture_output=True, text=True, timeout=seconds + 30,
    ).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if match is None or "Non-2xx" in output:
        raise SystemExit(f"wrk registrations failed or got errors:\n{output}")
    return float(match.group(1))


async def insert_raw(path: Path, count: int) -> float:
    async with aiosqlite.connect(path) as database:
        await database.execute("PRAGMA journal_mode=WAL")
        await database.execute("PRAGMA synchronous=FULL")
        await database.execute("CREATE TABLE instances (id TEXT PRIMARY KEY, service TEXT, address TEXT, "
                               "protocol TEXT, body TEXT)")
        await database.commit()
        lock = asyncio.Lock()
        queue: asyncio.Queue[int] = asyncio.Queue()
        for number in range(count):
            queue.put_nowait(number)

        async def writer() -> None:
            while not queue.empty():
                number = queue.get_nowait()
                async with lock:  # one connection: each insert is its own durable transaction
                    await database.execute(
                        "INSERT INTO instances VALUES (?, ?, ?, ?, ?)",
                        (f"id-{number}", f"w{number % 50}", f"10.8.{number // 250}.{number % 250 + 1}:80", "Tcp",
                         "{}"),
                    )
                    await database.commit()

        started = time.perf_counter()
        await asyncio.gather(*(writer() for _ in range(WRITE_CLIENTS)))
        return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10, help="seconds per wrk run (default 10)")
    parser.add_argument("--repeats", type=int, default=3, help="wrk runs per side (default 3)")
    parser.add_argument("--writes", type=int, default=3000, help="raw aiosqlite inserts measured (default 3000)")
    parser.add_argument("--smoke", action="store_true", help="short runs for CI")
    arguments = parser.parse_args()
    if arguments.smoke:
        arguments.seconds, arguments.repeats, arguments.writes = 1, 1, 200
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (Debian package wrk)")

    processes: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="logpose-http-bench-") as folder:
        try:
            http_port, dns_port, baseline_port = free_port(), free_port(), free_port()
            environment = {key: value for key, value in os.environ.items() if not key.startswith("LOGPOSE_")}
            log = open(Path(folder) / "server.log", "wb")
            server = subprocess.Popen(
                [sys.executable, "-m", "logpose.server.main", "--data-dir", f"{folder}/data",
                 "--http-listen", f"{HOST}:{http_port}", "--dns-listen", f"{HOST}:{dns_port}"],
                stdout=log, stderr=log, env=environment,
            )
            processes.append(server)
            url = f"http://{HOST}:{http_port}"
            wait_http(url + "/healthz", server)
            secret = (Path(folder) / "data" / "admin.secret").read_text().strip()
            token = httpx.post(url + "/api/auth/token",
                               json={"common_name": "admin", "secret": secret}).json()["access_token"]
            headers = {"Authorization": f"Bearer {token}"}
            for number in range(3):
                instance = httpx.post(url + "/api/services/bench/instances", headers=headers, json={
                    "address": f"10.7.0.{number + 1}:8080", "protocol": "Http", "check": {"type": "none"}}).json()
                httpx.post(url + f"/api/instances/{instance['id']}/health", headers=headers,
                           json={"status": "Healthy"})
            body = httpx.get(url + "/api/discover/bench", headers=headers).content
            body_path = Path(folder) / "body.json"
            body_path.write_bytes(body)

            baseline = subprocess.Popen([sys.executable, "-c", BASELINE_APP, str(baseline_port), str(body_path)])
            processes.append(baseline)
            wait_http(f"http://{HOST}:{baseline_port}/api/discover/bench", baseline)

            logpose_rates, baseline_rates = [], []
            for _ in range(arguments.repeats):
                logpose_rates.append(run_wrk(url + "/api/discover/bench", arguments.seconds, token))
                baseline_rates.append(run_wrk(f"http://{HOST}:{baseline_port}/api/discover/bench",
                                              arguments.seconds, None))

            write_rate = register_many(url, token, arguments.seconds, folder)
            raw_rate = asyncio.run(insert_raw(Path(folder) / "raw.db", arguments.writes))
        finally:
            for process in processes:
                stop_process(process)

    discovery, minimal = statistics.median(logpose_rates), statistics.median(baseline_rates)
    print(f"discovery body: {len(body)} bytes, wrk -t2 -c{WRK_CONNECTIONS} -d{arguments.seconds:g}s, "
          f"{arguments.repeats} repeat(s), medians")
    print("| measure | LogPose | baseline | ratio |")
    print("|---|---|---|---|")
    print(f"| GET /api/discover, requests/s | {discovery:,.0f} | {minimal:,.0f} (minimal aiohttp) | "
          f"{discovery / minimal:.2f} |")
    print(f"| registrations/s, {WRITE_CLIENTS} connections | {write_rate:,.0f} | {raw_rate:,.0f} "
          f"(aiosqlite, one commit per insert) | {write_rate / raw_rate:.2f} |")


if __name__ == "__main__":
    main()
