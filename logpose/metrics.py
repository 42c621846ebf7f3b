"""Prometheus metrics of one server: every metric object lives here, in a registry of its own.

The front ends, the prober and the store report through the small methods and
hooks of ``Metrics``. The catalog's gauges (instances by health, the
mass-failure guard, the change index) are read from the registry at scrape
time, so a scrape shows the current catalog and they cost nothing between
scrapes. Label values come from closed sets (known query types, route
patterns, standard methods), so no client can grow the number of series.
"""

from __future__ import annotations

import bisect
import contextlib
import time
from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString

from logpose.model import Health
from logpose.registry import Change, ChangeKind, Registry

if TYPE_CHECKING:
    from logpose.nameserver.answer import Responder
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
# DNS responses are tallied by raw (transport, type, code) numbers. Past this many
# distinct ones the tally is folded into label names, which form a closed set.
MAX_DNS_RAW_KEYS = 1000


class Metrics:
    """The metric objects of one server, and the hooks that feed them.

    ``registry`` is the LogPose catalog. Methods are called on the event loop's
    thread, and so is ``render``, because the DNS and HTTP tallies take no locks.
    """

    def __init__(self, registry: Registry) -> None:
        self.collectors = CollectorRegistry()
        collectors = self.collectors
        self.dns = DnsTally()
        collectors.register(self.dns)
        self.http = HttpTally()
        collectors.register(self.http)
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
        # Both children made once: labels() takes a lock and builds a key on every call.
        self._registrations_created = self.registrations.labels("created")
        self._registrations_updated = self.registrations.labels("updated")
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

    def watch_responder(self, responder: Responder) -> None:
        """Count and time every response that ``responder`` returns."""
        responder.observe = self.dns.observe

    @contextlib.contextmanager
    def time_commit(self, size: int) -> Iterator[None]:
        """Time one store transaction that commits ``size`` writes."""
        self.commit_batch_size.observe(size)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.commit_seconds.observe(time.perf_counter() - started)

    def observe_http(self, method: str, route: str | None, status: int, seconds: float) -> None:
        """Count and time one HTTP request; ``route`` is the matched pattern, None when none matched."""
        self.http.observe(method, route, status, seconds)

    def observe_registration(self, created: bool) -> None:
        (self._registrations_created if created else self._registrations_updated).inc()

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


class HttpTally:
    """Counts and times HTTP requests with plain numbers, exported at scrape time.

    ``observe`` runs once per request, so like ``DnsTally`` it only adds to
    dictionaries and a list. Methods outside HTTP_METHODS count as "other" and
    routes are patterns, so the keys form a closed set. ``collect`` copies the
    tallies before reading them and is meant to run on the event loop's thread,
    as ``observe`` does, so a histogram is never read half updated.
    """

    def __init__(self) -> None:
        self._requests: dict[tuple[str, str, int], int] = {}  # by (method, route, status)
        self._timings: dict[tuple[str, str], _Histogram] = {}  # by (method, route)

    def observe(self, method: str, route: str | None, status: int, seconds: float) -> None:
        """Count one request whose response had ``status`` and took ``seconds``; ``route`` is None when none matched."""
        if method not in HTTP_METHODS:
            method = "other"
        if route is None:
            route = UNMATCHED_ROUTE
        requests = self._requests
        key = (method, route, status)
        requests[key] = requests.get(key, 0) + 1
        timing = self._timings.get((method, route))
        if timing is None:
            timing = self._timings[(method, route)] = _Histogram(HTTP_SECONDS_BUCKETS)
        timing.buckets[bisect.bisect_left(HTTP_SECONDS_BUCKETS, seconds)] += 1
        timing.seconds += seconds

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "logpose_http_requests", "HTTP requests answered, by method, route pattern and status",
            labels=("method", "route", "status"),
        )
        for (method, route, status), count in dict(self._requests).items():
            requests.add_metric((method, route, str(status)), count)
        yield requests
        durations = HistogramMetricFamily(
            "logpose_http_request_seconds", "Time to answer an HTTP request, by method and route pattern",
            labels=("method", "route"),
        )
        for labels, timing in dict(self._timings).items():
            durations.add_metric(labels, timing.cumulative(), timing.seconds)
        yield durations


