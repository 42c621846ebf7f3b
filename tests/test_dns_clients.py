"""Resolvers outside Python, dig and Node.js, against the real server process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from conftest import ServerProcess, TcpListener, wait_until

ZONE = "logpose.internal"
NODE_SRV_SCRIPT = """
const { Resolver } = require('dns');
const resolver = new Resolver({ timeout: 2000, tries: 2 });
resolver.setServers([process.argv[1]]);
resolver.resolveSrv(process.argv[2], (error, records) => {
  if (error) {
    console.error(error.code);
    process.exit(1);
  }
  console.log(JSON.stringify(records));
});
"""


def require_program(name: str, package: str) -> str:
    """Return the program's path; skip when it is missing, but fail in CI where it must be installed."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is required in CI (install the {package} package)")
        pytest.skip(f"{name} is not installed (package {package})")
    return path


def register_healthy(server: ServerProcess, api, code: str, listener: TcpListener) -> dict:
    created = api.post(f"/api/services/{code}/instances", json={"address": listener.address, "protocol": "Http"})
    assert created.status_code in (200, 201), created.text
    assert wait_until(lambda: api.get(f"/api/discover/{code}").json(), timeout=5), server.log()
    return created.json()


def dig(server: ServerProcess, *arguments: str) -> str:
    command = [require_program("dig", "dnsutils"), "@127.0.0.1", "-p", str(server.dns_port), "+time=2", "+tries=1"]
    finished = subprocess.run([*command, *arguments], capture_output=True, text=True, timeout=15)
    assert finished.returncode == 0, finished.stderr
    return finished.stdout


@pytest.mark.parametrize("transport", ["+notcp", "+tcp"])
def test_dig_resolves_srv(server, api, tcp_listener, transport):
    instance = register_healthy(server, api, "dig-svc", tcp_listener)

    short = dig(server, transport, "+short", "SRV", f"_http._tcp.dig-svc.{ZONE}")
    full = dig(server, transport, "SRV", f"dig-svc.{ZONE}")

    assert short.split() == ["1", "1", str(tcp_listener.port), f"{instance['id']}.dig-svc.{ZONE}."]
    assert "flags: qr aa rd;" in full  # authoritative, no recursion offered
    assert "status: NOERROR" in full
    records = {" ".join(line.split()) for line in full.splitlines()}
    assert f"dig-svc.{ZONE}. 5 IN SRV 1 1 {tcp_listener.port} {instance['id']}.dig-svc.{ZONE}." in records
    assert f"{instance['id']}.dig-svc.{ZONE}. 5 IN A 127.0.0.1" in records  # the additional section


def test_dig_reverse_lookup(server_factory, tcp_listener):
    server = server_factory(extra_args=["--dns-reverse-zones", "127.0.0.0/8"])
    with server.client() as api:
        instance = register_healthy(server, api, "ptr-svc", tcp_listener)

    answer = dig(server, "+short", "-x", "127.0.0.1")

    assert answer.split() == [f"{instance['id']}.ptr-svc.{ZONE}."]


def test_node_resolver_srv(server, api, tcp_listener):
    node = require_program("node", "nodejs")
    instance = register_healthy(server, api, "node-svc", tcp_listener)

    finished = subprocess.run(
        [node, "-e", NODE_SRV_SCRIPT, f"127.0.0.1:{server.dns_port}", f"_http._tcp.node-svc.{ZONE}"],
        capture_output=True, text=True, timeout=15,
    )

    assert finished.returncode == 0, finished.stderr
    assert json.loads(finished.stdout) == [
        {"name": f"{instance['id']}.node-svc.{ZONE}", "port": tcp_listener.port, "priority": 1, "weight": 1}
    ]
