"""The registry core: the whole catalog in memory, persisted through a store.

Reads are synchronous dictionary look-ups that never touch the database. Every
write validates, commits to the store, then applies to memory, bumps the change
index and notifies subscribers, in that order: when a write coroutine returns,
its change is durable. Health is the exception: it is soft state, applied to
memory at once and written behind, so probing goes on while the database is down.
"""

from __future__ import annotations

import asyncio
import enum
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Protocol as TypingProtocol

from logpose.errors import ConflictError, NotFoundError, StoreUnavailableError, ValidationError
from logpose.log import registry_log
from logpose.model import (
    Check,
    CheckType,
    Health,
    Instance,
    InstanceSpec,
    Service,
    registration_key,
)


class ChangeKind(enum.Enum):
    SERVICE_UPSERT = "service-upsert"
    SERVICE_DELETE = "service-delete"
    INSTANCE_UPSERT = "instance-upsert"
    INSTANCE_DELETE = "instance-delete"
    HEALTH = "health"


@dataclass(frozen=True, slots=True)
class Change:
    """One applied change; ``instance_id`` is None for changes to the service itself."""

    index: int
    kind: ChangeKind
    service: str
    instance_id: str | None = None


@dataclass(frozen=True, slots=True)
class HealthUpdate:
    instance_id: str
    health: Health
    output: str
    updated_at: float


@dataclass(slots=True)
class CatalogWrite:
    """Everything one store transaction commits, stamped with the new change index."""

    index: int
    upsert_services: list[Service] = field(default_factory=list)
    delete_services: list[str] = field(default_factory=list)
    upsert_instances: list[Instance] = field(default_factory=list)
    delete_instances: list[str] = field(default_factory=list)
    health_updates: list[HealthUpdate] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class CatalogSnapshot:
    services: list[Service]
    instances: list[Instance]
    index: int


class CatalogStore(TypingProtocol):
    """What the registry needs from persistence; ``logpose.store`` implements it."""

    async def load(self) -> CatalogSnapshot: ...

    async def commit(self, write: CatalogWrite) -> None:
        """Commit the write in one transaction, or raise StoreUnavailableError / ConflictError."""


Listener = Callable[[Change], None]


@dataclass(slots=True)
class _HealthCounter:
    successes: int = 0
    failures: int = 0


