"""GET /metrics after real DNS, HTTP and probe traffic against a real server process."""

from __future__ import annotations

import uuid
from typing import Iterator

import dns.flags
import dns.message
import dns.query
import dns.rcode
import httpx
import pytest
from dnslib import EDNS0, RCODE, DNSRecord
from prometheus_client.parser import text_string_to_metric_families

from conftest import ServerProcess, TcpListener, wait_until
from logpose.metrics import DnsTally, HttpTally, Metrics
from logpose.nameserver.cache import describe_response
from logpose.registry import Registry

ZONE = "logpose.internal"
TIMEOUT = 10.0  # seconds for a probe result to show; the test server probes every 0.5 s


class Scrape:
    """One parsed exposition: look samples up by name and labels."""

    def __init__(self, text: str) -> None:
        self.samples = [sample for family in text_string_to_metric_families(text) for sample in family.samples]

    def value(self, name: str, **labels: str) -> float:
        """Return the sample's value, or 0 when the series does not exist yet."""
        for sample in self.samples:
            if sample.name == name and all(sample.labels.get(key) == value for key, value in labels.items()):
                return sample.value
        return 0.0

    def label_values(self, name: str, label: str) -> set[str]:
        return {sample.labels[label] for sample in self.samples if sample.name == name and label in sample.labels}


