"""Routes that manage clients: create, list, show, remove and rotate secrets. Admin only."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from aiohttp import web

from logpose.api.handlers import json_response, read_json, read_object
from logpose.api.state import AUTHENTICATOR, principal_of
from logpose.api.views import format_time
from logpose.auth import parse_client_services, parse_common_name, parse_role
from logpose.errors import ValidationError
from logpose.model import ClientRecord


def client_view(client: ClientRecord, secret: str | None = None) -> dict[str, Any]:
    """Return a client as the API shows it; ``secret`` is included only when just made."""
    view: dict[str, Any] = {
        "common_name": client.common_name,
        "role": client.role,
        "services": list(client.services),
        "created_at": format_time(client.created_at),
    }
    if secret is not None:
        view["secret"] = secret
    return view


def _common_name_from(request: web.Request) -> str:
    return parse_common_name(request.match_info["common_name"])


async def create_client(request: web.Request) -> web.Response:
    principal_of(request).require_admin("creating a client")
    body = read_object(await read_json(request), {"common_name", "role", "services"})
    for required in ("common_name", "role"):
        if required not in body:
            raise ValidationError(required, "is required")
    common_name = parse_common_name(body["common_name"])
    role = parse_role(body["role"])
    services = parse_client_services(body.get("services"), role)
    client, secret = await request.app[AUTHENTICATOR].create_client(common_name, role, services)
    response = json_response(client_view(client, secret), status=201)
    response.headers["Location"] = f"/api/clients/{quote(common_name, safe='')}"
    return response


async def list_clients(request: web.Request) -> web.Response:
    principal_of(request).require_admin("listing clients")
    return json_response([client_view(client) for client in request.app[AUTHENTICATOR].clients()])


async def show_client(request: web.Request) -> web.Response:
    principal_of(request).require_admin("showing a client")
    common_name = _common_name_from(request)
    return json_response(client_view(request.app[AUTHENTICATOR].get_client(common_name)))


async def delete_client(request: web.Request) -> web.Response:
    principal_of(request).require_admin("removing a client")
    await request.app[AUTHENTICATOR].delete_client(_common_name_from(request))
    return web.Response(status=204)


async def rotate_secret(request: web.Request) -> web.Response:
    principal_of(request).require_admin("rotating a client's secret")
    client, secret = await request.app[AUTHENTICATOR].rotate_secret(_common_name_from(request))
    return json_response(client_view(client, secret))


def add_client_routes(app: web.Application) -> None:
    app.router.add_post("/api/clients", create_client)
    app.router.add_get("/api/clients", list_clients)
    app.router.add_get("/api/clients/{common_name}", show_client)
    app.router.add_delete("/api/clients/{common_name}", delete_client)
    app.router.add_post("/api/clients/{common_name}/rotate", rotate_secret)
