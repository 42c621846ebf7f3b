"""The health state machine: rise/fall thresholds, TTL and stale deadlines, and
the mass-failure guard. Pure logic with explicit times, so tests drive it with a
fake clock; the registry owns one tracker and applies what it decides.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from logpose.model import Check, CheckType, Health, Instance

HISTORY_LENGTH = 20  # transitions kept per instance
# A probed check with no result for this many of its intervals stops counting as Healthy.
STALE_INTERVALS = 3
# The guard never engages for fewer probed instances than this: two of three
# failing is likelier a real outage than a broken prober network.
GUARD_MIN_INSTANCES = 4


@dataclass(frozen=True, slots=True)
class HealthDefaults:
    """Server-wide check settings, used where an instance's check leaves them unset."""

    interval: float = 10.0
    timeout: float = 2.0
    rise: int = 1
    fall: int = 2
    deregister_after: float | None = None  # None: never deregister automatically

    def interval_of(self, check: Check) -> float:
        return check.interval if check.interval is not None else self.interval

    def timeout_of(self, check: Check) -> float:
        return check.timeout if check.timeout is not None else self.timeout

    def rise_of(self, check: Check) -> int:
        return check.rise if check.rise is not None else self.rise

    def fall_of(self, check: Check) -> int:
        return check.fall if check.fall is not None else self.fall

    def deregister_after_of(self, check: Check) -> float | None:
        return check.deregister_after if check.deregister_after is not None else self.deregister_after


@dataclass(frozen=True, slots=True)
class HealthTransition:
    """One entry of an instance's history; ``at`` is a Unix time in seconds."""

    at: float
    previous: Health
    health: Health
    output: str


@dataclass(slots=True)
class HealthState:
    """The tracker's counters and check times for one instance, besides its current health."""

    successes: int = 0
    failures: int = 0
    last_checked_at: float | None = None
    last_success_at: float | None = None
    last_failure_at: float | None = None
    last_report_at: float | None = None
    last_passed: bool | None = None
    unhealthy_since: float | None = None
    history: collections.deque[HealthTransition] = field(
        default_factory=lambda: collections.deque(maxlen=HISTORY_LENGTH)
    )


@dataclass(slots=True)
class Verdict:
    """The outcome of one check result: the health to set, and the instances the guard restores."""

    health: Health
    restore: list[str] = field(default_factory=list)
    suppressed: bool = False


class MassFailureGuard:
    """Keep the last known health when too many instances fail at once.

    When, within one probe interval, more than ``share`` of the probed Healthy
    instances across at least two services would turn Unhealthy, the prober's
    own network is the likelier fault. The guard then restores the instances
    that fell in that window and holds every further fall until the share of
    probed instances whose latest result failed is back at or below ``share``.
    """

    def __init__(self, *, share: float, window: float, enabled: bool = True) -> None:
        self.share = share
        self.window = window
        self.enabled = enabled and share > 0
        self.active = False
        self.active_since: float | None = None
        self.engagements = 0
        self._recent_falls: dict[str, tuple[float, str]] = {}

    def admit_fall(self, instance: Instance, now: float, healthy_probed: int) -> tuple[bool, list[str]]:
        """Return whether the fall may happen, and the ids to restore if the guard engages now.

        ``healthy_probed`` counts the probed instances that are Healthy before this fall.
        """
        if not self.enabled:
            return True, []
        if self.active:
            return False, []
        cutoff = now - self.window
        self._recent_falls = {key: value for key, value in self._recent_falls.items() if value[0] >= cutoff}
        falls = dict(self._recent_falls)
        falls[instance.id] = (now, instance.service)
        population = healthy_probed + len(self._recent_falls)
        services = {service for _at, service in falls.values()}
        if population >= GUARD_MIN_INSTANCES and len(falls) / population > self.share and len(services) >= 2:
            self.active = True
            self.active_since = now
            self.engagements += 1
            restore = list(self._recent_falls)
            self._recent_falls.clear()
            return False, restore
        self._recent_falls[instance.id] = (now, instance.service)
        return True, []

    def should_release(self, failing: int, probed: int) -> bool:
        """Return whether an active guard may let go: few enough latest results fail."""
        return self.active and (probed == 0 or failing / probed <= self.share)

    def release(self) -> None:
        self.active = False
        self.active_since = None

    def configure(self, *, share: float, window: float, enabled: bool) -> None:
        """Replace the settings; turning the guard off releases it, so held falls happen at the next result."""
        self.share = share
        self.window = window
        self.enabled = enabled and share > 0
        if not self.enabled:
            self.release()

    def forget(self, instance_id: str) -> None:
        self._recent_falls.pop(instance_id, None)


