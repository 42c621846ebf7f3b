"""Several server processes on one real PostgreSQL database.

Needs ``LOGPOSE_TEST_POSTGRES_URL`` (a database on a server with trust or
password auth, e.g. postgresql://postgres@127.0.0.1:5432/test); each test makes
and drops a database of its own next to it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import httpx
import pytest

from conftest import TcpListener, free_port, wait_until
from test_dns_workers import all_answers

POSTGRES_URL = os.environ.get("LOGPOSE_TEST_POSTGRES_URL")
pytestmark = pytest.mark.skipif(POSTGRES_URL is None, reason="LOGPOSE_TEST_POSTGRES_URL is not set")
ZONE = "logpose.internal"
PROBE_INTERVAL = 0.5  # seconds, as conftest's servers use


def run_sql(url: str, statement: str) -> None:
    import asyncpg

    async def execute() -> None:
        connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"), timeout=10)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    asyncio.run(execute())


@pytest.fixture
def database_url():
    """Create an empty database for one test and drop it afterwards."""
    name = f"logpose_test_{uuid.uuid4().hex[:12]}"
    run_sql(POSTGRES_URL, f'CREATE DATABASE "{name}"')
    base = POSTGRES_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    run_sql(POSTGRES_URL, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def cluster(server_factory, database_url):
    """Start nodes on one database; the first node writes the admin secret."""
    key = secrets.token_hex(32)
    nodes = []

    def start(count: int = 2, url: str | None = None, extra_args: tuple[str, ...] = ()):
        for _ in range(count):
            node = server_factory(
                f"node{len(nodes)}", ["--database-url", url or database_url, *extra_args], {"LOGPOSE_JWT_KEY": key}
            )
            nodes.append(node)
        return nodes

    return start


def token_of(first_node) -> str:
    return first_node.token()


def client(node, token: str) -> httpx.Client:
    return httpx.Client(base_url=node.url, headers={"Authorization": f"Bearer {token}"}, timeout=10)


def srv_ports(node, code: str) -> set[int]:
    answer = dns.query.udp(dns.message.make_query(f"{code}.{ZONE}", "SRV"), "127.0.0.1", port=node.dns_port, timeout=3)
    return {record.port for rrset in answer.answer for record in rrset}


def register(api: httpx.Client, code: str, address: str, check: str = "tcp") -> httpx.Response:
    return api.post(f"/api/services/{code}/instances",
                    json={"address": address, "protocol": "Tcp", "check": {"type": check}})


def test_write_on_one_node_answered_by_another(cluster, tcp_listener):
    node_a, node_b = cluster(2)
    token = token_of(node_a)
    with client(node_a, token) as api_a, client(node_b, token) as api_b:
        instance = register(api_a, "web", tcp_listener.address).json()
        assert wait_until(lambda: srv_ports(node_b, "web") == {tcp_listener.port}, timeout=3)
        assert [item["id"] for item in api_b.get("/api/discover/web").json()] == [instance["id"]]

        api_b.post(f"/api/instances/{instance['id']}/maintenance", json={"enabled": True})
        assert wait_until(lambda: srv_ports(node_a, "web") == set(), timeout=3)

        assert api_b.delete(f"/api/instances/{instance['id']}").status_code == 204
        assert wait_until(lambda: api_a.get(f"/api/instances/{instance['id']}").status_code == 404, timeout=3)

        status = api_b.get("/api/status").json()["node"]
        assert status["shared_database"] is True
        assert status["id"] != api_a.get("/api/status").json()["node"]["id"]
        assert wait_until(lambda: api_b.get("/api/status").json()["node"]["lag"] == 0, timeout=3)


def test_workers_follow_other_node_writes(cluster):
    node_a, node_b = cluster(2, extra_args=("--dns-workers", "3"))
    with client(node_b, token_of(node_a)) as api_b:
        created = api_b.post(
            "/api/services/remote/instances",
            json={"address": "10.30.0.1:80", "protocol": "Http", "check": {"type": "none"}},
        )
        assert created.status_code == 201, created.text
        reported = api_b.post(f"/api/instances/{created.json()['id']}/health", json={"status": "Healthy"})
        assert reported.status_code == 200, reported.text

        # Node A learns the change from the database's change feed and passes it to its workers.
        assert wait_until(
            lambda: all_answers(node_a, f"remote.{ZONE}") == {(dns.rcode.NOERROR, ("10.30.0.1",))}, timeout=10
        ), node_a.log()


def test_exactly_one_node_probes(cluster):
    node_a, node_b = cluster(2)
    token = token_of(node_a)
    with client(node_a, token) as api_a, client(node_b, token) as api_b:
        assert wait_until(
            lambda: api_a.get("/api/status").json()["node"]["prober"] != api_b.get("/api/status").json()["node"]["prober"],
            timeout=3,
        )


def test_prober_taken_over_after_kill9(cluster):
    node_a, node_b = cluster(2)
    token = token_of(node_a)
    listener = TcpListener()
    try:
        with client(node_a, token) as api_a, client(node_b, token) as api_b:
            prober, other, other_api = (node_a, node_b, api_b) if api_a.get("/api/status").json()["node"]["prober"] \
                else (node_b, node_a, api_a)
            instance = register(api_a, "web", listener.address).json()
            assert wait_until(lambda: srv_ports(other, "web") == {listener.port}, timeout=3)

            prober.kill()
            listener.close()
            # Within two probe intervals of the lock's release, plus the fall of two failures.
            turned = wait_until(
                lambda: other_api.get(f"/api/instances/{instance['id']}").json()["health"] == "Unhealthy",
                timeout=2 * PROBE_INTERVAL + 3,
            )
            assert turned, other.log()
            assert other_api.get("/api/status").json()["node"]["prober"] is True
            assert srv_ports(other, "web") == set()
    finally:
        listener.close()


def test_concurrent_registration_of_one_instance(cluster):
    node_a, node_b = cluster(2)
    token = token_of(node_a)
    addresses = [f"10.1.0.{number}:8080" for number in range(1, 11)]
    results: dict[str, list[int]] = {address: [] for address in addresses}

    def hammer(node) -> None:
        with client(node, token) as api:
            for address in addresses:
                results[address].append(register(api, "race", address, check="none").status_code)

    threads = [threading.Thread(target=hammer, args=(node,)) for node in (node_a, node_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    for address, codes in results.items():
        assert sorted(codes) in ([200, 201], [201, 200]), (address, codes)
    with client(node_a, token) as api_a, client(node_b, token) as api_b:
        assert wait_until(lambda: len(api_b.get("/api/services/race/instances").json()) == len(addresses), timeout=3)
        for api in (api_a, api_b):
            stored = api.get("/api/services/race/instances").json()
            assert sorted(item["address"] for item in stored) == sorted(addresses)


def test_tokens_from_one_node_accepted_by_all(cluster):
    node_a, node_b, node_c = cluster(3)
    token = token_of(node_a)
    for node in (node_b, node_c):
        with client(node, token) as api:
            assert api.get("/api/services").status_code == 200


# ----- a private PostgreSQL that the test may stop and start -----------------------------

POSTGRES_BIN = Path("/usr/lib/postgresql")


def _postgres_tool(name: str) -> Path | None:
    candidates = sorted(POSTGRES_BIN.glob(f"*/bin/{name}"))
    return candidates[-1] if candidates else None


class PrivatePostgres:
    """A throw-away PostgreSQL cluster in a temporary folder, run as the postgres user."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.data = folder / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *command: str) -> subprocess.CompletedProcess[str]:
        runner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        return subprocess.run([*runner, *command], capture_output=True, text=True, timeout=60)

    def initialise(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        result = self._as_postgres(str(_postgres_tool("initdb")), "-D", str(self.data), "-U", "postgres",
                                   "--auth=trust", "--no-sync")
        assert result.returncode == 0, result.stderr

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.folder} -c fsync=off"
        result = self._as_postgres(str(_postgres_tool("pg_ctl")), "-D", str(self.data), "-o", options,
                                   "-l", str(self.folder / "postgres.log"), "-w", "start")
        assert result.returncode == 0, result.stderr + result.stdout

    def stop(self) -> None:
        self._as_postgres(str(_postgres_tool("pg_ctl")), "-D", str(self.data), "-m", "fast", "-w", "stop")


