"""The authenticated HTTP API (aiohttp)."""

from __future__ import annotations

from aiohttp import web

from logpose.api.checks import add_check_routes
from logpose.api.clients import add_client_routes
from logpose.api.discovery import DiscoveryCache
from logpose.api.handlers import add_routes
from logpose.api.problems import problem_middleware
from logpose.api.state import AUTHENTICATOR, DISCOVERY_CACHE, REGISTRY, authentication_middleware
from logpose.auth import Authenticator
from logpose.registry import Registry

MAX_BODY_BYTES = 1024 * 1024


def build_app(registry: Registry, authenticator: Authenticator) -> web.Application:
    app = web.Application(
        client_max_size=MAX_BODY_BYTES,
        middlewares=[problem_middleware, authentication_middleware],
    )
    app[REGISTRY] = registry
    app[DISCOVERY_CACHE] = DiscoveryCache(registry)
    app[AUTHENTICATOR] = authenticator
    add_routes(app)
    add_check_routes(app)
    add_client_routes(app)
    return app


__all__ = ["build_app"]
