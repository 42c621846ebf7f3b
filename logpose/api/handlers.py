"""Request handlers of the HTTP API; errors are raised and mapped by the problem middleware."""

from __future__ import annotations

import json
import uuid
from typing import Any

from aiohttp import web

from logpose.api.state import AUTHENTICATOR, DISCOVERY_CACHE, METRICS, REGISTRY, peer_certificate_name, principal_of
from logpose.api.views import instance_view, service_view
from logpose.errors import InstanceNotRegisteredError, MalformedRequestError, NotFoundError, ValidationError
from logpose.model import (
    Instance,
    parse_health,
    parse_health_report,
    parse_instance_spec,
    parse_output,
    parse_service_code,
    parse_service_name,
)

INDEX_HEADER = "X-LogPose-Index"
MAX_COMMON_NAME_LENGTH = 128
MAX_SECRET_LENGTH = 1024


async def read_json(request: web.Request) -> Any:
    body = await request.read()
    try:
        return json.loads(body, parse_constant=_reject_constant, parse_float=_parse_finite) if body else None
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise MalformedRequestError("body", f"is not valid JSON: {exc}") from None


def _parse_finite(text: str) -> float:
    number = float(text)
    if number in (float("inf"), float("-inf")):
        raise ValueError(f"{text} is out of the range of a double")
    return number


def _reject_constant(name: str) -> None:
    # Python's json accepts NaN and Infinity, which RFC 8259 JSON does not have.
    raise ValueError(f"{name} is not a JSON value")


