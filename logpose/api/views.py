"""JSON shapes of the API's resources."""

from __future__ import annotations

import functools
import math
from datetime import datetime, timezone
from typing import Any

from logpose.health import HealthState, HealthTransition
from logpose.model import Health, Instance, Service


def format_time(timestamp: float) -> str:
    """Return an RFC 3339 UTC time with second precision, e.g. ``2026-12-04T20:00:00Z``."""
    return _format_second(math.floor(timestamp))


# An instance's times repeat across many views (registered_at equals updated_at
# until the first update), so formatted seconds are kept.
@functools.lru_cache(maxsize=4096)
def _format_second(second: int) -> str:
    return datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def optional_time(timestamp: float | None) -> str | None:
    return format_time(timestamp) if timestamp is not None else None


def instance_view(instance: Instance, service_name: str, state: HealthState | None = None) -> dict[str, Any]:
    """Return the instance's JSON; ``state`` adds the check's counters and times."""
    view = {
        "id": instance.id,
        "service": instance.service,
        "service_name": service_name,
        "address": str(instance.address),
        "host": instance.address.host,
        "port": instance.address.port,
        "protocol": instance.protocol.value,
        "health": instance.health.value,
        "output": instance.output,
        "tags": list(instance.tags),
        "metadata": dict(instance.metadata),
        "weight": instance.weight,
        "check": instance.check.to_json(),
        "maintenance": {
            "enabled": instance.in_maintenance,
            "reason": instance.maintenance_reason,
            "since": optional_time(instance.maintenance_since),
        },
        "registered_at": format_time(instance.registered_at),
        "updated_at": format_time(instance.updated_at),
        "modify_index": instance.modify_index,
    }
    if state is not None:
        view["check_status"] = {
            "last_checked_at": optional_time(state.last_checked_at),
            "last_success_at": optional_time(state.last_success_at),
            "last_failure_at": optional_time(state.last_failure_at),
            "consecutive_successes": state.successes,
            "consecutive_failures": state.failures,
        }
    return view


def transition_view(transition: HealthTransition) -> dict[str, Any]:
    return {
        "at": format_time(transition.at),
        "from": transition.previous.value,
        "to": transition.health.value,
        "output": transition.output,
    }


def service_view(service: Service, instances: list[Instance]) -> dict[str, Any]:
    return {
        "code": service.code,
        "name": service.name,
        "instance_count": len(instances),
        "healthy_count": sum(1 for instance in instances if instance.health is Health.HEALTHY),
        "created_index": service.created_index,
        "modify_index": service.modify_index,
    }
