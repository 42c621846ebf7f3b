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
import functools
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol as TypingProtocol

from logpose.errors import (
    ConflictError,
    InstanceNotRegisteredError,
    NotFoundError,
    StoreUnavailableError,
    ValidationError,
)
from logpose.health import HealthDefaults, HealthState, HealthTracker, HealthTransition, MassFailureGuard
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
    MAINTENANCE = "maintenance"


@dataclass(frozen=True, slots=True)
class Change:
    """One applied change; ``instance_id`` is None for changes to the service itself."""

    index: int
    kind: ChangeKind
    service: str
    instance_id: str | None = None


@dataclass(frozen=True, slots=True)
class ChangeRecord:
    """One entry of the store's change log, as the change feed reads it."""

    index: int
    kind: str  # a ChangeKind value
    service: str
    instance_id: str | None


@dataclass(frozen=True, slots=True)
class HealthUpdate:
    instance_id: str
    service: str
    health: Health
    output: str
    updated_at: float
    reported_at: float | None = None  # Unix time of the last report from the instance itself


@dataclass(slots=True)
class CatalogWrite:
    """Everything one store transaction commits.

    The store assigns the change index inside the transaction and stamps the
    rows with it; the ``*_index`` fields of the objects here are provisional.
    """

    create_services: list[Service] = field(default_factory=list)  # inserted: an existing code conflicts
    upsert_services: list[Service] = field(default_factory=list)
    delete_services: list[str] = field(default_factory=list)
    upsert_instances: list[Instance] = field(default_factory=list)
    delete_instances: list[Instance] = field(default_factory=list)
    health_updates: list[HealthUpdate] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class CatalogSnapshot:
    services: list[Service]
    instances: list[Instance]
    index: int


class CatalogStore(TypingProtocol):
    """The persistence interface the registry uses; ``logpose.store`` implements it."""

    async def load(self) -> CatalogSnapshot: ...

    async def changes_since(self, after: int) -> tuple[int, list[ChangeRecord] | None]: ...

    async def fetch(self, codes: set[str], instance_ids: set[str]) -> tuple[dict[str, Service], dict[str, Instance]]: ...

    async def commit(self, write: CatalogWrite) -> int:
        """Commit the write in one transaction and return its change index.

        Raise StoreUnavailableError or ConflictError when nothing was committed.
        """


Listener = Callable[[Change], None]


_CATALOG_KINDS = frozenset(kind.value for kind in ChangeKind)


def _runs_to_completion(method):
    """Run a write method as its own task, shielded, so a cancelled caller (a
    client that hung up) cannot leave a committed write unapplied in memory."""

    @functools.wraps(method)
    async def wrapper(self, *args, **kwargs):
        task = asyncio.get_running_loop().create_task(method(self, *args, **kwargs))
        return await asyncio.shield(task)

    return wrapper


@dataclass(slots=True)
class NodeInfo:
    """This server process among the nodes sharing a database, for status pages."""

    node_id: str = "local"
    prober: bool = True  # whether this node runs the probes and health deadlines
    shared: bool = False  # whether other nodes may share the database