class Registry:
    """The catalog in memory with its change index.

    Returned ``Service`` and ``Instance`` objects are immutable snapshots; lists
    returned by the read methods are new lists the caller owns.
    """

    def __init__(self, store: CatalogStore | None, *, rise: int = 1, fall: int = 2) -> None:
        self._store = store
        self._rise = rise
        self._fall = fall
        self._index = 0
        self._services: dict[str, Service] = {}
        self._instances: dict[str, Instance] = {}
        self._by_service: dict[str, dict[str, Instance]] = {}
        self._by_key: dict[tuple[str, str, int, str], str] = {}
        self._counters: dict[str, _HealthCounter] = {}
        self._last_report: dict[str, float] = {}
        self._listeners: list[Listener] = []
        self._write_lock = asyncio.Lock()
        self._pending_health: dict[str, HealthUpdate] = {}
        self._health_dirty = asyncio.Event()

    # ----- loading -------------------------------------------------------

    async def load(self) -> None:
        """Replace memory with the store's catalog; call before any front end starts."""
        if self._store is None:
            return
        self.load_snapshot(await self._store.load())

    def load_snapshot(self, snapshot: CatalogSnapshot) -> None:
        """Replace memory with ``snapshot`` without writing anything or notifying."""
        self._services = {service.code: service for service in snapshot.services}
        self._by_service = {code: {} for code in self._services}
        self._instances = {}
        self._by_key = {}
        now = time.time()
        for instance in snapshot.instances:
            self._put_instance(instance)
            # A TTL check starts a fresh period at load, so a restart does not
            # expire every TTL instance before it had the chance to report.
            self._last_report[instance.id] = now
        self._index = snapshot.index

    # ----- reads ---------------------------------------------------------

    @property
    def index(self) -> int:
        """The change index: it grows with every applied change and never goes back."""
        return self._index

    def get_service(self, code: str) -> Service | None:
        return self._services.get(code)

    def services(self) -> list[Service]:
        return sorted(self._services.values(), key=lambda service: service.code)

    def get_instance(self, instance_id: str) -> Instance | None:
        return self._instances.get(instance_id)

    def instances(self) -> list[Instance]:
        return list(self._instances.values())

    def instances_of(self, code: str) -> list[Instance]:
        """Return every instance of the service, any health, in registration order."""
        return list(self._by_service.get(code, {}).values())

    def discoverable(self, code: str) -> list[Instance]:
        """Return the instances of the service that discovery may hand out (Healthy only)."""
        return [instance for instance in self._by_service.get(code, {}).values() if instance.health is Health.HEALTHY]

    def last_report_at(self, instance_id: str) -> float | None:
        """Return the Unix time of the last health report, or of registration or load."""
        return self._last_report.get(instance_id)

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` after each applied change; return a function that unsubscribes.

        Listeners run synchronously on the event loop and must not block.
        """
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    # ----- catalog writes (durable when they return) ----------------------

    async def create_service(self, code: str, name: str | None = None) -> Service:
        async with self._write_lock:
            if code in self._services:
                raise ConflictError(f"service {code!r} already exists")
            index = self._index + 1
            service = Service(code=code, name=name or code, created_index=index, modify_index=index)
            await self._commit(CatalogWrite(index, upsert_services=[service]))
            self._services[code] = service
            self._by_service[code] = {}
            self._apply(Change(index, ChangeKind.SERVICE_UPSERT, code))
            registry_log.info("Created service %s", code)
            return service

    async def delete_service(self, code: str, *, force: bool = False) -> list[str]:
        """Delete a service; with ``force`` its instances go too. Return their ids."""
        async with self._write_lock:
            if code not in self._services:
                raise NotFoundError(f"service {code!r} not found")
            instance_ids = list(self._by_service.get(code, {}))
            if instance_ids and not force:
                raise ConflictError(
                    f"service {code!r} still has {len(instance_ids)} instance(s); "
                    "deregister them first or delete with force"
                )
            index = self._index + 1
            await self._commit(CatalogWrite(index, delete_services=[code], delete_instances=instance_ids))
            for instance_id in instance_ids:
                self._drop_instance(instance_id)
            del self._services[code]
            self._by_service.pop(code, None)
            self._apply(Change(index, ChangeKind.SERVICE_DELETE, code))
            registry_log.info("Deleted service %s with %d instance(s)", code, len(instance_ids))
            return instance_ids

    async def register(self, code: str, spec: InstanceSpec) -> tuple[Instance, bool]:
        """Register an instance, or update the one with the same registration key.

        Return the instance and whether it was created. A missing service is
        created with its name equal to its code. An update keeps the health
        unless the check changed.
        """
        async with self._write_lock:
            index = self._index + 1
            now = time.time()
            write = CatalogWrite(index)
            service = self._services.get(code)
            if service is None:
                service = Service(code=code, name=code, created_index=index, modify_index=index)
                write.upsert_services.append(service)

            existing_id = self._by_key.get(registration_key(code, spec.address, spec.protocol))
            existing = self._instances.get(existing_id) if existing_id else None
            if existing is not None:
                keep_health = existing.check == spec.check and str(existing.address) == str(spec.address)
                instance = replace(
                    existing,
                    address=spec.address,
                    check=spec.check,
                    tags=spec.tags,
                    metadata=dict(spec.metadata),
                    weight=spec.weight,
                    health=existing.health if keep_health else Health.UNKNOWN,
                    output=existing.output if keep_health else "",
                    modify_index=index,
                    updated_at=now,
                )
            else:
                instance = Instance(
                    id=str(uuid.uuid4()),
                    service=code,
                    address=spec.address,
                    protocol=spec.protocol,
                    health=Health.UNKNOWN,
                    check=spec.check,
                    tags=spec.tags,
                    metadata=dict(spec.metadata),
                    weight=spec.weight,
                    created_index=index,
                    modify_index=index,
                    registered_at=now,
                    updated_at=now,
                )
            write.upsert_instances.append(instance)
            await self._commit(write)

            if write.upsert_services:
                self._services[code] = service
                self._by_service[code] = {}
                self._apply(Change(index, ChangeKind.SERVICE_UPSERT, code), bump=False)
            if existing is not None and existing.health != instance.health:
                self._counters.pop(instance.id, None)
            self._put_instance(instance)
            self._last_report.setdefault(instance.id, now)
            if existing is None or existing.check != instance.check:
                self._last_report[instance.id] = now
            self._apply(Change(index, ChangeKind.INSTANCE_UPSERT, code, instance.id))
            registry_log.info(
                "%s instance %s of %s at %s (%s)",
                "Registered" if existing is None else "Updated",
                instance.id, code, instance.address, instance.protocol.value,
            )
            return instance, existing is None

    async def deregister(self, instance_id: str) -> Instance:
        async with self._write_lock:
            instance = self._instances.get(instance_id)
            if instance is None:
                raise NotFoundError(f"instance {instance_id!r} not found")
            index = self._index + 1
            await self._commit(CatalogWrite(index, delete_instances=[instance_id]))
            self._drop_instance(instance_id)
            self._apply(Change(index, ChangeKind.INSTANCE_DELETE, instance.service, instance_id))
            registry_log.info("Deregistered instance %s of %s at %s", instance_id, instance.service, instance.address)
            return instance

    # ----- health (soft state, written behind) ----------------------------

    def report_health(self, instance_id: str, health: Health, output: str) -> Instance:
        """Record a health report from the instance itself; it counts as a check result."""
        if health is Health.UNKNOWN:
            raise ValidationError("status", "must be 'Healthy' or 'Unhealthy'")
        instance = self._instances.get(instance_id)
        if instance is None:
            raise NotFoundError(f"instance {instance_id!r} not found; register it again")
        self._last_report[instance_id] = time.time()
        return self.record_check_result(instance_id, health is Health.HEALTHY, output) or instance

    def record_check_result(self, instance_id: str, passed: bool, output: str) -> Instance | None:
        """Count one check result toward the rise/fall thresholds; return the instance.

        Return None when the instance is gone (deregistered while its probe ran).
        """
        instance = self._instances.get(instance_id)
        if instance is None:
            return None
        counter = self._counters.setdefault(instance_id, _HealthCounter())
        if passed:
            counter.successes += 1
            counter.failures = 0
            target = Health.HEALTHY if counter.successes >= self._rise else instance.health
        else:
            counter.failures += 1
            counter.successes = 0
            # An instance never seen healthy has nothing to flap from: one failure decides.
            threshold = self._fall if instance.health is Health.HEALTHY else 1
            target = Health.UNHEALTHY if counter.failures >= threshold else instance.health
        return self._set_health(instance, target, output)

    def expire_ttl(self, instance_id: str, output: str) -> Instance | None:
        """Mark a TTL-checked instance Unhealthy because its reports stopped."""
        instance = self._instances.get(instance_id)
        if instance is None:
            return None
        self._counters[instance_id] = _HealthCounter(failures=self._fall)
        return self._set_health(instance, Health.UNHEALTHY, output)

    def _set_health(self, instance: Instance, health: Health, output: str) -> Instance:
        now = time.time()
        if health is instance.health:
            if output != instance.output:
                # Output alone is no health change: it neither bumps the index nor wakes listeners.
                instance = replace(instance, output=output)
                self._put_instance(instance)
            return instance
        index = self._index + 1
        updated = replace(instance, health=health, output=output, modify_index=index, updated_at=now)
        self._put_instance(updated)
        self._pending_health[updated.id] = HealthUpdate(updated.id, health, output, now)
        self._health_dirty.set()
        self._apply(Change(index, ChangeKind.HEALTH, updated.service, updated.id))
        registry_log.info(
            "Instance %s of %s at %s is %s (was %s): %s",
            updated.id, updated.service, updated.address, health.value, instance.health.value, output or "-",
        )
        return updated

    async def flush_health(self) -> None:
        """Write pending health changes to the store; keep them pending when it fails."""
        if not self._pending_health or self._store is None:
            self._pending_health.clear()
            return
        async with self._write_lock:
            pending = [update for update in self._pending_health.values() if update.instance_id in self._instances]
            self._pending_health.clear()
            if not pending:
                return
            try:
                await self._store.commit(CatalogWrite(self._index, health_updates=pending))
            except StoreUnavailableError:
                for update in pending:
                    self._pending_health.setdefault(update.instance_id, update)
                raise

    async def run_health_writer(self, retry_delay: float = 1.0) -> None:
        """Flush health changes as they come until cancelled; retry while the store is down."""
        while True:
            await self._health_dirty.wait()
            self._health_dirty.clear()
            try:
                await self.flush_health()
            except StoreUnavailableError as exc:
                registry_log.warning(
                    "Could not persist %d health change(s), retrying in %.1f s: %s",
                    len(self._pending_health), retry_delay, exc,
                )
                await asyncio.sleep(retry_delay)
                self._health_dirty.set()

    # ----- internals -----------------------------------------------------

    async def _commit(self, write: CatalogWrite) -> None:
        if self._store is not None:
            await self._store.commit(write)

    def _put_instance(self, instance: Instance) -> None:
        previous = self._instances.get(instance.id)
        if previous is not None and previous.registration_key != instance.registration_key:
            self._by_key.pop(previous.registration_key, None)
        self._instances[instance.id] = instance
        self._by_service.setdefault(instance.service, {})[instance.id] = instance
        self._by_key[instance.registration_key] = instance.id

    def _drop_instance(self, instance_id: str) -> None:
        instance = self._instances.pop(instance_id)
        self._by_service.get(instance.service, {}).pop(instance_id, None)
        self._by_key.pop(instance.registration_key, None)
        self._counters.pop(instance_id, None)
        self._last_report.pop(instance_id, None)
        self._pending_health.pop(instance_id, None)

    def _apply(self, change: Change, *, bump: bool = True) -> None:
        if bump:
            self._index = change.index
        for listener in list(self._listeners):
            try:
                listener(change)
            except Exception:
                registry_log.exception("Change listener %r failed on change %d", listener, change.index)


def instances_with_check(instances: Iterable[Instance], check_type: CheckType) -> list[Instance]:
    return [instance for instance in instances if instance.check.type is check_type]


__all__ = [
    "CatalogSnapshot",
    "CatalogStore",
    "CatalogWrite",
    "Change",
    "ChangeKind",
    "Check",
    "HealthUpdate",
    "Registry",
]