class Traffic:
    """The module's server after a registration, a probe transition, DNS queries and HTTP requests."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.api = server.client()
        self.listener = TcpListener()
        body = {"address": self.listener.address, "protocol": "Tcp", "check": {"type": "tcp"}}
        created = self.api.post("/api/services/metered/instances", json=body)
        assert created.status_code == 201, created.text
        self.instance_id = created.json()["id"]
        healthy = wait_until(lambda: self.health() == "Healthy", TIMEOUT)
        assert healthy, f"instance never turned Healthy: {self.health()}"
        # Updated only once Healthy: an update that races the first probe result
        # puts back the health it read before its commit, a registry bug that
        # would add a second Unknown-to-Healthy transition.
        updated = self.api.post("/api/services/metered/instances", json={**body, "tags": ["blue"]})
        assert updated.status_code == 200, updated.text

    def health(self) -> str:
        return self.api.get(f"/api/instances/{self.instance_id}").json()["health"]

    def query(self, name: str, qtype: str, *, tcp: bool = False) -> dns.message.Message:
        message = dns.message.make_query(name, qtype)
        send = dns.query.tcp if tcp else dns.query.udp
        return send(message, "127.0.0.1", port=self.server.dns_port, timeout=5)

    def scrape(self, headers: dict[str, str] | None = None) -> httpx.Response:
        answer = self.api.get("/metrics", headers=headers)
        assert answer.status_code == 200, answer.text
        return answer

    def close(self) -> None:
        self.listener.close()
        self.api.close()


@pytest.fixture(scope="module")
def traffic(tmp_path_factory) -> Iterator[Traffic]:
    server = ServerProcess(tmp_path_factory.mktemp("metrics") / "data").start()
    state = Traffic(server)
    yield state
    state.close()
    server.stop()


# ----- the real server ------------------------------------------------------------

def test_metrics_need_token(traffic):
    answer = httpx.get(traffic.server.url + "/metrics", timeout=10)
    assert answer.status_code == 401
    assert answer.headers["content-type"].startswith("application/problem+json")


def test_dns_queries_by_type_and_rcode(traffic):
    assert traffic.query(f"metered.{ZONE}", "A").rcode() == dns.rcode.NOERROR
    assert traffic.query(f"metered.{ZONE}", "SRV").rcode() == dns.rcode.NOERROR
    assert traffic.query(f"missing.{ZONE}", "AAAA").rcode() == dns.rcode.NXDOMAIN
    assert traffic.query("example.org", "TXT").rcode() == dns.rcode.REFUSED
    assert traffic.query(f"metered.{ZONE}", "SRV", tcp=True).rcode() == dns.rcode.NOERROR
    # The same question again comes from the responder's wire cache, and still counts.
    assert traffic.query(f"metered.{ZONE}", "A").rcode() == dns.rcode.NOERROR

    scrape = Scrape(traffic.scrape().text)
    queries = "logpose_dns_queries_total"
    assert scrape.value(queries, transport="udp", qtype="A", rcode="NOERROR") >= 2
    assert scrape.value(queries, transport="udp", qtype="SRV", rcode="NOERROR") >= 1
    assert scrape.value(queries, transport="udp", qtype="AAAA", rcode="NXDOMAIN") >= 1
    assert scrape.value(queries, transport="udp", qtype="TXT", rcode="REFUSED") >= 1
    assert scrape.value(queries, transport="tcp", qtype="SRV", rcode="NOERROR") >= 1
    assert scrape.value("logpose_dns_response_seconds_count") >= 6


def test_http_requests_by_route_pattern(traffic):
    assert traffic.api.get(f"/api/instances/{traffic.instance_id}").status_code == 200
    missing = str(uuid.uuid4())
    assert traffic.api.get(f"/api/instances/{missing}").status_code == 404
    assert traffic.api.get("/no/such/route").status_code == 404

    scrape = Scrape(traffic.scrape().text)
    requests = "logpose_http_requests_total"
    route = "/api/instances/{instance_id}"
    assert scrape.value(requests, method="GET", route=route, status="200") >= 1
    assert scrape.value(requests, method="GET", route=route, status="404") >= 1
    assert scrape.value(requests, method="GET", route="unmatched", status="404") >= 1
    assert scrape.value(requests, method="POST", route="/api/services/{code}/instances", status="201") == 1
    assert scrape.value("logpose_http_request_seconds_count", method="GET", route=route) >= 2
    routes = scrape.label_values(requests, "route")
    assert not any(traffic.instance_id in route or missing in route for route in routes), routes
    assert "/no/such/route" not in routes


def test_registrations_created_and_updated(traffic):
    scrape = Scrape(traffic.scrape().text)
    assert scrape.value("logpose_registrations_total", result="created") == 1
    assert scrape.value("logpose_registrations_total", result="updated") == 1


def test_catalog_and_prober_gauges(traffic):
    scrape = Scrape(traffic.scrape().text)
    assert scrape.value("logpose_instances", health="Healthy") == 1
    assert scrape.value("logpose_instances", health="Unhealthy") == 0
    assert scrape.value("logpose_services") == 1
    assert scrape.value("logpose_mass_failure_guard_active") == 0
    assert scrape.value("logpose_node_prober") == 1
    assert scrape.value("logpose_store_available") == 1
    assert scrape.value("logpose_probes_total") >= 1
    assert scrape.value("logpose_probe_seconds_count") >= 1
    assert "logpose_probes_in_flight" in {sample.name for sample in scrape.samples}
    assert scrape.value("logpose_store_commit_seconds_count") >= 2
    assert scrape.value("logpose_store_commit_batch_size_count") >= 2


def test_health_transitions_by_from_and_to(traffic):
    before = Scrape(traffic.scrape().text)
    assert before.value("logpose_health_transitions_total", **{"from": "Unknown", "to": "Healthy"}) == 1

    traffic.listener.close()
    assert wait_until(lambda: traffic.health() == "Unhealthy", TIMEOUT), "instance never turned Unhealthy"
    after = Scrape(traffic.scrape().text)
    assert after.value("logpose_health_transitions_total", **{"from": "Healthy", "to": "Unhealthy"}) == 1
    assert after.value("logpose_instances", health="Unhealthy") == 1
    assert after.value("logpose_instances", health="Healthy") == 0


def test_openmetrics_on_request(traffic):
    answer = traffic.scrape({"Accept": "application/openmetrics-text; version=1.0.0"})
    assert answer.headers["content-type"].startswith("application/openmetrics-text")
    assert answer.text.endswith("# EOF\n")
    plain = traffic.scrape()
    assert plain.headers["content-type"].startswith("text/plain")


# ----- without sockets --------------------------------------------------------------

@pytest.mark.parametrize(
    ("qtype", "rcode", "edns", "expected"),
    [
        ("A", RCODE.NOERROR, False, (1, 0)),
        ("SRV", RCODE.NXDOMAIN, True, (33, 3)),
        ("TYPE999", RCODE.REFUSED, False, (999, 5)),
        ("AAAA", 16, True, (28, 16)),
    ],
)
def test_response_labels_from_wire(qtype, rcode, edns, expected):
    reply = DNSRecord.question(f"svc.{ZONE}", qtype).reply()
    reply.header.rcode = rcode & 0xF
    if edns:
        reply.add_ar(EDNS0(udp_len=1232, ext_rcode=rcode >> 4))
    assert describe_response(bytes(reply.pack())) == expected


def test_response_labels_without_question():
    assert describe_response(b"\x12\x34\x81\x01" + bytes(8)) == (None, 1)
    assert describe_response(b"\x00") == (None, -1)


def test_dns_tally_names_numbers_and_stays_bounded():
    tally = DnsTally()
    tally.observe("udp", 1, 0, 0.00005)
    tally.observe("udp", 1, 0, 0.003)
    tally.observe("tcp", 999, 16, 0.2)
    tally.observe("udp", None, 1, 5.0)
    counts = tally.counts()
    assert counts == {
        ("udp", "A", "NOERROR"): 2,
        ("tcp", "other", "BADVERS"): 1,
        ("udp", "none", "FORMERR"): 1,
    }
    # Every query type a client can send is a distinct number: the raw tally folds
    # them into "other" instead of growing without bound.
    for qtype in range(300, 5300):
        tally.observe("udp", qtype, 0, 0.001)
    assert len(tally._raw) <= 1000
    assert tally.counts()[("udp", "other", "NOERROR")] == 5000

    scrape = Scrape(_render(tally))
    assert scrape.value("logpose_dns_queries_total", transport="udp", qtype="A", rcode="NOERROR") == 2
    assert scrape.value("logpose_dns_response_seconds_count") == 5004
    assert scrape.value("logpose_dns_response_seconds_bucket", le="0.0001") == 1
    assert scrape.value("logpose_dns_response_seconds_bucket", le="0.005") == 5002
    assert scrape.value("logpose_dns_response_seconds_bucket", le="2.5") == 5003
    assert scrape.value("logpose_dns_response_seconds_bucket", le="+Inf") == 5004
    assert scrape.value("logpose_dns_response_seconds_sum") == pytest.approx(0.00005 + 0.003 + 0.2 + 5.0 + 5.0)


def test_http_tally_counts_and_times():
    tally = HttpTally()
    tally.observe("GET", "/api/discover/{code}", 200, 0.0004)
    tally.observe("GET", "/api/discover/{code}", 200, 0.02)
    tally.observe("GET", "/api/discover/{code}", 404, 0.001)
    tally.observe("POST", None, 405, 12.0)

    scrape = Scrape(_render(tally))

    requests = "logpose_http_requests_total"
    route = "/api/discover/{code}"
    assert scrape.value(requests, method="GET", route=route, status="200") == 2
    assert scrape.value(requests, method="GET", route=route, status="404") == 1
    assert scrape.value(requests, method="POST", route="unmatched", status="405") == 1
    seconds = "logpose_http_request_seconds"
    assert scrape.value(f"{seconds}_count", method="GET", route=route) == 3
    assert scrape.value(f"{seconds}_bucket", method="GET", route=route, le="0.001") == 2
    assert scrape.value(f"{seconds}_bucket", method="GET", route=route, le="0.025") == 3
    assert scrape.value(f"{seconds}_bucket", method="POST", route="unmatched", le="10.0") == 0
    assert scrape.value(f"{seconds}_bucket", method="POST", route="unmatched", le="+Inf") == 1
    assert scrape.value(f"{seconds}_sum", method="GET", route=route) == pytest.approx(0.0214)


def _render(collector) -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()


def test_label_values_stay_bounded():
    metrics = Metrics(Registry(None))
    metrics.observe_http("BREW", None, 405, 0.001)
    scrape = Scrape(metrics.render(None)[0].decode())
    assert scrape.value("logpose_http_requests_total", method="other", route="unmatched", status="405") == 1
