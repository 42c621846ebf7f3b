"""The health prober: TCP connect and HTTP GET checks, reported to the registry.

Each probed instance has its own schedule. A new instance, or one whose
address or check changed, is probed at once; later probes follow its interval
with jitter, so instances registered together do not stay probed in one burst.
The prober only calls Registry methods: the registry applies rise/fall,
persists transitions and notifies both front ends.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import os
import random
import ssl
import time
from typing import Callable

import aiohttp

from logpose.health import HealthDefaults
from logpose.log import prober_log
from logpose.model import MAX_OUTPUT_LENGTH, CheckType, Instance
from logpose.registry import Change, ChangeKind, Registry

# Bytes of an HTTP check's response body kept in its output.
HTTP_BODY_EXCERPT = 512
# The first follow-up probe lands at a random point of this share of the
# interval, which spreads instances registered (or loaded) together.
FIRST_SPREAD = (0.5, 1.0)
# Later probes wander by this share of the interval either way.
JITTER = 0.05


class Prober:
    """Probe every instance with a ``tcp`` or ``http`` check on its own schedule.

    At most ``concurrency`` probes are in flight; each gives up after its
    check's timeout (or the server default).
    """

    def __init__(self, registry: Registry, *, concurrency: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._registry = registry
        self._defaults: HealthDefaults = registry.health_defaults
        self._concurrency = concurrency
        self._slots = asyncio.Semaphore(concurrency)
        self._clock = clock
        # Heap of (due time, sequence, instance id, generation); an entry whose
        # generation is no longer current belongs to a replaced schedule.
        self._schedule: list[tuple[float, int, str, int]] = []
        self._generations: dict[str, int] = {}
        self._sequence = itertools.count()
        self._wake = asyncio.Event()
        # Strong references: the event loop keeps only weak ones to tasks.
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self.in_flight = 0
        self.probes_done = 0
        self.observe_duration: Callable[[float], None] = lambda seconds: None  # metrics hook: each probe's seconds

    async def run(self) -> None:
        """Probe until cancelled."""
        unsubscribe = self._registry.subscribe(self._on_change)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._concurrency, force_close=True),
            auto_decompress=False,
        )
        for instance in self._registry.instances():
            self._plan(instance.id, self._clock())
        prober_log.info(
            "Prober started: default interval %.3g s, timeout %.3g s, %d probe(s) in flight at most",
            self._defaults.interval, self._defaults.timeout, self._concurrency,
        )
        try:
            await self._dispatch()
        finally:
            unsubscribe()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._session.close()
            prober_log.info("Prober stopped")

    async def _dispatch(self) -> None:
        while True:
            now = self._clock()
            while self._schedule and self._schedule[0][0] <= now:
                _due, _sequence, instance_id, generation = heapq.heappop(self._schedule)
                if self._generations.get(instance_id) != generation:
                    continue
                instance = self._registry.get_instance(instance_id)
                if instance is None or not instance.check.is_probed:
                    self._generations.pop(instance_id, None)
                    continue
                # Waiting for a slot here is the back-pressure that bounds probes in flight.
                await self._slots.acquire()
                task = asyncio.get_running_loop().create_task(self._probe(instance, generation))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                now = self._clock()
            self._wake.clear()
            delay = self._schedule[0][0] - now if self._schedule else None
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except asyncio.TimeoutError:
                pass

    def reconfigure(self, concurrency: int) -> None:
        """Take the registry's current check defaults and a new limit of probes in flight.

        A probe planned later than one new interval from now moves to a random
        point within that interval. A lower limit applies as running probes
        finish. NOTE: the connection pool of HTTP checks keeps the limit it was
        created with, until the prober restarts.
        """
        self._defaults = self._registry.health_defaults
        loop = asyncio.get_running_loop()
        for _ in range(concurrency - self._concurrency):
            self._slots.release()
        for _ in range(self._concurrency - concurrency):
            # A slot taken and never released lowers the limit by one.
            task = loop.create_task(self._slots.acquire())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._concurrency = concurrency

        now = self._clock()
        for due, _sequence, instance_id, generation in list(self._schedule):
            instance = self._registry.get_instance(instance_id)
            if instance is None or self._generations.get(instance_id) != generation:
                continue
            interval = self._defaults.interval_of(instance.check)
            if due > now + interval:
                self._plan(instance_id, now + random.uniform(0, interval))

    def _plan(self, instance_id: str, due: float) -> None:
        """Replace the instance's schedule with one probe at ``due`` (monotonic seconds)."""
        generation = self._generations.get(instance_id, 0) + 1
        self._generations[instance_id] = generation
        heapq.heappush(self._schedule, (due, next(self._sequence), instance_id, generation))
        self._wake.set()

    def _on_change(self, change: Change) -> None:
        if change.instance_id is None:
            return
        if change.kind is ChangeKind.INSTANCE_DELETE:
            self._generations.pop(change.instance_id, None)
        elif change.kind is ChangeKind.INSTANCE_UPSERT:
            instance = self._registry.get_instance(change.instance_id)
            if instance is not None and instance.check.is_probed and instance.output == "":
                # New, or its address or check changed (which cleared the output): probe at once.
                self._plan(instance.id, self._clock())
            elif instance is not None and instance.check.is_probed and instance.id not in self._generations:
                self._plan(instance.id, self._clock())

    async def _probe(self, instance: Instance, generation: int) -> None:
        self.in_flight += 1
        started = self._clock()
        try:
            timeout = self._defaults.timeout_of(instance.check)
            if instance.check.type is CheckType.HTTP:
                passed, output = await probe_http(self._session, instance, timeout)
            else:
                passed, output = await probe_tcp(instance.address.host, instance.address.port, timeout)
        except Exception as exc:  # a bug in a probe must not stop the others
            prober_log.exception("Probe of instance %s at %s failed unexpectedly", instance.id, instance.address)
            passed, output = False, f"probe error: {exc!r}"
        finally:
            self.in_flight -= 1
            self._slots.release()
        self.probes_done += 1
        self.observe_duration(self._clock() - started)

        if self._generations.get(instance.id) != generation:
            return  # deregistered or re-planned while probing: the result is about an old check
        current = self._registry.get_instance(instance.id)
        if current is None or current.address != instance.address or current.check != instance.check:
            return
        first = current.output == ""
        self._registry.record_check_result(instance.id, passed, output[:MAX_OUTPUT_LENGTH])
        interval = self._defaults.interval_of(current.check)
        spread = random.uniform(*FIRST_SPREAD) if first else 1 + random.uniform(-JITTER, JITTER)
        self._plan_after(instance.id, generation, started + interval * spread)

    def _plan_after(self, instance_id: str, generation: int, due: float) -> None:
        heapq.heappush(self._schedule, (due, next(self._sequence), instance_id, generation))
        self._wake.set()


