"""Real unbound and dnsmasq, configured from the snippets in dns/, resolving LogPose names.

Each resolver runs in the foreground as the current user on a free loopback
port, with the snippet's LogPose address changed to the test server's port and
nothing else changed in it. The lines around the snippet keep the resolver on
loopback: it sends no query to any other address.
"""

from __future__ import annotations

import grp
import os
import pwd
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from conftest import ServerProcess, free_port
from test_dns_clients import register_healthy, require_program

DNS_DIR = Path(__file__).parent.parent / "dns"
ZONE = "logpose.internal"
SNIPPET_PORT = "8653"  # the LogPose DNS port written in every snippet
RESOLVER_STARTUP_TIMEOUT = 10.0  # seconds

# Every IPv4 network except 127.0.0.0/8, so unbound may reach LogPose on
# loopback and nothing else, not even the root servers it would prime from.
NOT_LOOPBACK_IPV4 = [
    "0.0.0.0/2", "64.0.0.0/3", "96.0.0.0/4", "112.0.0.0/5", "120.0.0.0/6", "124.0.0.0/7", "126.0.0.0/8",
    "128.0.0.0/1",
]
# The root zone's key-signing key 20326 as a DS record (IANA's root trust
# anchor), so unbound validates as a default install does and the snippet's
# domain-insecure line is needed and tested.
ROOT_TRUST_ANCHOR = ". DS 20326 8 2 E06D44B80B8F1D39A95C0B0D7C65D08458E880409BBC683457104237C7F8EC8D"


def snippet_for(name: str, dns_port: int) -> str:
    """Return the snippet dns/``name`` with LogPose's port replaced by ``dns_port``."""
    text = (DNS_DIR / name).read_text()
    assert text.count(SNIPPET_PORT) == 1, f"dns/{name} should name port {SNIPPET_PORT} exactly once"
    return text.replace(SNIPPET_PORT, str(dns_port))


def unbound_config(directory: Path, port: int, dns_port: int) -> str:
    safety = "\n".join(f"    do-not-query-address: {network}" for network in NOT_LOOPBACK_IPV4)
    return f"""server:
    interface: 127.0.0.1@{port}
    do-daemonize: no
    username: ""
    chroot: ""
    directory: "{directory}"
    pidfile: ""
    use-syslog: no
    logfile: ""
    verbosity: 1
    do-ip6: no
    outgoing-interface: 127.0.0.1
{safety}
    module-config: "validator iterator"
    trust-anchor: "{ROOT_TRUST_ANCHOR}"

remote-control:
    control-enable: no

{snippet_for("unbound.conf", dns_port)}"""


def start_unbound(directory: Path, port: int, dns_port: int) -> list[str]:
    unbound = require_program("unbound", "unbound")
    config = directory / "unbound.conf"
    config.write_text(unbound_config(directory, port, dns_port))
    checked = subprocess.run(
        [require_program("unbound-checkconf", "unbound"), str(config)], capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    return [unbound, "-d", "-c", str(config)]


def start_dnsmasq(directory: Path, port: int, dns_port: int) -> list[str]:
    dnsmasq = require_program("dnsmasq", "dnsmasq-base")
    config = directory / "dnsmasq.conf"
    config.write_text(snippet_for("dnsmasq.conf", dns_port))
    return [
        dnsmasq,
        "--keep-in-foreground",
        "--log-facility=-",
        f"--conf-file={config}",
        # No upstream servers from /etc/resolv.conf and no /etc/hosts: the
        # snippet's server= line is the only place a query goes.
        "--no-resolv",
        "--no-hosts",
        f"--port={port}",
        "--listen-address=127.0.0.1",
        "--bind-interfaces",
        f"--pid-file={directory / 'dnsmasq.pid'}",
        f"--user={pwd.getpwuid(os.getuid()).pw_name}",
        f"--group={grp.getgrgid(os.getgid()).gr_name}",
        # Drops private and loopback addresses in answers except where the
        # snippet allows them, as many installations do.
        "--stop-dns-rebind",
    ]


def query(port: int, name: str, rdtype: str, timeout: float = 2.0) -> dns.message.Message:
    return dns.query.udp(dns.message.make_query(name, rdtype), "127.0.0.1", port=port, timeout=timeout)


@pytest.fixture
def resolver(tmp_path) -> Iterator[Callable[[Callable[[Path, int, int], list[str]], ServerProcess], int]]:
    """Start a resolver with a command builder for a LogPose server; return its port. Stopped at the end."""
    processes: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(command_builder: Callable[[Path, int, int], list[str]], server: ServerProcess) -> int:
        directory = tmp_path / "resolver"
        directory.mkdir()
        port = free_port()
        command = command_builder(directory, port, server.dns_port)
        log_path = directory / "resolver.log"
        with log_path.open("ab") as log:
            process = subprocess.Popen(command, stdout=log, stderr=log)
        processes.append((process, log_path))
        deadline = time.monotonic() + RESOLVER_STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"{command[0]} exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                query(port, ZONE, "SOA", timeout=0.5)
                return port
            except (dns.exception.Timeout, OSError):
                time.sleep(0.1)
        raise AssertionError(f"{command[0]} did not answer within {RESOLVER_STARTUP_TIMEOUT} s:\n{log_path.read_text()}")

    yield start
    for process, _log_path in processes:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.parametrize("command_builder", [start_unbound, start_dnsmasq], ids=["unbound", "dnsmasq"])
def test_resolver_answers_srv_and_a(server, api, tcp_listener, resolver, command_builder):
    instance = register_healthy(server, api, "resolved-svc", tcp_listener)
    target = f"{instance['id']}.resolved-svc.{ZONE}."
    port = resolver(command_builder, server)

    srv = query(port, f"_http._tcp.resolved-svc.{ZONE}", "SRV")
    address = query(port, f"resolved-svc.{ZONE}", "A")
    target_address = query(port, target, "A")

    assert srv.rcode() == dns.rcode.NOERROR, srv.to_text()
    [srv_records] = [rrset for rrset in srv.answer if rrset.rdtype == dns.rdatatype.SRV]
    assert [(record.port, record.target.to_text()) for record in srv_records] == [(tcp_listener.port, target)]
    assert address.rcode() == dns.rcode.NOERROR, address.to_text()
    assert [record.address for rrset in address.answer for record in rrset] == ["127.0.0.1"]
    assert [record.address for rrset in target_address.answer for record in rrset] == ["127.0.0.1"]


@pytest.mark.parametrize("command_builder", [start_unbound, start_dnsmasq], ids=["unbound", "dnsmasq"])
def test_resolver_passes_on_nxdomain(server, resolver, command_builder):
    port = resolver(command_builder, server)

    answer = query(port, f"no-such-svc.{ZONE}", "SRV")

    assert answer.rcode() == dns.rcode.NXDOMAIN, answer.to_text()


def test_dns_folder_is_not_a_python_package():
    # A package named dns would shadow dnspython.
    assert not (DNS_DIR / "__init__.py").exists()


@pytest.mark.parametrize("name", ["resolved.conf", "dnsmasq.conf", "unbound.conf", "Corefile", "named.conf"])
def test_snippet_points_at_logpose(name):
    text = (DNS_DIR / name).read_text()

    assert ZONE in text
    assert "127.0.0.1" in text
    assert text.count(SNIPPET_PORT) == 1
