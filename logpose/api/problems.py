"""RFC 9457 problem details: the one place where errors become HTTP answers."""

from __future__ import annotations

import json
import logging
from typing import Any, Awaitable, Callable

from aiohttp import web

from logpose.errors import (
    AuthenticationError,
    ConflictError,
    InstanceNotRegisteredError,
    LogPoseError,
    MalformedRequestError,
    NotFoundError,
    PermissionDeniedError,
    StoreUnavailableError,
    TooManyRequestsError,
    ValidationError,
)
from logpose.log import http_log

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_TYPE_PREFIX = "urn:logpose:problem:"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def problem_response(
    status: int,
    problem: str,
    title: str,
    detail: str,
    *,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> web.Response:
    body = {"type": PROBLEM_TYPE_PREFIX + problem, "title": title, "status": status, "detail": detail, **extra}
    return web.Response(
        status=status,
        body=json.dumps(body).encode(),
        content_type=PROBLEM_CONTENT_TYPE,
        headers=headers,
    )


def _from_logpose_error(error: LogPoseError) -> web.Response:
    if isinstance(error, ValidationError):
        # Unparseable input is malformed (400); well-formed JSON with bad fields is 422.
        status = 400 if isinstance(error, MalformedRequestError) else 422
        return problem_response(
            status, "validation", "Invalid Request", error.detail,
            errors=[{"field": error.field, "message": error.reason}],
        )
    if isinstance(error, InstanceNotRegisteredError):
        return problem_response(404, "instance-not-registered", "Instance Not Registered", error.detail)
    if isinstance(error, NotFoundError):
        return problem_response(404, "not-found", "Not Found", error.detail)
    if isinstance(error, ConflictError):
        return problem_response(409, "conflict", "Conflict", error.detail)
    if isinstance(error, AuthenticationError):
        return problem_response(
            401, "unauthorized", "Unauthorized", error.detail,
            headers={"WWW-Authenticate": 'Bearer realm="logpose"'},
        )
    if isinstance(error, PermissionDeniedError):
        return problem_response(403, "forbidden", "Forbidden", error.detail, permission=error.permission)
    if isinstance(error, TooManyRequestsError):
        return problem_response(
            429, "too-many-requests", "Too many requests", error.detail,
            headers={"Retry-After": str(error.retry_after)},
        )
    if isinstance(error, StoreUnavailableError):
        return problem_response(
            503, "store-unavailable", "Service Unavailable",
            f"the write was not committed because the database is unavailable; retry later ({error.detail})",
            headers={"Retry-After": "5"},
        )
    return problem_response(500, "internal", "Internal Server Error", error.detail)


def _from_http_exception(error: web.HTTPException) -> web.Response:
    details = {
        404: "no such resource; see the API documentation for the routes",
        405: "method not allowed on this resource",
        413: "the request body is larger than the 1 MiB limit",
    }
    detail = details.get(error.status, error.reason)
    headers = {"Allow": error.headers["Allow"]} if "Allow" in error.headers else None
    problem = {404: "not-found", 405: "method-not-allowed", 413: "payload-too-large"}.get(error.status, "http-error")
    return problem_response(error.status, problem, error.reason, detail, headers=headers)


def error_response(request: web.Request, error: Exception) -> web.Response:
    """Return the ``application/problem+json`` response for ``error``, ours or the framework's.

    An error that is neither a LogPoseError nor a web.HTTPException is a bug:
    it is logged with the request and gets a 500 response. The caller re-raises a
    web.HTTPException below 400 (a redirect) instead of calling this.
    """
    if isinstance(error, LogPoseError):
        if isinstance(error, StoreUnavailableError) and http_log.isEnabledFor(logging.DEBUG):
            # The store logs each change of database reachability once; per request is DEBUG.
            http_log.debug("%s %s failed, database unavailable: %s", request.method, request.path, error.detail)
        return _from_logpose_error(error)
    if isinstance(error, web.HTTPException):
        return _from_http_exception(error)
    http_log.error(
        "Unhandled error in %s %s from %s", request.method, request.path, request.remote, exc_info=error
    )
    return problem_response(500, "internal", "Internal Server Error", "the server failed; see its log")
