"""Typed application state, and the middleware that authenticates and authorises every request.

Authorisation has two layers. This middleware applies the role rules that
depend only on the route: every role may read (GET and HEAD), and a write
needs the admin role unless its route is one of ``SERVICE_SCOPED_WRITES``. The
handlers of those routes check the service itself with
``Principal.require_service``, because only they know which service an
instance id belongs to. Handlers of admin-only reads call
``Principal.require_admin``. A write route missing from
``SERVICE_SCOPED_WRITES`` therefore fails closed: only admins may call it.
"""

from __future__ import annotations

import time

from aiohttp import web

from logpose.api.discovery import DiscoveryCache
from logpose.api.problems import Handler, error_response
from logpose.auth import Authenticator, Principal
from logpose.errors import AuthenticationError
from logpose.metrics import Metrics
from logpose.registry import Registry

REGISTRY = web.AppKey("registry", Registry)
DISCOVERY_CACHE = web.AppKey("discovery_cache", DiscoveryCache)
AUTHENTICATOR = web.AppKey("authenticator", Authenticator)
METRICS = web.AppKey("metrics", Metrics)
PRINCIPAL_KEY = "logpose.principal"

# Routes anyone may call: liveness, the token exchange itself and the API's description.
PUBLIC_PATHS = frozenset({"/healthz", "/api/auth/token", "/api/openapi.json"})

READ_METHODS = frozenset({"GET", "HEAD"})

# Writes that a registrar may make for the services in its list; the handler checks the service.
SERVICE_SCOPED_WRITES = frozenset({
    ("POST", "/api/services/{code}/instances"),
    ("DELETE", "/api/instances/{instance_id}"),
    ("POST", "/api/instances/{instance_id}/health"),
    ("POST", "/api/instances/{instance_id}/maintenance"),
})


def principal_of(request: web.Request) -> Principal:
    return request[PRINCIPAL_KEY]


def peer_certificate_name(request: web.Request) -> str | None:
    """Return the CN of the client certificate the TLS layer verified, or None without one.

    The server requests a client certificate only when a client CA is
    configured, and the handshake fails for a certificate that the CA did not
    sign, so any certificate seen here is trusted. A subject with more than one
    CN gives None, because it names no single client.
    """
    transport = request.transport
    certificate = transport.get_extra_info("peercert") if transport is not None else None
    if not certificate:
        return None
    names = [value for rdn in certificate.get("subject", ()) for key, value in rdn if key == "commonName"]
    return names[0] if len(names) == 1 else None


def _authorize(principal: Principal, request: web.Request) -> None:
    if request.method in READ_METHODS:
        return
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else request.path
    if (request.method, route) in SERVICE_SCOPED_WRITES:
        return
    principal.require_admin(f"{request.method} {route}")


def _authenticate(request: web.Request, authenticator: Authenticator) -> Principal:
    """Return the principal of the request's Bearer token, after applying the route's role rule."""
    header = request.headers.get("Authorization")
    if header is None:
        raise AuthenticationError("missing Authorization header; send 'Authorization: Bearer <token>'")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("malformed Authorization header; expected 'Bearer <token>'")
    principal = authenticator.verify_token(token.strip())
    _authorize(principal, request)
    return principal


class ApiMiddleware:
    """The API's one middleware: authentication, problem details, and request metrics.

    Each aiohttp middleware adds a coroutine and a wrapper call to every
    request, so the three steps share one layer. In order:

    - every route but the public ones needs a valid Bearer token, and the
      route's role rule is applied before the handler runs;
    - every error, ours or the framework's, becomes an
      ``application/problem+json`` response (``error_response``);
    - every request is counted and timed by method, route pattern (never the
      raw path) and the final status, after the error became a response. A
      request cancelled because its client hung up has no status and is not counted.
    """

    def __init__(self, authenticator: Authenticator, metrics: Metrics) -> None:
        self._authenticator = authenticator
        self._observe = metrics.observe_http

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            if request.path not in PUBLIC_PATHS and request.match_info.http_exception is None:
                request[PRINCIPAL_KEY] = _authenticate(request, self._authenticator)
            response = await handler(request)
        except web.HTTPException as error:
            if error.status < 400:
                self._observe_request(request, error.status, started)
                raise
            response = error_response(request, error)
        except Exception as error:
            response = error_response(request, error)
        self._observe_request(request, response.status, started)
        return response

    def _observe_request(self, request: web.Request, status: int, started: float) -> None:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else None
        self._observe(request.method, route, status, time.perf_counter() - started)
