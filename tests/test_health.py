"""The health state machine through the registry, driven by a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from logpose.errors import ValidationError
from logpose.health import STALE_INTERVALS, HealthDefaults, MassFailureGuard
from logpose.model import Health, parse_instance_spec
from logpose.registry import Registry


class FakeClock:
    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_registry(clock: FakeClock, guard: MassFailureGuard | None = None, **defaults) -> Registry:
    return Registry(
        None,
        defaults=HealthDefaults(**{"interval": 10.0, "timeout": 2.0, **defaults}),
        guard=guard or MassFailureGuard(share=0.5, window=10.0, enabled=False),
        clock=clock,
    )


def register(registry: Registry, service: str, address: str, check: dict | None = None):
    body = {"address": address, "protocol": "Tcp"}
    if check is not None:
        body["check"] = check
    instance, _created = asyncio.run(registry.register(service, parse_instance_spec(body)))
    return instance


def health(registry: Registry, instance) -> Health:
    return registry.get_instance(instance.id).health


def test_rise_counts_and_resets():
    registry = make_registry(FakeClock(), rise=3)
    instance = register(registry, "web", "127.0.0.1:1")
    registry.record_check_result(instance.id, True, "ok")
    registry.record_check_result(instance.id, True, "ok")
    registry.record_check_result(instance.id, False, "refused")
    assert health(registry, instance) is Health.UNHEALTHY
    registry.record_check_result(instance.id, True, "ok")
    registry.record_check_result(instance.id, True, "ok")
    assert health(registry, instance) is Health.UNHEALTHY, "the failure reset the success count"
    registry.record_check_result(instance.id, True, "ok")
    assert health(registry, instance) is Health.HEALTHY


def test_fall_counts_and_resets():
    registry = make_registry(FakeClock(), fall=3)
    instance = register(registry, "web", "127.0.0.1:1")
    registry.record_check_result(instance.id, True, "ok")
    for _ in range(2):
        registry.record_check_result(instance.id, False, "refused")
    registry.record_check_result(instance.id, True, "ok")
    for _ in range(2):
        registry.record_check_result(instance.id, False, "refused")
    assert health(registry, instance) is Health.HEALTHY
    registry.record_check_result(instance.id, False, "refused")
    assert health(registry, instance) is Health.UNHEALTHY


def test_per_instance_thresholds_override_defaults():
    registry = make_registry(FakeClock(), rise=1, fall=2)
    instance = register(registry, "web", "127.0.0.1:1", {"type": "tcp", "rise": 2, "fall": 1})
    registry.record_check_result(instance.id, True, "ok")
    assert health(registry, instance) is Health.UNKNOWN
    registry.record_check_result(instance.id, True, "ok")
    assert health(registry, instance) is Health.HEALTHY
    registry.record_check_result(instance.id, False, "refused")
    assert health(registry, instance) is Health.UNHEALTHY


def test_timeout_must_be_below_interval_counting_defaults():
    registry = make_registry(FakeClock(), interval=10.0, timeout=2.0)
    with pytest.raises(ValidationError) as caught:
        register(registry, "web", "127.0.0.1:1", {"type": "tcp", "interval": 1.5})
    assert caught.value.field == "check.timeout"
    assert "2 >= 1.5" in caught.value.reason
    assert registry.instances() == []


def test_ttl_expires_at_exactly_its_ttl_once():
    clock = FakeClock()
    registry = make_registry(clock)
    changes = []
    instance = register(registry, "web", "127.0.0.1:1", {"type": "ttl", "ttl": 30})
    registry.report_health(instance.id, Health.HEALTHY, "up")
    registry.subscribe(changes.append)
    clock.advance(29.999)
    registry.sweep()
    assert health(registry, instance) is Health.HEALTHY
    clock.advance(0.001)
    registry.sweep()
    assert health(registry, instance) is Health.UNHEALTHY
    assert "no health report for 30.0 s" in registry.get_instance(instance.id).output
    clock.advance(30)
    registry.sweep()
    assert len(changes) == 1, "the expiry is one transition, not one per sweep"
    assert len(registry.history(instance.id)) == 2


def test_ttl_report_restarts_the_period():
    clock = FakeClock()
    registry = make_registry(clock)
    instance = register(registry, "web", "127.0.0.1:1", {"type": "ttl", "ttl": 10})
    for _ in range(5):
        clock.advance(9)
        registry.report_health(instance.id, Health.HEALTHY, "up")
        registry.sweep()
    assert health(registry, instance) is Health.HEALTHY


def test_output_only_change_is_not_a_transition():
    registry = make_registry(FakeClock())
    instance = register(registry, "web", "127.0.0.1:1")
    registry.record_check_result(instance.id, True, "1 ms")
    index = registry.index
    changes = []
    registry.subscribe(changes.append)
    registry.record_check_result(instance.id, True, "2 ms")
    assert registry.index == index
    assert changes == []
    assert registry.get_instance(instance.id).output == "2 ms"
    assert len(registry.history(instance.id)) == 1


def test_history_is_bounded_and_ordered():
    registry = make_registry(FakeClock(), fall=1)
    instance = register(registry, "web", "127.0.0.1:1")
    for number in range(30):
        registry.record_check_result(instance.id, number % 2 == 0, f"result {number}")
    history = registry.history(instance.id)
    assert len(history) == 20
    assert history[-1].output == "result 29"
    assert history[-1].health is Health.UNHEALTHY


def test_drain_and_undrain_keep_checks_running():
    registry = make_registry(FakeClock())
    instance = register(registry, "web", "127.0.0.1:1")
    registry.record_check_result(instance.id, True, "ok")
    asyncio.run(registry.set_maintenance(instance.id, "kernel upgrade"))
    assert registry.discoverable("web") == []
    assert registry.get_instance(instance.id).maintenance_reason == "kernel upgrade"
    registry.record_check_result(instance.id, False, "refused")
    registry.record_check_result(instance.id, False, "refused")
    asyncio.run(registry.set_maintenance(instance.id, None))
    assert registry.discoverable("web") == [], "it returns to what its checks say: Unhealthy"
    registry.record_check_result(instance.id, True, "ok")
    assert [item.id for item in registry.discoverable("web")] == [instance.id]


def test_deregister_after_unhealthy_period():
    clock = FakeClock()
    registry = make_registry(clock, deregister_after=60)
    instance = register(registry, "web", "127.0.0.1:1")
    keeper = register(registry, "web", "127.0.0.1:2", {"type": "tcp", "deregister_after": 600})
    registry.record_check_result(instance.id, False, "refused")
    registry.record_check_result(keeper.id, False, "refused")
    clock.advance(59)
    assert registry.sweep() == []
    clock.advance(1)
    assert registry.sweep() == [instance.id]
    registry.record_check_result(keeper.id, True, "ok")
    clock.advance(600)
    assert registry.sweep() == [instance.id], "a recovered instance is not due"


def test_stalled_prober_stops_counting_as_healthy():
    clock = FakeClock()
    registry = make_registry(clock, interval=10.0)
    instance = register(registry, "web", "127.0.0.1:1")
    registry.record_check_result(instance.id, True, "ok")
    clock.advance(STALE_INTERVALS * 10 - 0.5)
    registry.sweep()
    assert health(registry, instance) is Health.HEALTHY
    clock.advance(0.5)
    registry.sweep()
    assert health(registry, instance) is Health.UNKNOWN
    assert "prober stalled" in registry.get_instance(instance.id).output
    registry.record_check_result(instance.id, True, "ok")
    assert health(registry, instance) is Health.HEALTHY


def test_report_based_check_never_goes_stale():
    clock = FakeClock()
    registry = make_registry(clock)
    instance = register(registry, "web", "127.0.0.1:1", {"type": "none"})
    registry.report_health(instance.id, Health.HEALTHY, "up")
    clock.advance(3600)
    registry.sweep()
    assert health(registry, instance) is Health.HEALTHY


def _fleet(registry: Registry, services: int, per_service: int) -> list:
    instances = []
    for service in range(services):
        for number in range(per_service):
            instance = register(registry, f"svc{service}", f"127.0.0.{service + 1}:{1000 + number}",
                                {"type": "tcp", "fall": 1})
            registry.record_check_result(instance.id, True, "ok")
            instances.append(instance)
    return instances


def test_mass_failure_guard_engages_and_releases():
    clock = FakeClock()
    guard = MassFailureGuard(share=0.5, window=10.0)
    registry = make_registry(clock, guard=guard)
    instances = _fleet(registry, services=2, per_service=5)

    for instance in instances[:8]:  # 8 of 10 fail within one interval
        clock.advance(0.1)
        registry.record_check_result(instance.id, False, "timed out")
    assert guard.active
    assert guard.engagements == 1
    healthy = [item for item in registry.instances() if item.health is Health.HEALTHY]
    assert len(healthy) == 10, "the last known health is kept"
    assert "mass-failure guard" in registry.get_instance(instances[7].id).output

    for instance in instances[:4]:  # half recover: 4 of 10 still failing is at the share
        clock.advance(0.1)
        registry.record_check_result(instance.id, True, "ok")
    assert not guard.active
    clock.advance(20)
    registry.record_check_result(instances[5].id, False, "refused")
    assert health(registry, instances[5]) is Health.UNHEALTHY, "after release a real failure counts again"


def test_mass_failure_guard_ignores_one_service_outage():
    clock = FakeClock()
    guard = MassFailureGuard(share=0.5, window=10.0)
    registry = make_registry(clock, guard=guard)
    instances = _fleet(registry, services=2, per_service=5)
    for instance in instances[:5]:  # all of svc0 fails, svc1 is fine
        registry.record_check_result(instance.id, False, "refused")
    assert not guard.active
    assert all(health(registry, instance) is Health.UNHEALTHY for instance in instances[:5])


def test_mass_failure_guard_can_be_turned_off():
    clock = FakeClock()
    guard = MassFailureGuard(share=0.5, window=10.0, enabled=False)
    registry = make_registry(clock, guard=guard)
    instances = _fleet(registry, services=2, per_service=5)
    for instance in instances:
        registry.record_check_result(instance.id, False, "timed out")
    assert not guard.active
    assert registry.discoverable("svc0") == []


def test_ipv6_respelled_keeps_health():
    registry = make_registry(FakeClock())
    first = register(registry, "v6", "[0:0:0:0:0:0:0:1]:80", {"type": "none"})
    registry.report_health(first.id, Health.HEALTHY, "up")
    again = register(registry, "v6", "[::1]:80", {"type": "none"})
    assert again.id == first.id
    assert again.health is Health.HEALTHY
    assert str(again.address) == "[::1]:80"


def test_ttl_expiry_counts_as_failure():
    clock = FakeClock()
    registry = make_registry(clock, rise=2)
    instance = register(registry, "web", "127.0.0.1:1", {"type": "ttl", "ttl": 5})
    registry.report_health(instance.id, Health.HEALTHY, "up")
    registry.report_health(instance.id, Health.HEALTHY, "up")
    clock.advance(5)
    registry.sweep()
    state = registry.health_state(instance.id)
    assert state.failures == 1
    assert state.successes == 0
    assert state.last_failure_at == clock.now
    registry.report_health(instance.id, Health.HEALTHY, "up")
    assert health(registry, instance) is Health.UNHEALTHY, "rise=2 needs two reports after the expiry"


def test_check_change_by_registration_is_in_history():
    registry = make_registry(FakeClock())
    instance = register(registry, "web", "127.0.0.1:1")
    registry.record_check_result(instance.id, True, "ok")
    register(registry, "web", "127.0.0.1:1", {"type": "none"})
    history = registry.history(instance.id)
    assert [(entry.previous, entry.health) for entry in history] == [
        (Health.UNKNOWN, Health.HEALTHY), (Health.HEALTHY, Health.UNKNOWN),
    ]
    assert history[-1].output == "check changed by a new registration"
