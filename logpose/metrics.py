"""Prometheus metrics of one server: every metric object lives here, in a registry of its own.

The front ends, the prober and the store report through the small methods and
hooks of ``Metrics``. The catalog's gauges (instances by health, the
mass-failure guard, the change index) are read from the registry at scrape
time, so a scrape shows the current catalog and they cost nothing between
scrapes. Label values come from closed sets (known query types, route
patterns, standard methods), so no client can grow the number of series.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from logpose.model import Health
from logpose.registry import Change, ChangeKind, Registry

if TYPE_CHECKING:
    from logpose.nameserver.answer import ForwardedQuery, Responder
    from logpose.prober import Prober
    from logpose.store.sql import SqlStore

# Bucket bounds in seconds. DNS answers come from memory in well under a
# millisecond; forwarded queries wait for a recursor, up to its timeout.
DNS_SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
HTTP_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PROBE_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
COMMIT_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Writes per transaction; the store commits at most 256 writes at once.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# Query types by number (IANA DNS parameters); any other type is counted as "other".
QUERY_TYPE_NAMES = {
    1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA", 33: "SRV",
    35: "NAPTR", 43: "DS", 46: "RRSIG", 48: "DNSKEY", 64: "SVCB", 65: "HTTPS", 251: "IXFR", 252: "AXFR",
    255: "ANY", 257: "CAA",
}
RCODE_NAMES = {
    0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED", 16: "BADVERS",
}
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED_ROUTE = "unmatched"  # route label of a request that matched no route (404, 405)
MAX_CACHED_LABEL_SETS = 1000  # label sets whose metric children are kept

_DNS_HEADER_SIZE = 12
_OPT_TYPE = b"\x00\x29"
_OPT_WITHOUT_OPTIONS_SIZE = 11  # root name, type, class, TTL and a zero RDLENGTH


class Metrics:
    """The metric objects of one server, and the hooks that feed them.

    ``registry`` is the LogPose catalog. Methods are called on the event loop's
    thread; prometheus-client takes its own locks, so ``render`` may also run
    from another thread.
    """

    def __init__(self, registry: Registry) -> None:
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}  # see _child
        self.collectors = CollectorRegistry()
        collectors = self.collectors
        self.dns_queries = Counter(
            "logpose_dns_queries", "DNS queries answered, by transport, query type and response code",
            ("transport", "qtype", "rcode"), registry=collectors,
        )
        self.dns_seconds = Histogram(
            "logpose_dns_response_seconds", "Time from a DNS query to its response leaving the responder",
            buckets=DNS_SECONDS_BUCKETS, registry=collectors,
        )
        self.http_requests = Counter(
            "logpose_http_requests", "HTTP requests answered, by method, route pattern and status",
            ("method", "route", "status"), registry=collectors,
        )
        self.http_seconds = Histogram(
            "logpose_http_request_seconds", "Time to answer an HTTP request, by method and route pattern",
            ("method", "route"), buckets=HTTP_SECONDS_BUCKETS, registry=collectors,
        )
        self.registrations = Counter(
            "logpose_registrations", "Successful registrations over the HTTP API: created or updated instances",
            ("result",), registry=collectors,
        )
        self.health_transitions = Counter(
            "logpose_health_transitions", "Health transitions applied on this node, by health before and after",
            ("from", "to"), registry=collectors,
        )
        self.probe_seconds = Histogram(
            "logpose_probe_seconds", "Duration of one health probe, failed or not",
            buckets=PROBE_SECONDS_BUCKETS, registry=collectors,
        )
        self.commit_seconds = Histogram(
            "logpose_store_commit_seconds", "Duration of one store transaction that commits a batch of writes",
            buckets=COMMIT_SECONDS_BUCKETS, registry=collectors,
        )
        self.commit_batch_size = Histogram(
            "logpose_store_commit_batch_size", "Writes committed together in one store transaction",
            buckets=BATCH_SIZE_BUCKETS, registry=collectors,
        )
        for result in ("created", "updated"):
            self.registrations.labels(result)
        self._catalog = _CatalogCollector(registry)
        collectors.register(self._catalog)
        ProcessCollector(registry=collectors)
        PlatformCollector(registry=collectors)
        GCCollector(registry=collectors)

        self._registry = registry
        # Last health seen per instance, to label each transition with where it came from.
        self._health: dict[str, Health] = {instance.id: instance.health for instance in registry.instances()}
        registry.subscribe(self._on_change)

    # ----- hooks for the other modules ------------------------------------

    def watch_prober(self, prober: Prober) -> None:
        """Time each probe of ``prober`` and read its probes in flight at scrape time."""
        prober.observe_duration = self.probe_seconds.observe
        self._catalog.prober = prober

    def watch_store(self, store: SqlStore) -> None:
        """Time each batch commit of ``store`` and read its availability at scrape time."""
        store.batch_timer = self.time_commit
        self._catalog.store = store

    def measure_responder(self, responder: Responder) -> MeasuredResponder:
        """Return ``responder`` wrapped so that every response it returns is counted and timed."""
        return MeasuredResponder(responder, self)

    @contextlib.contextmanager
    def time_commit(self, size: int) -> Iterator[None]:
        """Time one store transaction that commits ``size`` writes."""
        self.commit_batch_size.observe(size)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.commit_seconds.observe(time.perf_counter() - started)

    def observe_dns(self, transport: str, response: bytes, seconds: float) -> None:
        """Count one DNS response, labelled from its own header and question, and time it."""
        qtype, rcode = _describe_response(response)
        self._child(self.dns_queries, (transport, qtype, rcode)).inc()
        self.dns_seconds.observe(seconds)

    def observe_http(self, method: str, route: str | None, status: int, seconds: float) -> None:
        """Count and time one HTTP request; ``route`` is the matched pattern, None when none matched."""
        method = method if method in HTTP_METHODS else "other"
        route = route if route is not None else UNMATCHED_ROUTE
        self._child(self.http_requests, (method, route, str(status))).inc()
        self._child(self.http_seconds, (method, route)).observe(seconds)

    def _child(self, metric: Any, labels: tuple[str, ...]) -> Any:
        """Return ``metric.labels(*labels)``, kept: labels() takes a lock and builds a key on every call.

        Label values come from fixed sets, so the number of children stays small;
        past MAX_CACHED_LABEL_SETS they are looked up each time instead of kept.
        """
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = metric.labels(*labels)
            if len(self._children) < MAX_CACHED_LABEL_SETS:
                self._children[key] = child
        return child

    def observe_registration(self, created: bool) -> None:
        self.registrations.labels("created" if created else "updated").inc()

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """Return the exposition in the format that the ``Accept`` header requests, and its content type."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.collectors), content_type

    # ----- registry changes -----------------------------------------------

    def _on_change(self, change: Change) -> None:
        if change.instance_id is None:
            if change.kind is ChangeKind.SERVICE_DELETE or change.service == "":
                # A deleted service took its instances along, and a reload replaced
                # the whole catalog: neither is a health transition, so resynchronise.
                self._health = {instance.id: instance.health for instance in self._registry.instances()}
            return
        instance = self._registry.get_instance(change.instance_id)
        if instance is None:
            self._health.pop(change.instance_id, None)
            return
        previous = self._health.get(instance.id)
        self._health[instance.id] = instance.health
        if change.kind is ChangeKind.HEALTH and previous is not None and previous is not instance.health:
            self.health_transitions.labels(previous.value, instance.health.value).inc()


