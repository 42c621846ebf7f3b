"""The health prober: TCP connect checks and TTL expiry, reported to the registry.

The prober only calls Registry methods; the registry applies the rise/fall
thresholds, persists transitions and notifies both front ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from logpose.log import prober_log
from logpose.model import CheckType, Health, Instance
from logpose.registry import Change, ChangeKind, Registry

# How often TTL deadlines are looked at, in seconds, at most.
TTL_SWEEP_PERIOD = 1.0


class Prober:
    """Probe every instance with a ``tcp`` check each ``interval`` seconds.

    New and changed instances are probed at once. At most ``concurrency``
    probes are in flight; each gives up after ``timeout`` seconds.
    """

    def __init__(self, registry: Registry, *, interval: float, timeout: float, concurrency: int) -> None:
        self._registry = registry
        self._interval = interval
        self._timeout = timeout
        self._concurrency = concurrency
        self._slots = asyncio.Semaphore(concurrency)
        # Strong references: the event loop keeps only weak ones to tasks.
        self._tasks: set[asyncio.Task[None]] = set()
        self._unsubscribe: Callable[[], None] = lambda: None

    async def run(self) -> None:
        """Probe until cancelled."""
        self._unsubscribe = self._registry.subscribe(self._on_change)
        prober_log.info(
            "Prober started: interval %.3g s, timeout %.3g s, %d probe(s) in flight at most",
            self._interval, self._timeout, self._concurrency,
        )
        try:
            await asyncio.gather(self._probe_rounds(), self._sweep_ttl_deadlines())
        finally:
            self._unsubscribe()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            prober_log.info("Prober stopped")

    async def _probe_rounds(self) -> None:
        while True:
            started = time.monotonic()
            targets = [i for i in self._registry.instances() if i.check.type is CheckType.TCP]
            await asyncio.gather(*(self._probe(instance) for instance in targets))
            elapsed = time.monotonic() - started
            if prober_log.isEnabledFor(logging.DEBUG):
                prober_log.debug("Probe round of %d instance(s) took %.3f s", len(targets), elapsed)
            await asyncio.sleep(max(0.0, self._interval - elapsed))

    async def _sweep_ttl_deadlines(self) -> None:
        while True:
            await asyncio.sleep(min(TTL_SWEEP_PERIOD, self._interval))
            now = time.time()
            for instance in self._registry.instances():
                if instance.check.type is not CheckType.TTL or instance.health is Health.UNHEALTHY:
                    continue
                last_report = self._registry.last_report_at(instance.id) or instance.registered_at
                if now - last_report > (instance.check.ttl or 0):
                    self._registry.expire_ttl(
                        instance.id, f"no health report for {now - last_report:.1f} s (ttl {instance.check.ttl:g} s)"
                    )

    def _on_change(self, change: Change) -> None:
        if change.kind is not ChangeKind.INSTANCE_UPSERT or change.instance_id is None:
            return
        instance = self._registry.get_instance(change.instance_id)
        if instance is not None and instance.check.type is CheckType.TCP and instance.health is Health.UNKNOWN:
            task = asyncio.get_running_loop().create_task(self._probe(instance))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _probe(self, instance: Instance) -> None:
        async with self._slots:
            passed, output = await probe_tcp(instance.address.host, instance.address.port, self._timeout)
        current = self._registry.get_instance(instance.id)
        # The instance may have been deregistered or re-registered elsewhere while probing.
        if current is None or current.address != instance.address or current.check != instance.check:
            return
        self._registry.record_check_result(instance.id, passed, output)


async def probe_tcp(host: str, port: int, timeout: float) -> tuple[bool, str]:
    """Open and close a TCP connection; return whether it succeeded and a one-line output."""
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    started = time.monotonic()
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except asyncio.TimeoutError:
        return False, f"TCP connect to {target} timed out after {timeout:g} s"
    except OSError as exc:
        return False, f"TCP connect to {target} failed: {exc.strerror or exc}"
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass  # the peer reset the connection we were closing anyway
    return True, f"TCP connect to {target} succeeded in {(time.monotonic() - started) * 1000:.1f} ms"
