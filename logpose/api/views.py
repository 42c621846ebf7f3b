"""JSON shapes of the API's resources."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from logpose.model import Health, Instance, Service


def format_time(timestamp: float) -> str:
    """Return an RFC 3339 UTC time with second precision, e.g. ``2026-12-04T20:00:00Z``."""
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def instance_view(instance: Instance, service_name: str) -> dict[str, Any]:
    return {
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
        "check": {"type": instance.check.type.value, "ttl": instance.check.ttl},
        "registered_at": format_time(instance.registered_at),
        "updated_at": format_time(instance.updated_at),
        "modify_index": instance.modify_index,
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