class MeasuredResponder:
    """A ``Responder`` whose responses are counted and timed; the DNS transports use it unchanged.

    ``respond``, ``respond_cached`` and ``forward`` are wrapped, because they are
    where a response leaves the responder. A method that returns responses and
    is added there later must be wrapped here too, or its responses go uncounted. A forwarded query is
    counted once, when its forwarded response is returned, and timed from the
    start of ``forward``.
    """

    def __init__(self, responder: Responder, metrics: Metrics) -> None:
        self._responder = responder
        self._observe = metrics.observe_dns

    def __getattr__(self, name: str) -> object:
        # Everything else (settings, cache counters) is the wrapped responder's own.
        return getattr(self._responder, name)

    def respond(
        self, wire: bytes, transport: str, peer: str = "-", source: str | None = None
    ) -> bytes | ForwardedQuery | None:
        started = time.perf_counter()
        reply = self._responder.respond(wire, transport, peer, source)
        if type(reply) is bytes:
            self._observe(transport, reply, time.perf_counter() - started)
        return reply

    def respond_cached(self, wire: bytes, transport: str, source: str | None = None) -> bytes | None:
        started = time.perf_counter()
        reply = self._responder.respond_cached(wire, transport, source)
        if reply is not None:
            self._observe(transport, reply, time.perf_counter() - started)
        return reply

    async def forward(self, query: ForwardedQuery) -> bytes:
        started = time.perf_counter()
        reply = await self._responder.forward(query)
        self._observe(query.transport, reply, time.perf_counter() - started)
        return reply