def read_object(body: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ValidationError("body", "must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ValidationError(unknown[0], f"unknown field; accepted: {', '.join(sorted(allowed))}")
    return body


def instance_id_from(request: web.Request) -> str:
    text = request.match_info["instance_id"]
    try:
        return str(uuid.UUID(text)) if len(text) == 36 else _bad_id(text)
    except ValueError:
        return _bad_id(text)


def _bad_id(text: str) -> str:
    raise ValidationError("id", f"{text[:64]!r} is not an instance id (a UUID like 3f2c…-…)")


def json_response(data: Any, status: int = 200, index: int | None = None) -> web.Response:
    headers = {INDEX_HEADER: str(index)} if index is not None else None
    return web.Response(status=status, body=json.dumps(data).encode(), content_type="application/json", headers=headers)


def view_instance(request: web.Request, instance: Instance) -> dict[str, Any]:
    service = request.app[REGISTRY].get_service(instance.service)
    state = request.app[REGISTRY].health_state(instance.id)
    return instance_view(instance, service.name if service else instance.service, state)


def service_or_404(request: web.Request, code: str):
    service = request.app[REGISTRY].get_service(code)
    if service is None:
        raise NotFoundError(f"service {code!r} not found")
    return service


# ----- routes ----------------------------------------------------------------

async def health_check(request: web.Request) -> web.Response:
    return json_response({"status": "ok", "index": request.app[REGISTRY].index})


async def show_metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS].render(request.headers.get("Accept"))
    return web.Response(body=body, headers={"Content-Type": content_type})


async def issue_token(request: web.Request) -> web.Response:
    body = read_object(await read_json(request), {"common_name", "secret"})
    common_name = body.get("common_name")
    secret = body.get("secret")
    if not isinstance(common_name, str) or not 0 < len(common_name) <= MAX_COMMON_NAME_LENGTH:
        raise ValidationError("common_name", f"must be a string of 1 to {MAX_COMMON_NAME_LENGTH} characters")
    if secret is not None and (not isinstance(secret, str) or not 0 < len(secret) <= MAX_SECRET_LENGTH):
        raise ValidationError("secret", f"must be a string of 1 to {MAX_SECRET_LENGTH} characters")
    authenticator = request.app[AUTHENTICATOR]
    # Without a secret, a client certificate verified by the TLS layer is the credential.
    token = await authenticator.issue_token(
        common_name, secret.strip() if secret is not None else None, request.remote, peer_certificate_name(request)
    )
    return json_response({"access_token": token, "token_type": "Bearer", "expires_in": authenticator.token_lifetime})


async def list_services(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    index = registry.index
    views = [service_view(service, registry.instances_of(service.code)) for service in registry.services()]
    return json_response(views, index=index)


async def create_service(request: web.Request) -> web.Response:
    principal_of(request).require_admin("creating a service")
    body = read_object(await read_json(request), {"code", "name"})
    if "code" not in body:
        raise ValidationError("code", "is required")
    code = parse_service_code(body["code"])
    name = parse_service_name(body["name"]) if body.get("name") is not None else code
    service = await request.app[REGISTRY].create_service(code, name)
    return json_response(service_view(service, []), status=201)


async def show_service(request: web.Request) -> web.Response:
    code = parse_service_code(request.match_info["code"])
    service = service_or_404(request, code)
    registry = request.app[REGISTRY]
    return json_response(service_view(service, registry.instances_of(code)), index=registry.index)


async def delete_service(request: web.Request) -> web.Response:
    principal_of(request).require_admin("deleting a service")
    code = parse_service_code(request.match_info["code"])
    force_text = request.query.get("force", "false").lower()
    if force_text not in ("true", "false", "1", "0"):
        raise ValidationError("force", f"must be true or false, got {force_text!r}")
    await request.app[REGISTRY].delete_service(code, force=force_text in ("true", "1"))
    return web.Response(status=204)


async def register_instance(request: web.Request) -> web.Response:
    code = parse_service_code(request.match_info["code"])
    principal_of(request).require_service("registering an instance", code)
    spec = parse_instance_spec(await read_json(request))
    instance, created = await request.app[REGISTRY].register(code, spec)
    request.app[METRICS].observe_registration(created)
    return json_response(view_instance(request, instance), status=201 if created else 200)


async def list_service_instances(request: web.Request) -> web.Response:
    code = parse_service_code(request.match_info["code"])
    service = service_or_404(request, code)
    registry = request.app[REGISTRY]
    index = registry.index
    views = [instance_view(instance, service.name) for instance in registry.instances_of(code)]
    return json_response(views, index=index)


async def list_instances(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    index = registry.index
    if "service" in request.query:
        code = parse_service_code(request.query["service"], "service")
        instances = registry.instances_of(code)
    else:
        instances = registry.instances()
    if "health" in request.query:
        health = parse_health(request.query["health"])
        instances = [instance for instance in instances if instance.health is health]
    return json_response([view_instance(request, instance) for instance in instances], index=index)


async def show_instance(request: web.Request) -> web.Response:
    instance_id = instance_id_from(request)
    instance = request.app[REGISTRY].get_instance(instance_id)
    if instance is None:
        raise NotFoundError(f"instance {instance_id!r} not found")
    return json_response(view_instance(request, instance), index=request.app[REGISTRY].index)


async def deregister_instance(request: web.Request) -> web.Response:
    instance_id = instance_id_from(request)
    registry = request.app[REGISTRY]
    instance = registry.get_instance(instance_id)
    if instance is None:
        raise NotFoundError(f"instance {instance_id!r} not found")
    principal_of(request).require_service("deregistering an instance", instance.service)
    await registry.deregister(instance_id)
    return web.Response(status=204)


async def report_health(request: web.Request) -> web.Response:
    instance_id = instance_id_from(request)
    registry = request.app[REGISTRY]
    body = read_object(await read_json(request), {"status", "output"})
    if "status" not in body:
        raise ValidationError("status", "is required: 'Healthy' or 'Unhealthy'")
    health = parse_health_report(body["status"])
    output = parse_output(body.get("output"))
    instance = registry.get_instance(instance_id)
    if instance is None:
        raise InstanceNotRegisteredError(f"instance {instance_id!r} is not registered; register it again")
    principal_of(request).require_service("reporting health", instance.service)
    instance = registry.report_health(instance_id, health, output)
    return json_response(view_instance(request, instance))


async def discover(request: web.Request) -> web.Response:
    code = parse_service_code(request.match_info["code"])
    service = service_or_404(request, code)
    body = request.app[DISCOVERY_CACHE].body(code, service.name)
    return web.Response(
        body=body,
        content_type="application/json",
        headers={INDEX_HEADER: str(request.app[REGISTRY].index)},
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", health_check)
    app.router.add_get("/metrics", show_metrics)
    app.router.add_post("/api/auth/token", issue_token)
    app.router.add_get("/api/services", list_services)
    app.router.add_post("/api/services", create_service)
    app.router.add_get("/api/services/{code}", show_service)
    app.router.add_delete("/api/services/{code}", delete_service)
    app.router.add_get("/api/services/{code}/instances", list_service_instances)
    app.router.add_post("/api/services/{code}/instances", register_instance)
    app.router.add_get("/api/instances", list_instances)
    app.router.add_get("/api/instances/{instance_id}", show_instance)
    app.router.add_delete("/api/instances/{instance_id}", deregister_instance)
    app.router.add_post("/api/instances/{instance_id}/health", report_health)
    app.router.add_get("/api/discover/{code}", discover)