class _Histogram:
    """A histogram in plain numbers: a count per bucket bound, one count above the last, and the sum.

    Callers on a hot path add to ``buckets`` and ``seconds`` themselves, with
    ``bisect_left(bounds, value)`` as the index, which saves a method call.
    """

    __slots__ = ("bounds", "buckets", "seconds")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.buckets = [0] * (len(bounds) + 1)
        self.seconds = 0.0

    def cumulative(self) -> list[tuple[str, int]]:
        """Return the (upper bound, count at or below it) pairs of the exposition format, ending with +Inf."""
        total = 0
        pairs = []
        for bound, count in zip((*self.bounds, float("inf")), self.buckets):
            total += count
            pairs.append((floatToGoString(bound), total))
        return pairs


class DnsTally:
    """Counts and times DNS responses with plain numbers, exported at scrape time.

    ``observe`` runs once per DNS response, the server's hottest path, so it only
    adds to a dictionary and a list: prometheus-client's labelled children take a
    lock per call and its histogram searches its buckets in Python. Query types
    and response codes are turned into label values (``QUERY_TYPE_NAMES``,
    ``RCODE_NAMES``, else "other") when the tally is folded, at scrape time or
    when MAX_DNS_RAW_KEYS distinct numbers have come in.
    """

    def __init__(self) -> None:
        self._raw: dict[tuple[str, int | None, int], int] = {}
        self._named: dict[tuple[str, str, str], int] = {}
        self._timing = _Histogram(DNS_SECONDS_BUCKETS)

    def observe(self, transport: str, qtype: int | None, rcode: int, seconds: float) -> None:
        """Count one response to a query of type ``qtype`` (None: no question) that took ``seconds``."""
        key = (transport, qtype, rcode)
        raw = self._raw
        count = raw.get(key)
        if count is None and len(raw) >= MAX_DNS_RAW_KEYS:
            self._fold()
        raw[key] = (count or 0) + 1
        timing = self._timing
        timing.buckets[bisect.bisect_left(DNS_SECONDS_BUCKETS, seconds)] += 1
        timing.seconds += seconds

    def take(self) -> tuple[dict[tuple[str, int | None, int], int], list[int], float] | None:
        """Return the raw counts, bucket counts and seconds observed since the last call, or None without any.

        A DNS worker process takes its tally this way and the server ``merge``s it.
        """
        if not self._raw:
            return None
        tally = (self._raw, self._timing.buckets, self._timing.seconds)
        self._raw = {}
        self._timing = _Histogram(DNS_SECONDS_BUCKETS)
        return tally

    def merge(self, raw: dict[tuple[str, int | None, int], int], buckets: list[int], seconds: float) -> None:
        """Add what another tally's ``take`` returned."""
        for key, count in raw.items():
            if key not in self._raw and len(self._raw) >= MAX_DNS_RAW_KEYS:
                self._fold()
            self._raw[key] = self._raw.get(key, 0) + count
        timing = self._timing
        for position, count in enumerate(buckets[: len(timing.buckets)]):
            timing.buckets[position] += count
        timing.seconds += seconds

    def counts(self) -> dict[tuple[str, str, str], int]:
        """Responses so far by (transport, query type name, response code name)."""
        self._fold()
        return dict(self._named)

    def collect(self) -> Iterator[Metric]:
        queries = CounterMetricFamily(
            "logpose_dns_queries", "DNS queries answered, by transport, query type and response code",
            labels=("transport", "qtype", "rcode"),
        )
        for labels, count in self.counts().items():
            queries.add_metric(labels, count)
        yield queries
        yield HistogramMetricFamily(
            "logpose_dns_response_seconds", "Time from a DNS query to its response leaving the responder",
            buckets=self._timing.cumulative(), sum_value=self._timing.seconds,
        )

    def _fold(self) -> None:
        named = self._named
        for (transport, qtype, rcode), count in self._raw.items():
            label = (
                transport,
                "none" if qtype is None else QUERY_TYPE_NAMES.get(qtype, "other"),
                RCODE_NAMES.get(rcode, "other"),
            )
            named[label] = named.get(label, 0) + count
        self._raw.clear()


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


__all__ = ["DnsTally", "HttpTally", "Metrics"]