async def probe_tcp(host: str, port: int, timeout: float) -> tuple[bool, str]:
    """Open and close a TCP connection; return whether it succeeded and a one-line output."""
    target = _format_target(host, port)
    started = time.monotonic()
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except asyncio.TimeoutError:
        return False, f"TCP connect to {target} timed out after {timeout:g} s"
    except OSError as exc:
        # asyncio's own loop puts "Connect call failed" in strerror; the errno is the useful part.
        detail = os.strerror(exc.errno) if exc.errno else str(exc)
        return False, f"TCP connect to {target} failed: {detail}"
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass  # the peer reset the connection we were closing anyway
    return True, f"TCP connect to {target} succeeded in {(time.monotonic() - started) * 1000:.1f} ms"


async def probe_http(session: aiohttp.ClientSession | None, instance: Instance, timeout: float) -> tuple[bool, str]:
    """GET the check's path; healthy on the expected status, or any 2xx when none is set."""
    assert session is not None
    check = instance.check
    url = f"{check.scheme}://{_format_target(instance.address.host, instance.address.port)}{check.path}"
    ssl_context: ssl.SSLContext | bool = True if check.tls_verify else False
    started = time.monotonic()
    try:
        async with session.get(
            url,
            timeout=aiohttp.ClientTimeout(total=timeout),
            allow_redirects=False,
            ssl=ssl_context,
            headers={"User-Agent": "LogPose health check"},
        ) as response:
            body = await response.content.read(HTTP_BODY_EXCERPT)
            status = response.status
            reason = response.reason or ""
    except asyncio.TimeoutError:
        return False, f"HTTP GET {url} timed out after {timeout:g} s"
    except aiohttp.ClientError as exc:
        return False, f"HTTP GET {url} failed: {exc}"
    elapsed = (time.monotonic() - started) * 1000
    passed = status == check.expected_status if check.expected_status is not None else 200 <= status < 300
    excerpt = body.decode("utf-8", "replace").strip()
    output = f"HTTP GET {url}: {status} {reason} in {elapsed:.1f} ms"
    return passed, f"{output}: {excerpt}" if excerpt else output


def _format_target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


__all__ = ["Prober", "probe_http", "probe_tcp"]
