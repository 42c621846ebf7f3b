"""The authenticated HTTP API (aiohttp)."""

from __future__ import annotations

from aiohttp import web

from logpose.api.checks import add_check_routes
from logpose.api.clients import add_client_routes
from logpose.api.discovery import DiscoveryCache
from logpose.api.handlers import add_routes
from logpose.api.openapi import add_openapi_route
from logpose.api.state import AUTHENTICATOR, DISCOVERY_CACHE, METRICS, REGISTRY, ApiMiddleware
from logpose.auth import Authenticator
from logpose.metrics import Metrics
from logpose.registry import Registry

MAX_BODY_BYTES = 1024 * 1024


def build_app(registry: Registry, authenticator: Authenticator, metrics: Metrics | None = None) -> web.Application:
    """Return the API application; without ``metrics`` it makes its own, fed only by the API."""
    metrics = metrics if metrics is not None else Metrics(registry)
    app = web.Application(
        client_max_size=MAX_BODY_BYTES, middlewares=[ApiMiddleware(authenticator, metrics).middleware]
    )
    app[METRICS] = metrics
    app[REGISTRY] = registry
    app[DISCOVERY_CACHE] = DiscoveryCache(registry)
    app[AUTHENTICATOR] = authenticator
    add_routes(app)
    add_check_routes(app)
    add_client_routes(app)
    add_openapi_route(app)
    return app


__all__ = ["build_app"]
