"""Typed application state and the authentication middleware."""

from __future__ import annotations

from aiohttp import web

from logpose.api.problems import Handler
from logpose.auth import Authenticator, Principal
from logpose.errors import AuthenticationError
from logpose.registry import Registry

REGISTRY = web.AppKey("registry", Registry)
AUTHENTICATOR = web.AppKey("authenticator", Authenticator)
PRINCIPAL_KEY = "logpose.principal"

# Routes anyone may call: liveness and the token exchange itself.
PUBLIC_PATHS = frozenset({"/healthz", "/api/auth/token"})


def principal_of(request: web.Request) -> Principal:
    return request[PRINCIPAL_KEY]


@web.middleware
async def authentication_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Require a valid Bearer token on every route but the public ones."""
    if request.path in PUBLIC_PATHS or request.match_info.http_exception is not None:
        return await handler(request)
    header = request.headers.get("Authorization")
    if header is None:
        raise AuthenticationError("missing Authorization header; send 'Authorization: Bearer <token>'")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("malformed Authorization header; expected 'Bearer <token>'")
    request[PRINCIPAL_KEY] = request.app[AUTHENTICATOR].verify_token(token.strip())
    return await handler(request)