def _describe_response(response: bytes) -> tuple[str, str]:
    """Return the query type and response code names of a DNS response this server packed.

    The question is the first name after the header and is never compressed
    (RFC 1035 §4.1.4 allows pointers only to earlier names). The response code's
    upper bits travel in the OPT record (RFC 6891 §6.1.3), which this server
    always packs last and without options.
    """
    if len(response) < _DNS_HEADER_SIZE:
        return "none", "other"
    rcode = response[3] & 0x0F
    if response[11] or response[10]:  # ARCOUNT > 0: the OPT record, if any, is the last record
        opt = response[-_OPT_WITHOUT_OPTIONS_SIZE:]
        if len(response) >= _DNS_HEADER_SIZE + _OPT_WITHOUT_OPTIONS_SIZE and opt[0] == 0 and opt[1:3] == _OPT_TYPE:
            rcode |= opt[5] << 4
    qtype = "none"
    if response[4] or response[5]:  # QDCOUNT > 0
        offset = _DNS_HEADER_SIZE
        while offset < len(response) and response[offset]:
            offset += response[offset] + 1
        if offset + 3 <= len(response):
            number = int.from_bytes(response[offset + 1:offset + 3], "big")
            qtype = QUERY_TYPE_NAMES.get(number, "other")
    return qtype, RCODE_NAMES.get(rcode, "other")


class _CatalogCollector:
    """Gauges read at scrape time from the registry, and from the prober and store when watched."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self.prober: Prober | None = None
        self.store: SqlStore | None = None

    def collect(self) -> Iterator[Metric]:
        registry = self._registry
        instances = registry.instances()
        counts = {health: 0 for health in Health}
        for instance in instances:
            counts[instance.health] += 1
        by_health = GaugeMetricFamily("logpose_instances", "Registered instances by health", labels=("health",))
        for health, count in counts.items():
            by_health.add_metric((health.value,), count)
        yield by_health
        yield GaugeMetricFamily(
            "logpose_instances_in_maintenance", "Instances taken out of discovery for maintenance",
            value=sum(1 for instance in instances if instance.in_maintenance),
        )
        yield GaugeMetricFamily("logpose_services", "Registered services", value=len(registry.services()))
        yield GaugeMetricFamily("logpose_catalog_index", "The registry's change index", value=registry.index)

        guard = registry.guard
        yield GaugeMetricFamily(
            "logpose_mass_failure_guard_active",
            "1 while the mass-failure guard holds instances at their last known health, else 0",
            value=int(guard.active),
        )
        yield CounterMetricFamily(
            "logpose_mass_failure_guard_engagements", "Times the mass-failure guard engaged since start",
            value=guard.engagements,
        )
        yield GaugeMetricFamily(
            "logpose_node_prober", "1 while this node runs the health probes, else 0", value=int(registry.node.prober)
        )
        if self.prober is not None:
            yield GaugeMetricFamily("logpose_probes_in_flight", "Health probes running now", value=self.prober.in_flight)
            yield CounterMetricFamily("logpose_probes", "Health probes finished since start", value=self.prober.probes_done)
        if self.store is not None:
            yield GaugeMetricFamily(
                "logpose_store_available", "1 while the database accepts writes, else 0", value=int(self.store.available)
            )


__all__ = ["Metrics", "MeasuredResponder"]
