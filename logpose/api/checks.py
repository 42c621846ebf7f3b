"""Routes about health: maintenance (drain), transition history and server status."""

from __future__ import annotations

import json

from aiohttp import web

from logpose import __version__
from logpose.api.handlers import instance_id_from, json_response, read_json, read_object, view_instance
from logpose.api.state import REGISTRY, principal_of
from logpose.api.views import optional_time, transition_view
from logpose.errors import NotFoundError, ValidationError
from logpose.model import Health

MAX_REASON_LENGTH = 500


async def set_maintenance(request: web.Request) -> web.Response:
    """Take an instance out of discovery, or return it, without deregistering it."""
    instance_id = instance_id_from(request)
    body = read_object(await read_json(request), {"enabled", "reason"})
    enabled = body.get("enabled")
    if "enabled" not in body:
        raise ValidationError("enabled", "is required: true or false")
    if not isinstance(enabled, bool):
        raise ValidationError("enabled", f"must be true or false, got {json.dumps(enabled)}")
    reason = body.get("reason")
    if reason is not None and (not isinstance(reason, str) or len(reason) > MAX_REASON_LENGTH):
        raise ValidationError("reason", f"must be a string of at most {MAX_REASON_LENGTH} characters")
    if reason is not None and not enabled:
        raise ValidationError("reason", "applies only when enabling maintenance")
    registry = request.app[REGISTRY]
    instance = registry.get_instance(instance_id)
    if instance is None:
        raise NotFoundError(f"instance {instance_id!r} not found")
    principal_of(request).require_service("changing maintenance", instance.service)
    instance = await registry.set_maintenance(instance_id, (reason or "maintenance") if enabled else None)
    return json_response(view_instance(request, instance))


async def show_history(request: web.Request) -> web.Response:
    instance_id = instance_id_from(request)
    transitions = request.app[REGISTRY].history(instance_id)
    return json_response([transition_view(transition) for transition in transitions])


async def show_status(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    instances = registry.instances()
    guard = registry.guard
    counts = {health.value: 0 for health in Health}
    for instance in instances:
        counts[instance.health.value] += 1
    return json_response(
        {
            "version": __version__,
            "index": registry.index,
            "services": len(registry.services()),
            "instances": {"total": len(instances), **counts,
                          "maintenance": sum(1 for instance in instances if instance.in_maintenance)},
            "node": {
                "id": registry.node.node_id,
                "prober": registry.node.prober,
                "shared_database": registry.node.shared,
                "index": registry.index,
                "database_index": registry.database_index,
                "lag": max(0, registry.database_index - registry.index),
            },
            "mass_failure_guard": {
                "enabled": guard.enabled,
                "active": guard.active,
                "active_since": optional_time(guard.active_since),
                "engagements": guard.engagements,
                "share": guard.share,
            },
        },
        index=registry.index,
    )


def add_check_routes(app: web.Application) -> None:
    app.router.add_post("/api/instances/{instance_id}/maintenance", set_maintenance)
    app.router.add_get("/api/instances/{instance_id}/history", show_history)
    app.router.add_get("/api/status", show_status)