class Registry:
    """The catalog in memory with its change index.

    Returned ``Service`` and ``Instance`` objects are immutable snapshots; lists
    returned by the read methods are new lists the caller owns.
    """

    def __init__(
        self,
        store: CatalogStore | None,
        *,
        defaults: HealthDefaults | None = None,
        guard: MassFailureGuard | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._clock = clock
        self.node = NodeInfo()
        defaults = defaults or HealthDefaults()
        self._health = HealthTracker(
            defaults, guard or MassFailureGuard(share=0.5, window=defaults.interval)
        )
        self._index = 0
        self._services: dict[str, Service] = {}
        self._instances: dict[str, Instance] = {}
        self._by_service: dict[str, dict[str, Instance]] = {}
        self._by_key: dict[tuple[str, str, int, str], str] = {}
        self._healthy_probed = 0  # probed instances now Healthy, kept for the mass-failure guard
        self._listeners: list[Listener] = []
        self._pending_health: dict[str, HealthUpdate] = {}
        # Indexes this node committed itself, so the change feed skips them.
        self._own_indexes: set[int] = set()
        self._feed_index = 0  # every change up to this index is applied here
        self._kind_watchers: dict[str, list[Callable[[], None]]] = {}
        self._database_index = 0
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
        self._healthy_probed = 0
        now = self._clock()
        for instance in snapshot.instances:
            self._put_instance(instance)
            # TTL and stale deadlines start at load, so a restart does not expire
            # every instance before it had the chance to report or be probed.
            self._health.track(instance, now, fresh=True)
        self._index = snapshot.index
        self._feed_index = snapshot.index

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
        """Return the instances that discovery may hand out: Healthy and not in maintenance."""
        return [
            instance
            for instance in self._by_service.get(code, {}).values()
            if instance.health is Health.HEALTHY and instance.maintenance_reason is None
        ]

    @property
    def health_defaults(self) -> HealthDefaults:
        return self._health.defaults

    @health_defaults.setter
    def health_defaults(self, defaults: HealthDefaults) -> None:
        """Apply new server-wide check settings from the next check result or deadline on."""
        self._health.defaults = defaults

    @property
    def guard(self) -> MassFailureGuard:
        """The mass-failure guard; read its ``active`` and ``active_since`` for status pages."""
        return self._health.guard

    def health_state(self, instance_id: str) -> HealthState | None:
        """Return the instance's counters and check times; the caller must not mutate it."""
        return self._health.state(instance_id) if instance_id in self._instances else None

    def history(self, instance_id: str) -> list[HealthTransition]:
        """Return the instance's recent health transitions, oldest first."""
        if instance_id not in self._instances:
            raise NotFoundError(f"instance {instance_id!r} not found")
        return list(self._health.state(instance_id).history)

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` after each applied change; return a function that unsubscribes.

        Listeners run synchronously on the event loop and must not block.
        """
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    # ----- catalog writes (durable when they return) ----------------------

    @_runs_to_completion
    async def create_service(self, code: str, name: str | None = None) -> Service:
        if code in self._services:
            raise ConflictError(f"service {code!r} already exists")
        service = Service(code=code, name=name or code, created_index=0, modify_index=0)
        try:
            index = await self._commit(CatalogWrite(create_services=[service]))
        except ConflictError:
            raise ConflictError(f"service {code!r} already exists") from None
        service = replace(service, created_index=index, modify_index=index)
        self._services[code] = service
        self._by_service[code] = {}
        self._apply(Change(index, ChangeKind.SERVICE_UPSERT, code))
        registry_log.info("Created service %s", code)
        return service

    @_runs_to_completion
    async def delete_service(self, code: str, *, force: bool = False) -> list[str]:
        """Delete a service; with ``force`` its instances go too. Return their ids."""
        if code not in self._services:
            raise NotFoundError(f"service {code!r} not found")
        instance_ids = list(self._by_service.get(code, {}))
        if instance_ids and not force:
            raise ConflictError(
                f"service {code!r} still has {len(instance_ids)} instance(s); "
                "deregister them first, or delete with force (?force=true over HTTP, --force in the CLI)"
            )
        doomed = [self._instances[instance_id] for instance_id in instance_ids]
        index = await self._commit(CatalogWrite(delete_services=[code], delete_instances=doomed))
        # Another write may have changed the service while this one committed.
        for instance_id in list(self._by_service.get(code, {})):
            self._drop_instance(instance_id)
        self._services.pop(code, None)
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
        if "check" in spec.sent:
            self._check_timing(spec.check)
        try:
            return await self._register_once(code, spec)
        except ConflictError:
            if self._store is None:
                raise
        # Another node registered the same key since this node last caught up:
        # learn about its instance, then update that one instead.
        await self.catch_up()
        return await self._register_once(code, spec)

    @_runs_to_completion
    async def _register_once(self, code: str, spec: InstanceSpec) -> tuple[Instance, bool]:
        now = self._clock()
        write = CatalogWrite()
        service = self._services.get(code)
        if service is None:
            service = Service(code=code, name=code, created_index=0, modify_index=0)
            write.upsert_services.append(service)

        existing_id = self._by_key.get(registration_key(code, spec.address, spec.protocol))
        existing = self._instances.get(existing_id) if existing_id else None
        if existing is not None:
            # Fields the request left out keep their registered values.
            check = spec.check if "check" in spec.sent else existing.check
            # The registration key already matched the address, so only a new check resets health.
            keep_health = existing.check == check
            instance = replace(
                existing,
                address=spec.address,
                check=check,
                tags=spec.tags if "tags" in spec.sent else existing.tags,
                metadata=dict(spec.metadata) if "metadata" in spec.sent else existing.metadata,
                weight=spec.weight if "weight" in spec.sent else existing.weight,
                health=existing.health if keep_health else Health.UNKNOWN,
                output=existing.output if keep_health else "",
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
                registered_at=now,
                updated_at=now,
            )
        write.upsert_instances.append(instance)
        index = await self._commit(write)
        instance = replace(
            instance, modify_index=index, created_index=existing.created_index if existing else index
        )
        current = self._instances.get(instance.id)
        if existing is not None and current is not None and instance.health is existing.health:
            # Health is soft state: a probe result that arrived during the commit is newer.
            instance = replace(
                instance, health=current.health, output=current.output, last_report_at=current.last_report_at,
                maintenance_reason=current.maintenance_reason, maintenance_since=current.maintenance_since,
            )

        if write.upsert_services:
            service = replace(service, created_index=index, modify_index=index)
            self._services[code] = service
            self._by_service[code] = {}
            self._apply(Change(index, ChangeKind.SERVICE_UPSERT, code), bump=False)
        self._put_instance(instance)
        fresh = existing is None or existing.health is not instance.health or existing.check != instance.check
        self._health.track(instance, now, fresh=fresh)
        if existing is not None and existing.health is not instance.health:
            output = "check changed by a new registration"
            self._health.record_transition(instance.id, HealthTransition(now, existing.health, instance.health, output))
            registry_log.info(
                "Instance %s of %s at %s is %s (was %s): %s",
                instance.id, code, instance.address, instance.health.value, existing.health.value, output,
            )
        self._apply(Change(index, ChangeKind.INSTANCE_UPSERT, code, instance.id))
        registry_log.info(
            "%s instance %s of %s at %s (%s)",
            "Registered" if existing is None else "Updated",
            instance.id, code, instance.address, instance.protocol.value,
        )
        return instance, existing is None

    @_runs_to_completion
    async def deregister(self, instance_id: str) -> Instance:
        instance = self._instances.get(instance_id)
        if instance is None:
            raise NotFoundError(f"instance {instance_id!r} not found")
        index = await self._commit(CatalogWrite(delete_instances=[instance]))
        self._drop_instance(instance_id)
        self._apply(Change(index, ChangeKind.INSTANCE_DELETE, instance.service, instance_id))
        registry_log.info("Deregistered instance %s of %s at %s", instance_id, instance.service, instance.address)
        return instance

    @_runs_to_completion
    async def set_maintenance(self, instance_id: str, reason: str | None) -> Instance:
        """Take an instance out of discovery (``reason`` set) or return it (None); durable.

        Maintenance leaves checks running, so turning it off returns the
        instance to whatever its checks report by then.
        """
        instance = self._instances.get(instance_id)
        if instance is None:
            raise NotFoundError(f"instance {instance_id!r} not found")
        if instance.maintenance_reason == reason:
            return instance
        now = self._clock()
        updated = replace(
            instance,
            maintenance_reason=reason,
            maintenance_since=now if reason is not None else None,
            updated_at=now,
        )
        index = await self._commit(CatalogWrite(upsert_instances=[updated]))
        current = self._instances.get(instance_id)
        if current is None:
            return updated  # deregistered while this write committed
        # Start from the current instance: health may have changed during the commit.
        updated = replace(
            current, maintenance_reason=updated.maintenance_reason, maintenance_since=updated.maintenance_since,
            modify_index=index, updated_at=now,
        )
        self._put_instance(updated)
        self._apply(Change(index, ChangeKind.MAINTENANCE, updated.service, updated.id))
        if reason is None:
            registry_log.info("Instance %s of %s left maintenance", instance_id, instance.service)
        else:
            registry_log.info("Instance %s of %s entered maintenance: %s", instance_id, instance.service, reason)
        return updated

    # ----- change feed (changes committed by other nodes) --------------------

    @property
    def database_index(self) -> int:
        """The database's change index when the feed last looked; the lag is this minus ``index``."""
        return max(self._database_index, self._feed_index)

    async def catch_up(self) -> int:
        """Apply the changes other nodes committed since the last catch-up; return how many.

        When the store's log no longer reaches back far enough, the whole catalog
        is reloaded off to the side and swapped in at once, so readers never see
        a partial catalog.
        """
        if self._store is None:
            return 0
        database_index, records = await self._store.changes_since(self._feed_index)
        self._database_index = database_index
        if records is None:
            snapshot = await self._store.load()
            self.replace_catalog(snapshot)
            registry_log.warning(
                "Change feed fell behind the change log; reloaded the catalog at index %d", snapshot.index
            )
            for watchers in self._kind_watchers.values():
                for watcher in watchers:
                    watcher()
            return 1
        foreign = [record for record in records if record.index not in self._own_indexes]
        other_kinds = {record.kind for record in foreign if record.kind not in _CATALOG_KINDS}
        foreign = [record for record in foreign if record.kind in _CATALOG_KINDS]
        codes = {record.service for record in foreign}
        ids = {record.instance_id for record in foreign if record.instance_id}
        services, instances = await self._store.fetch(codes, ids) if foreign else ({}, {})
        self.apply_records(foreign, services, instances)
        if records:
            last = records[-1].index
            self._feed_index = max(self._feed_index, last)
            self._own_indexes = {index for index in self._own_indexes if index > last}
            self._index = max(self._index, last)
        for kind in other_kinds:
            for watcher in self._kind_watchers.get(kind, []):
                watcher()
        return len(foreign) + len(other_kinds)

    def watch_kind(self, kind: str, watcher: Callable[[], None]) -> None:
        """Call ``watcher`` when the change feed brings changes of a non-catalog ``kind`` (e.g. "client")."""
        self._kind_watchers.setdefault(kind, []).append(watcher)

    def apply_records(
        self, records: list[ChangeRecord], services: dict[str, Service], instances: dict[str, Instance]
    ) -> None:
        """Apply changes made elsewhere, given the current rows of what they touched, and notify.

        ``services`` and ``instances`` hold the rows as they are now, by code and id;
        a record whose row is missing there was deleted. The change feed reads them
        from the store; a DNS worker gets them from the server process.
        """
        for record in records:
            self._apply_record(record, services, instances)
        if records:
            self._index = max(self._index, records[-1].index)

    def _apply_record(
        self, record: ChangeRecord, services: dict[str, Service], instances: dict[str, Instance]
    ) -> None:
        # The fetched rows are the current state, as new as the record or newer,
        # so applying them in index order converges on the database.
        service = services.get(record.service)
        if service is None:
            if record.service in self._services:
                for instance_id in list(self._by_service.get(record.service, {})):
                    self._drop_instance(instance_id)
                del self._services[record.service]
                self._by_service.pop(record.service, None)
                self._apply(Change(record.index, ChangeKind.SERVICE_DELETE, record.service))
            return
        if self._services.get(record.service) != service:
            self._services[record.service] = service
            self._by_service.setdefault(record.service, {})
            self._apply(Change(record.index, ChangeKind.SERVICE_UPSERT, record.service))
        if record.instance_id is None:
            return
        instance = instances.get(record.instance_id)
        current = self._instances.get(record.instance_id)
        if instance is None:
            if current is not None:
                self._drop_instance(record.instance_id)
                self._apply(Change(record.index, ChangeKind.INSTANCE_DELETE, record.service, record.instance_id))
            return
        pending = self._pending_health.get(record.instance_id)
        if pending is not None:
            # This node has a newer health result that is not written yet, so keep it.
            instance = replace(instance, health=pending.health, output=pending.output)
        if current == instance:
            return
        if current is not None and current.health is instance.health:
            # Same health: keep this node's freshest output rather than the stored one.
            instance = replace(instance, output=current.output)
        self._put_instance(instance)
        fresh = current is None or current.check != instance.check or current.health is not instance.health
        self._health.track(instance, self._clock(), fresh=fresh)
        state = self._health.state(instance.id)
        if instance.last_report_at is not None and instance.last_report_at > (state.last_report_at or 0):
            state.last_report_at = instance.last_report_at
        if current is not None and current.health is not instance.health:
            self._health.record_transition(
                instance.id, HealthTransition(instance.updated_at, current.health, instance.health, instance.output)
            )
        kind = ChangeKind.HEALTH if record.kind == ChangeKind.HEALTH.value else ChangeKind.INSTANCE_UPSERT
        self._apply(Change(record.index, kind, instance.service, instance.id))

    def replace_catalog(self, snapshot: CatalogSnapshot) -> None:
        """Swap in ``snapshot`` as a whole and send listeners one notice with an empty service code."""
        previous = set(self._instances)
        self.load_snapshot(snapshot)
        self._database_index = snapshot.index
        self._own_indexes.clear()
        for instance_id in previous - set(self._instances):
            self._health.forget(instance_id)
        # One notice for the whole swap: listeners drop every cached answer.
        self._apply(Change(snapshot.index, ChangeKind.SERVICE_UPSERT, ""), bump=False)

    async def run_change_feed(self, wake: asyncio.Event, period: float = 5.0, retry_delay: float = 1.0) -> None:
        """Catch up whenever ``wake`` is set, and every ``period`` seconds in case a notice was lost."""
        failing = False
        while True:
            try:
                await asyncio.wait_for(wake.wait(), period)
            except asyncio.TimeoutError:
                pass
            wake.clear()
            try:
                await self.catch_up()
            except StoreUnavailableError as exc:
                if not failing:
                    registry_log.warning("Change feed cannot read the database, retrying: %s", exc.detail)
                failing = True
                await asyncio.sleep(retry_delay)
                wake.set()
                continue
            if failing:
                registry_log.info("Change feed reads the database again, at index %d", self._index)
            failing = False

    # ----- health (soft state, written behind) ----------------------------

    def report_health(self, instance_id: str, health: Health, output: str, now: float | None = None) -> Instance:
        """Record a health report from the instance itself; it counts as a check result."""
        if health is Health.UNKNOWN:
            raise ValidationError("status", "must be 'Healthy' or 'Unhealthy'")
        instance = self._instances.get(instance_id)
        if instance is None:
            raise InstanceNotRegisteredError(f"instance {instance_id!r} is not registered; register it again")
        now = self._clock() if now is None else now
        self._health.state(instance_id).last_report_at = now
        updated = self.record_check_result(instance_id, health is Health.HEALTHY, output, now) or instance
        updated = replace(updated, last_report_at=now)
        self._put_instance(updated)
        if self._store is not None and self.node.shared:
            # Written even without a transition, so the node that runs the TTL
            # deadlines learns of reports that reached any node. A node alone
            # writes transitions only (see _set_health), so there a report that
            # changes no health moves neither the change index nor the SOA serial.
            self._pending_health[instance_id] = HealthUpdate(
                instance_id, updated.service, updated.health, updated.output, now, now
            )
            self._health_dirty.set()
        return updated

    def record_check_result(
        self, instance_id: str, passed: bool, output: str, now: float | None = None
    ) -> Instance | None:
        """Count one check result toward the rise/fall thresholds; return the instance.

        Return None when the instance is gone (deregistered while its probe ran).
        """
        instance = self._instances.get(instance_id)
        if instance is None:
            return None
        now = self._clock() if now is None else now
        verdict = self._health.on_result(instance, passed, now, self._healthy_probed)
        for restored_id in verdict.restore:
            restored = self._instances.get(restored_id)
            if restored is not None:
                self._set_health(restored, Health.HEALTHY, restored.output + " (restored by the mass-failure guard)", now)
        if verdict.restore or verdict.suppressed:
            if verdict.restore:
                registry_log.warning(
                    "Mass-failure guard engaged: %d instance(s) failed within %.3g s across several services; "
                    "keeping their last known health until probes succeed again",
                    len(verdict.restore) + 1, self._health.guard.window,
                )
            output = f"{output} (held Healthy by the mass-failure guard)"
        instance = self._set_health(instance, verdict.health, output, now)
        if self._health.guard.active and self._health.maybe_release_guard():
            registry_log.warning("Mass-failure guard released: probes succeed again")
        return instance

    def restart_deadlines(self) -> None:
        """Count check silence from now on; call when this node takes over probing."""
        self._health.restart_deadlines(self._clock())

    def sweep(self, now: float | None = None) -> list[str]:
        """Apply TTL expiry and stale-check deadlines; return ids due for deregistration."""
        now = self._clock() if now is None else now
        due = []
        for instance in list(self._instances.values()):
            reason = self._health.overdue(instance, now)
            if reason is not None:
                self._health.count_missed(instance.id, now)
                target = Health.UNHEALTHY if instance.check.type is CheckType.TTL else Health.UNKNOWN
                instance = self._set_health(instance, target, reason, now)
            if self._health.expired(instance, now):
                due.append(instance.id)
        return due

    async def run_health_watchdog(self, period: float = 1.0) -> None:
        """Sweep deadlines every ``period`` seconds until cancelled, deregistering expired instances."""
        while True:
            await asyncio.sleep(period)
            for instance_id in self.sweep():
                instance = self._instances.get(instance_id)
                if instance is None:
                    continue
                limit = self._health.defaults.deregister_after_of(instance.check)
                try:
                    await self.deregister(instance_id)
                except NotFoundError:
                    continue
                except StoreUnavailableError as exc:
                    registry_log.warning("Could not deregister expired instance %s: %s", instance_id, exc.detail)
                    continue
                registry_log.warning(
                    "Deregistered instance %s of %s at %s: Unhealthy for more than %g s (deregister_after)",
                    instance_id, instance.service, instance.address, limit,
                )

    def _check_timing(self, check: Check) -> None:
        defaults = self._health.defaults
        if check.is_probed and defaults.timeout_of(check) >= defaults.interval_of(check):
            raise ValidationError(
                "check.timeout",
                f"must be less than check.interval (got {defaults.timeout_of(check):g} >= "
                f"{defaults.interval_of(check):g}, counting the server defaults)",
            )

    def _set_health(self, instance: Instance, health: Health, output: str, now: float) -> Instance:
        if health is instance.health:
            if output != instance.output:
                # Output alone is no health change: it neither bumps the index nor wakes listeners.
                instance = replace(instance, output=output)
                self._put_instance(instance)
            return instance
        # With a store, the change index moves when the health writer commits
        # the transition; memory, DNS and discovery change at once regardless.
        index = self._index + 1 if self._store is None else self._index
        updated = replace(instance, health=health, output=output, updated_at=now)
        self._put_instance(updated)
        self._health.record_transition(updated.id, HealthTransition(now, instance.health, health, output))
        if self._store is not None:
            self._pending_health[updated.id] = HealthUpdate(
                updated.id, updated.service, health, output, now, updated.last_report_at
            )
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
        pending = [update for update in self._pending_health.values() if update.instance_id in self._instances]
        self._pending_health.clear()
        if not pending:
            return
        try:
            index = await self._store.commit(CatalogWrite(health_updates=pending))
        except StoreUnavailableError:
            for update in pending:
                self._pending_health.setdefault(update.instance_id, update)
            raise
        self._own_indexes.add(index)
        self._index = max(self._index, index)
        for update in pending:
            current = self._instances.get(update.instance_id)
            if current is not None and current.health is update.health:
                # The stored row now carries this index; memory shows the same.
                self._put_instance(replace(current, modify_index=max(current.modify_index, index)))

    async def run_health_writer(self, retry_delay: float = 1.0) -> None:
        """Flush health changes as they come until cancelled; retry while the store is down."""
        failing = False
        while True:
            await self._health_dirty.wait()
            self._health_dirty.clear()
            try:
                await self.flush_health()
            except StoreUnavailableError as exc:
                if not failing:
                    registry_log.warning(
                        "Could not persist %d health change(s), retrying every %.1f s: %s",
                        len(self._pending_health), retry_delay, exc.detail,
                    )
                failing = True
                await asyncio.sleep(retry_delay)
                self._health_dirty.set()
                continue
            if failing:
                registry_log.info("Persisted the health changes held while the database was unreachable")
            failing = False

    # ----- internals -----------------------------------------------------

    async def _commit(self, write: CatalogWrite) -> int:
        """Commit through the store and return the change index it assigned."""
        if self._store is None:
            return self._index + 1
        index = await self._store.commit(write)
        # The change feed brings this index back; the change is already applied here.
        self._own_indexes.add(index)
        return index

    def _put_instance(self, instance: Instance) -> None:
        previous = self._instances.get(instance.id)
        self._healthy_probed += _counts_as_healthy_probed(instance) - _counts_as_healthy_probed(previous)
        if previous is not None and previous.registration_key != instance.registration_key:
            self._by_key.pop(previous.registration_key, None)
        self._instances[instance.id] = instance
        self._by_service.setdefault(instance.service, {})[instance.id] = instance
        self._by_key[instance.registration_key] = instance.id

    def _drop_instance(self, instance_id: str) -> None:
        instance = self._instances.pop(instance_id, None)
        if instance is None:
            return  # already dropped by a concurrent write
        self._healthy_probed -= _counts_as_healthy_probed(instance)
        self._by_service.get(instance.service, {}).pop(instance_id, None)
        self._by_key.pop(instance.registration_key, None)
        self._health.forget(instance_id)
        self._pending_health.pop(instance_id, None)

    def _apply(self, change: Change, *, bump: bool = True) -> None:
        if bump:
            self._index = max(self._index, change.index)
        for listener in list(self._listeners):
            try:
                listener(change)
            except Exception:
                registry_log.exception("Change listener %r failed on change %d", listener, change.index)


def _counts_as_healthy_probed(instance: Instance | None) -> int:
    return int(instance is not None and instance.health is Health.HEALTHY and instance.check.is_probed)


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