@pytest.fixture
def private_postgres(tmp_path_factory):
    if _postgres_tool("initdb") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("initdb is required in CI (Debian package postgresql)")
        pytest.skip("initdb is not installed (Debian package postgresql)")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("runuser is missing, and initdb refuses to run as root")
    # Not under pytest's tmp_path: the postgres user must reach the folder.
    folder = Path("/tmp") / f"logpose-pg-{uuid.uuid4().hex[:8]}"
    server = PrivatePostgres(folder)
    server.initialise()
    server.start()
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


def test_database_outage_rejects_writes_keeps_reads(cluster, private_postgres, tcp_listener):
    node_a, node_b = cluster(2, url=private_postgres.url)
    token = token_of(node_a)
    with client(node_a, token) as api_a, client(node_b, token) as api_b:
        acknowledged = {register(api_a, "web", tcp_listener.address).json()["id"]}
        acknowledged.add(register(api_b, "api", "10.2.0.1:80", check="none").json()["id"])
        assert wait_until(lambda: srv_ports(node_b, "web") == {tcp_listener.port}, timeout=3)

        private_postgres.stop()
        outage_end = time.monotonic() + 3
        rejected = 0
        while time.monotonic() < outage_end:
            for api, node in ((api_a, node_a), (api_b, node_b)):
                # Reads never fail: discovery and DNS answer from memory.
                assert [item["id"] for item in api.get("/api/discover/web").json()]
                assert srv_ports(node, "web") == {tcp_listener.port}
            answer = register(api_a, "web", "10.2.0.9:80", check="none")
            assert answer.status_code == 503, answer.text
            assert answer.headers["content-type"].startswith("application/problem+json")
            assert "database" in answer.json()["detail"]
            rejected += 1
        assert rejected > 0

        private_postgres.start()
        recovered = wait_until(lambda: register(api_b, "api", "10.2.0.2:80", check="none").status_code == 201,
                               timeout=20, interval=0.5)
        assert recovered, node_b.log()
        acknowledged.add(api_b.get("/api/services/api/instances").json()[-1]["id"])
        for api in (api_a, api_b):
            assert wait_until(
                lambda api=api: acknowledged <= {item["id"] for item in api.get("/api/instances").json()}, timeout=5
            )
    assert node_a.log().count("is unreachable: writes are rejected") == 1
    assert "is reachable again" in node_a.log()


def test_client_removal_revokes_tokens_on_every_node(cluster):
    node_a, node_b = cluster(2)
    admin = token_of(node_a)
    with client(node_a, admin) as api_a:
        created = api_a.post("/api/clients", json={"common_name": "billing", "role": "reader"}).json()
        issued = httpx.post(node_b.url + "/api/auth/token",
                            json={"common_name": "billing", "secret": created["secret"]})
        assert issued.status_code == 200, issued.text
        reader = issued.json()["access_token"]
        with client(node_b, reader) as as_reader:
            assert as_reader.get("/api/services").status_code == 200
            assert api_a.delete("/api/clients/billing").status_code == 204
            assert wait_until(lambda: as_reader.get("/api/services").status_code == 401, timeout=3)