class HealthTracker:
    """Per-instance counters and deadlines, and the guard over all of them."""

    def __init__(self, defaults: HealthDefaults, guard: MassFailureGuard) -> None:
        self.defaults = defaults
        self.guard = guard
        self._states: dict[str, HealthState] = {}
        self._failing_probed = 0  # probed instances whose latest result failed
        self._probed: set[str] = set()

    def state(self, instance_id: str) -> HealthState:
        return self._states.setdefault(instance_id, HealthState())

    def track(self, instance: Instance, now: float, *, fresh: bool) -> None:
        """Start tracking ``instance``; ``fresh`` resets counters (new or changed check)."""
        if fresh:
            # New counters and deadlines, but the history of transitions stays.
            history = self._states[instance.id].history if instance.id in self._states else None
            self.forget(instance.id)
            if history is not None:
                self.state(instance.id).history.extend(history)
        state = self.state(instance.id)
        # Deadlines start now, so a restart or a new check never expires at once.
        state.last_checked_at = state.last_checked_at or now
        state.last_report_at = state.last_report_at or now
        if instance.health is Health.UNHEALTHY and state.unhealthy_since is None:
            state.unhealthy_since = now
        if instance.check.is_probed:
            self._probed.add(instance.id)
        else:
            self._probed.discard(instance.id)

    def count_missed(self, instance_id: str, now: float) -> None:
        """Count a missed deadline (TTL expiry, stale check) as one failed result."""
        state = self.state(instance_id)
        state.failures += 1
        state.successes = 0
        state.last_failure_at = now

    def restart_deadlines(self, now: float) -> None:
        """Count check silence from ``now``, for a node that has just taken over probing."""
        for state in self._states.values():
            state.last_checked_at = now

    def forget(self, instance_id: str) -> None:
        state = self._states.pop(instance_id, None)
        if state is not None and state.last_passed is False and instance_id in self._probed:
            self._failing_probed -= 1
        self._probed.discard(instance_id)
        self.guard.forget(instance_id)

    def on_result(self, instance: Instance, passed: bool, now: float, healthy_probed: int) -> Verdict:
        """Count one check result toward rise/fall and return the health it leads to."""
        state = self.state(instance.id)
        state.last_checked_at = now
        if instance.id in self._probed and state.last_passed is not passed:
            if passed and state.last_passed is False:
                self._failing_probed -= 1
            elif not passed:
                self._failing_probed += 1
        state.last_passed = passed
        if passed:
            state.successes += 1
            state.failures = 0
            state.last_success_at = now
            if state.successes >= self.defaults.rise_of(instance.check):
                return Verdict(Health.HEALTHY)
            return Verdict(instance.health)

        state.failures += 1
        state.successes = 0
        state.last_failure_at = now
        if instance.health is not Health.HEALTHY:
            # An instance never seen healthy has nothing to flap from: one failure decides.
            return Verdict(Health.UNHEALTHY)
        if state.failures < self.defaults.fall_of(instance.check):
            return Verdict(Health.HEALTHY)
        if instance.id in self._probed:
            allowed, restore = self.guard.admit_fall(instance, now, healthy_probed)
            if not allowed:
                return Verdict(Health.HEALTHY, restore, suppressed=True)
        return Verdict(Health.UNHEALTHY)

    def maybe_release_guard(self) -> bool:
        """Release the guard once probes succeed again; return whether it was released."""
        if self.guard.should_release(self._failing_probed, len(self._probed)):
            self.guard.release()
            return True
        return False

    def record_transition(self, instance_id: str, transition: HealthTransition) -> None:
        state = self.state(instance_id)
        state.history.append(transition)
        state.unhealthy_since = transition.at if transition.health is Health.UNHEALTHY else None

    def overdue(self, instance: Instance, now: float) -> str | None:
        """Return why ``instance`` may no longer count as Healthy at ``now``, or None.

        A TTL check expires when no report came for ``ttl`` seconds; a probed
        check goes stale when no result came for STALE_INTERVALS intervals.
        """
        state = self._states.get(instance.id)
        if state is None:
            return None
        if instance.check.type is CheckType.TTL and instance.health is not Health.UNHEALTHY:
            silence = now - (state.last_report_at or now)
            if silence >= (instance.check.ttl or 0):
                return f"no health report for {silence:.1f} s (ttl {instance.check.ttl:g} s)"
        if instance.check.is_probed and instance.health is Health.HEALTHY:
            silence = now - (state.last_checked_at or now)
            limit = STALE_INTERVALS * self.defaults.interval_of(instance.check)
            if silence >= limit:
                return f"no check result for {silence:.1f} s (limit {limit:g} s); is the prober stalled?"
        return None

    def expired(self, instance: Instance, now: float) -> bool:
        """Return whether ``instance`` has been Unhealthy longer than its deregister_after."""
        limit = self.defaults.deregister_after_of(instance.check)
        state = self._states.get(instance.id)
        if limit is None or state is None or instance.health is not Health.UNHEALTHY or state.unhealthy_since is None:
            return False
        return now - state.unhealthy_since >= limit
