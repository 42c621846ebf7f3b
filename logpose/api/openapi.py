"""The OpenAPI 3.1 description of the HTTP API, written as data, and the route that serves it.

Every route that ``logpose.api.build_app`` registers has an operation here, and
every operation here is a registered route; a test compares the two. Request
schemas state what the handlers accept, and response schemas what the views in
``logpose.api.views`` and ``logpose.api.clients`` return.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from logpose import __version__
from logpose.auth import MAX_CLIENT_SERVICES
from logpose.model import (
    MAX_CHECK_SECONDS,
    MAX_METADATA_ENTRIES,
    MAX_METADATA_KEY_LENGTH,
    MAX_METADATA_VALUE_LENGTH,
    MAX_SERVICE_NAME_LENGTH,
    MAX_TAG_LENGTH,
    MAX_TAGS,
    MAX_WEIGHT,
    CheckType,
    Health,
    Protocol,
)

OPENAPI_PATH = "/api/openapi.json"
JSON = "application/json"
PROBLEM_JSON = "application/problem+json"
INDEX_HEADER = "X-LogPose-Index"

SERVICE_CODE_PATTERN = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
COMMON_NAME_PATTERN = "^[A-Za-z0-9._@-]{1,128}$"
ROLES = ["reader", "registrar", "admin"]
HEALTH_VALUES = [health.value for health in Health]
REPORTED_HEALTH_VALUES = [Health.HEALTHY.value, Health.UNHEALTHY.value]
PROTOCOLS = [protocol.value for protocol in Protocol]
CHECK_TYPES = [check_type.value for check_type in CheckType]
MAX_REASON_LENGTH = 500  # the maintenance handler's limit on ``reason``


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _response(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/responses/{name}"}


def _json_body(schema: dict[str, Any], description: str, *, indexed: bool = False) -> dict[str, Any]:
    """Return a response object with a JSON body; ``indexed`` adds the change index header."""
    response: dict[str, Any] = {"description": description, "content": {JSON: {"schema": schema}}}
    if indexed:
        response["headers"] = {INDEX_HEADER: {"$ref": "#/components/headers/Index"}}
    return response


def _request_body(name: str, *, required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {JSON: {"schema": _ref(name)}}}


def _errors(*statuses: int) -> dict[str, Any]:
    """Return the problem responses of an operation: the given statuses, 401 and a default."""
    names = {
        400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 409: "Conflict",
        413: "PayloadTooLarge", 422: "ValidationFailed", 429: "TooManyRequests", 503: "StoreUnavailable",
    }
    responses = {str(status): _response(names[status]) for status in sorted({401, *statuses})}
    responses["default"] = _response("Problem")
    return responses


def _path_parameter(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema, "description": description}


CODE_PARAMETER = _path_parameter("code", {"type": "string", "pattern": SERVICE_CODE_PATTERN}, "The service code.")
INSTANCE_PARAMETER = _path_parameter("instance_id", {"type": "string", "format": "uuid"}, "The instance id.")
CLIENT_PARAMETER = _path_parameter(
    "common_name", {"type": "string", "pattern": COMMON_NAME_PATTERN}, "The client's common name."
)
PUBLIC = {"security": []}  # an operation that needs no token


def _operation(operation_id: str, summary: str, responses: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"operationId": operation_id, "summary": summary, **fields, "responses": responses}


PATHS: dict[str, Any] = {
    "/healthz": {
        "get": _operation(
            "healthCheck", "Liveness of the server, with the change index",
            {"200": _json_body(_ref("ServerHealth"), "The server is up."), "default": _response("Problem")},
            tags=["server"], **PUBLIC,
        ),
    },
    "/metrics": {
        "get": _operation(
            "metrics", "Prometheus metrics of this server",
            {
                "200": {
                    "description": "The metrics in the Prometheus text format, or OpenMetrics when the "
                                   "Accept header asks for it.",
                    "content": {
                        "text/plain": {"schema": {"type": "string"}},
                        "application/openmetrics-text": {"schema": {"type": "string"}},
                    },
                },
                **_errors(),
            },
            tags=["server"],
        ),
    },
    OPENAPI_PATH: {
        "get": _operation(
            "openapi", "This OpenAPI document",
            {"200": _json_body({"type": "object"}, "The OpenAPI 3.1 document."), "default": _response("Problem")},
            tags=["server"], **PUBLIC,
        ),
    },
    "/api/auth/token": {
        "post": _operation(
            "issueToken", "Exchange a client's secret, or its TLS client certificate, for a token",
            {"200": _json_body(_ref("Token"), "A new bearer token."), **_errors(400, 413, 422, 429)},
            tags=["auth"], requestBody=_request_body("TokenRequest"), **PUBLIC,
        ),
    },
    "/api/services": {
        "get": _operation(
            "listServices", "List every service",
            {"200": _json_body({"type": "array", "items": _ref("Service")}, "Every service.", indexed=True),
             **_errors()},
            tags=["services"],
        ),
        "post": _operation(
            "createService", "Create a service (admin)",
            {"201": _json_body(_ref("Service"), "The new service."), **_errors(400, 403, 409, 413, 422, 503)},
            tags=["services"], requestBody=_request_body("ServiceCreate"),
        ),
    },
    "/api/services/{code}": {
        "parameters": [CODE_PARAMETER],
        "get": _operation(
            "showService", "Show a service",
            {"200": _json_body(_ref("Service"), "The service.", indexed=True), **_errors(404, 422)},
            tags=["services"],
        ),
        "delete": _operation(
            "deleteService", "Delete a service (admin)",
            {"204": {"description": "The service is deleted."}, **_errors(403, 404, 409, 422, 503)},
            tags=["services"],
            parameters=[{
                "name": "force", "in": "query", "required": False,
                "schema": {"type": "string", "enum": ["true", "false", "1", "0"], "default": "false"},
                "description": "Delete the service's instances too; without it a service with instances is 409.",
            }],
        ),
    },
    "/api/services/{code}/instances": {
        "parameters": [CODE_PARAMETER],
        "get": _operation(
            "listServiceInstances", "List every instance of a service, any health",
            {"200": _json_body({"type": "array", "items": _ref("Instance")}, "The instances.", indexed=True),
             **_errors(404, 422)},
            tags=["instances"],
        ),
        "post": _operation(
            "registerInstance", "Register an instance, or update the one with the same service, host, port "
                                "and protocol",
            {
                "200": _json_body(_ref("Instance"), "An existing instance was updated."),
                "201": _json_body(_ref("Instance"), "A new instance was registered."),
                **_errors(400, 403, 413, 422, 503),
            },
            tags=["instances"], requestBody=_request_body("Registration"),
        ),
    },
    "/api/instances": {
        "get": _operation(
            "listInstances", "List every instance, optionally filtered",
            {"200": _json_body({"type": "array", "items": _ref("Instance")}, "The instances.", indexed=True),
             **_errors(422)},
            tags=["instances"],
            parameters=[
                {"name": "service", "in": "query", "required": False,
                 "schema": {"type": "string", "pattern": SERVICE_CODE_PATTERN},
                 "description": "Only instances of this service."},
                {"name": "health", "in": "query", "required": False,
                 "schema": {"type": "string", "enum": HEALTH_VALUES},
                 "description": "Only instances of this health (any letter case)."},
            ],
        ),
    },
    "/api/instances/{instance_id}": {
        "parameters": [INSTANCE_PARAMETER],
        "get": _operation(
            "showInstance", "Show an instance with its check status",
            {"200": _json_body(_ref("Instance"), "The instance.", indexed=True), **_errors(404, 422)},
            tags=["instances"],
        ),
        "delete": _operation(
            "deregisterInstance", "Deregister an instance",
            {"204": {"description": "The instance is deregistered."}, **_errors(403, 404, 422, 503)},
            tags=["instances"],
        ),
    },
    "/api/instances/{instance_id}/health": {
        "parameters": [INSTANCE_PARAMETER],
        "post": _operation(
            "reportHealth", "Report the instance's health; it counts as a check result",
            {"200": _json_body(_ref("Instance"), "The instance after the report."),
             **_errors(400, 403, 404, 413, 422)},
            tags=["instances"], requestBody=_request_body("HealthReport"),
        ),
    },
    "/api/instances/{instance_id}/maintenance": {
        "parameters": [INSTANCE_PARAMETER],
        "post": _operation(
            "setMaintenance", "Take an instance out of discovery, or return it, without deregistering it",
            {"200": _json_body(_ref("Instance"), "The instance."), **_errors(400, 403, 404, 413, 422, 503)},
            tags=["instances"], requestBody=_request_body("Maintenance"),
        ),
    },
    "/api/instances/{instance_id}/history": {
        "parameters": [INSTANCE_PARAMETER],
        "get": _operation(
            "showHistory", "List the instance's recent health transitions, oldest first",
            {"200": _json_body({"type": "array", "items": _ref("Transition")}, "The transitions."),
             **_errors(404, 422)},
            tags=["instances"],
        ),
    },
    "/api/discover/{code}": {
        "parameters": [CODE_PARAMETER],
        "get": _operation(
            "discover", "List the instances that discovery hands out: Healthy and not in maintenance",
            {"200": _json_body({"type": "array", "items": _ref("Instance")}, "The discoverable instances.",
                               indexed=True),
             **_errors(404, 422)},
            tags=["discovery"],
        ),
    },
    "/api/status": {
        "get": _operation(
            "showStatus", "Show the server's catalog counts, node and mass-failure guard",
            {"200": _json_body(_ref("Status"), "The status.", indexed=True), **_errors()},
            tags=["server"],
        ),
    },
    "/api/clients": {
        "get": _operation(
            "listClients", "List every client, without secrets (admin)",
            {"200": _json_body({"type": "array", "items": _ref("Client")}, "Every client."), **_errors(403)},
            tags=["clients"],
        ),
        "post": _operation(
            "createClient", "Create a client; its secret is in this response only (admin)",
            {
                "201": {
                    **_json_body(_ref("Client"), "The new client with its secret."),
                    "headers": {"Location": {"schema": {"type": "string"}, "description": "The client's URL path."}},
                },
                **_errors(400, 403, 409, 413, 422, 503),
            },
            tags=["clients"], requestBody=_request_body("ClientCreate"),
        ),
    },
    "/api/clients/{common_name}": {
        "parameters": [CLIENT_PARAMETER],
        "get": _operation(
            "showClient", "Show a client (admin)",
            {"200": _json_body(_ref("Client"), "The client."), **_errors(403, 404, 422)},
            tags=["clients"],
        ),
        "delete": _operation(
            "deleteClient", "Remove a client; its tokens fail from now on (admin)",
            {"204": {"description": "The client is removed."}, **_errors(403, 404, 409, 422, 503)},
            tags=["clients"],
        ),
    },
    "/api/clients/{common_name}/rotate": {
        "parameters": [CLIENT_PARAMETER],
        "post": _operation(
            "rotateSecret", "Give a client a new secret; its earlier tokens fail (admin)",
            {"200": _json_body(_ref("Client"), "The client with its new secret."),
             **_errors(403, 404, 422, 503)},
            tags=["clients"],
        ),
    },
}

_TIME = {"type": "string", "format": "date-time", "description": "RFC 3339 UTC time, second precision."}
_OPTIONAL_TIME = {"type": ["string", "null"], "format": "date-time"}
_SECONDS = {"type": "number", "maximum": MAX_CHECK_SECONDS}
_COUNT = {"type": "integer", "minimum": 1, "maximum": 100}
_INDEX = {"type": "integer", "minimum": 0}

SCHEMAS: dict[str, Any] = {
    "Problem": {
        "type": "object",
        "description": "An RFC 9457 problem detail.",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {"type": "string", "description": "urn:logpose:problem:<kind>"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "errors": {
                "type": "array",
                "description": "The invalid fields, on 400 and 422.",
                "items": {
                    "type": "object",
                    "required": ["field", "message"],
                    "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
                },
            },
            "permission": {"type": "string", "description": "What the token lacks, on 403: admin or register:<code>."},
        },
    },
    "ServerHealth": {
        "type": "object",
        "required": ["status", "index"],
        "properties": {"status": {"const": "ok"}, "index": _INDEX},
    },
    "TokenRequest": {
        "type": "object",
        "required": ["common_name"],
        "additionalProperties": False,
        "properties": {
            "common_name": {"type": "string", "minLength": 1, "maxLength": 128},
            "secret": {
                "type": "string", "minLength": 1, "maxLength": 1024,
                "description": "Leave out only when a TLS client certificate whose CN is common_name proves the name.",
            },
        },
    },
    "Token": {
        "type": "object",
        "required": ["access_token", "token_type", "expires_in"],
        "properties": {
            "access_token": {"type": "string", "description": "An HS256 JWT."},
            "token_type": {"const": "Bearer"},
            "expires_in": {"type": "integer", "description": "Seconds until the token expires."},
        },
    },
    "ServiceCreate": {
        "type": "object",
        "required": ["code"],
        "additionalProperties": False,
        "properties": {
            "code": {"type": "string", "pattern": SERVICE_CODE_PATTERN, "description": "One lower-case DNS label; "
                     "'ns' is reserved."},
            "name": {"type": ["string", "null"], "minLength": 1, "maxLength": MAX_SERVICE_NAME_LENGTH,
                     "description": "Display name; defaults to the code."},
        },
    },
    "Service": {
        "type": "object",
        "required": ["code", "name", "instance_count", "healthy_count", "created_index", "modify_index"],
        "properties": {
            "code": {"type": "string"},
            "name": {"type": "string"},
            "instance_count": {"type": "integer", "minimum": 0},
            "healthy_count": {"type": "integer", "minimum": 0},
            "created_index": _INDEX,
            "modify_index": _INDEX,
        },
    },
    "CheckSettings": {
        "type": "object",
        "description": "How the instance's health is checked. Fields that do not apply to the type are rejected.",
        "additionalProperties": False,
        "properties": {
            "type": {"type": "string", "enum": CHECK_TYPES, "default": "tcp",
                     "description": "tcp (default; none for Udp), http, ttl or none (health only from reports)."},
            "ttl": {**_SECONDS, "minimum": 1, "description": "Required for ttl: seconds between reports at most."},
            "interval": {**_SECONDS, "minimum": 0.05, "description": "tcp and http: seconds between probes."},
            "timeout": {**_SECONDS, "minimum": 0.01, "description": "tcp and http: less than the interval."},
            "rise": _COUNT,
            "fall": _COUNT,
            "deregister_after": {**_SECONDS, "minimum": 1,
                                 "description": "Deregister after this many seconds Unhealthy."},
            "path": {"type": "string", "pattern": "^/[!-~]*$", "maxLength": 1024, "description": "http only."},
            "scheme": {"type": "string", "enum": ["http", "https"], "description": "http only."},
            "tls_verify": {"type": "boolean", "description": "http only."},
            "expected_status": {"type": "integer", "minimum": 100, "maximum": 599, "description": "http only."},
        },
    },
    "Registration": {
        "type": "object",
        "required": ["address", "protocol"],
        "additionalProperties": False,
        "properties": {
            "address": {
                "type": "string",
                "description": "host:port with port 1-65535: an IPv4 address, [IPv6] in brackets, or a DNS "
                               "host name.",
                "examples": ["10.0.0.5:8080", "[2001:db8::1]:443", "api.example.internal:80"],
            },
            "protocol": {"type": "string", "enum": PROTOCOLS, "description": "Any letter case is accepted."},
            "tags": {"type": ["array", "null"], "maxItems": MAX_TAGS,
                     "items": {"type": "string", "minLength": 1, "maxLength": MAX_TAG_LENGTH}},
            "metadata": {
                "type": ["object", "null"], "maxProperties": MAX_METADATA_ENTRIES,
                "propertyNames": {"minLength": 1, "maxLength": MAX_METADATA_KEY_LENGTH},
                "additionalProperties": {"type": "string", "maxLength": MAX_METADATA_VALUE_LENGTH},
            },
            "weight": {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_WEIGHT, "default": 1,
                       "description": "The SRV weight."},
            "check": {"oneOf": [_ref("CheckSettings"), {"type": "null"}]},
        },
    },
    "Instance": {
        "type": "object",
        "required": [
            "id", "service", "service_name", "address", "host", "port", "protocol", "health", "output", "tags",
            "metadata", "weight", "check", "maintenance", "registered_at", "updated_at", "modify_index",
        ],
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "service": {"type": "string"},
            "service_name": {"type": "string"},
            "address": {"type": "string"},
            "host": {"type": "string"},
            "port": {"type": "integer", "minimum": 1, "maximum": 65535},
            "protocol": {"type": "string", "enum": PROTOCOLS},
            "health": {"type": "string", "enum": HEALTH_VALUES},
            "output": {"type": "string", "description": "The last check's output."},
            "tags": {"type": "array", "items": {"type": "string"}},
            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
            "weight": {"type": "integer", "minimum": 0, "maximum": MAX_WEIGHT},
            "check": {
                "type": "object", "required": ["type"],
                "properties": {"type": {"type": "string", "enum": CHECK_TYPES}},
                "description": "The check settings, with only the fields that apply.",
            },
            "maintenance": {
                "type": "object",
                "required": ["enabled", "reason", "since"],
                "properties": {
                    "enabled": {"type": "boolean"},
                    "reason": {"type": ["string", "null"]},
                    "since": _OPTIONAL_TIME,
                },
            },
            "registered_at": _TIME,
            "updated_at": _TIME,
            "modify_index": _INDEX,
            "check_status": {
                "type": "object",
                "description": "The check's counters and times; in single-instance answers and instance lists.",
                "properties": {
                    "last_checked_at": _OPTIONAL_TIME,
                    "last_success_at": _OPTIONAL_TIME,
                    "last_failure_at": _OPTIONAL_TIME,
                    "consecutive_successes": {"type": "integer", "minimum": 0},
                    "consecutive_failures": {"type": "integer", "minimum": 0},
                },
            },
        },
    },
    "HealthReport": {
        "type": "object",
        "required": ["status"],
        "additionalProperties": False,
        "properties": {
            "status": {"type": "string", "enum": REPORTED_HEALTH_VALUES, "description": "Any letter case is accepted."},
            "output": {"type": ["string", "null"], "description": "Kept as the check output, cut to 4096 characters."},
        },
    },
    "Maintenance": {
        "type": "object",
        "required": ["enabled"],
        "additionalProperties": False,
        "properties": {
            "enabled": {"type": "boolean"},
            "reason": {"type": ["string", "null"], "maxLength": MAX_REASON_LENGTH,
                       "description": "Only when enabling; defaults to 'maintenance'."},
        },
        "if": {"properties": {"enabled": {"const": False}}},
        "then": {"properties": {"reason": {"type": "null"}}},
    },
    "Transition": {
        "type": "object",
        "required": ["at", "from", "to", "output"],
        "properties": {
            "at": _TIME,
            "from": {"type": "string", "enum": HEALTH_VALUES},
            "to": {"type": "string", "enum": HEALTH_VALUES},
            "output": {"type": "string"},
        },
    },
    "Status": {
        "type": "object",
        "required": ["version", "index", "services", "instances", "node", "mass_failure_guard"],
        "properties": {
            "version": {"type": "string"},
            "index": _INDEX,
            "services": {"type": "integer", "minimum": 0},
            "instances": {
                "type": "object",
                "required": ["total", *HEALTH_VALUES, "maintenance"],
                "properties": {name: {"type": "integer", "minimum": 0}
                               for name in ("total", *HEALTH_VALUES, "maintenance")},
            },
            "node": {
                "type": "object",
                "required": ["id", "prober", "shared_database", "index", "database_index", "lag"],
                "properties": {
                    "id": {"type": "string"},
                    "prober": {"type": "boolean", "description": "Whether this node runs the probes."},
                    "shared_database": {"type": "boolean"},
                    "index": _INDEX,
                    "database_index": _INDEX,
                    "lag": {"type": "integer", "minimum": 0},
                },
            },
            "mass_failure_guard": {
                "type": "object",
                "required": ["enabled", "active", "active_since", "engagements", "share"],
                "properties": {
                    "enabled": {"type": "boolean"},
                    "active": {"type": "boolean"},
                    "active_since": _OPTIONAL_TIME,
                    "engagements": {"type": "integer", "minimum": 0},
                    "share": {"type": "number"},
                },
            },
        },
    },
    "ClientCreate": {
        "type": "object",
        "required": ["common_name", "role"],
        "additionalProperties": False,
        "properties": {
            "common_name": {"type": "string", "pattern": COMMON_NAME_PATTERN},
            "role": {"type": "string", "enum": ROLES},
            "services": {
                "type": ["array", "null"], "maxItems": MAX_CLIENT_SERVICES,
                "items": {"type": "string", "description": "A service code, or * for every service."},
                "description": "Required for a registrar; absent, empty or [\"*\"] for the other roles.",
            },
        },
    },
    "Client": {
        "type": "object",
        "required": ["common_name", "role", "services", "created_at"],
        "properties": {
            "common_name": {"type": "string"},
            "role": {"type": "string", "enum": ROLES},
            "services": {"type": "array", "items": {"type": "string"}},
            "created_at": _TIME,
            "secret": {"type": "string", "description": "Only in the answer that made it."},
        },
    },
}


def _problem_response(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": {PROBLEM_JSON: {"schema": _ref("Problem")}}}
    if headers:
        response["headers"] = headers
    return response


_RETRY_AFTER = {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait before retrying."}}

RESPONSES: dict[str, Any] = {
    "BadRequest": _problem_response("The body is not JSON."),
    "Unauthorized": _problem_response(
        "The token is missing, malformed, expired, forged or revoked, or the credentials are wrong.",
        {"WWW-Authenticate": {"schema": {"type": "string"}}},
    ),
    "Forbidden": _problem_response("The token's role or services do not allow this; permission names what is missing."),
    "NotFound": _problem_response("The service, instance or client does not exist."),
    "Conflict": _problem_response(
        "The service or client exists, the service still has instances, or the client is the last admin."
    ),
    "PayloadTooLarge": _problem_response("The body is larger than 1 MiB."),
    "ValidationFailed": _problem_response("A field or parameter breaks a rule; errors names it."),
    "TooManyRequests": _problem_response("Too many failed token requests for the name or from the address.",
                                         _RETRY_AFTER),
    "StoreUnavailable": _problem_response("The database is unavailable, so the write was not committed.",
                                          _RETRY_AFTER),
    "Problem": _problem_response("Any other error, as a problem detail."),
}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "LogPose HTTP API",
        "version": __version__,
        "description": "Service discovery: register instances, report health, discover healthy instances and "
                       "manage clients. Errors are RFC 9457 problem details.",
        "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
    },
    "tags": [{"name": name} for name in ("server", "auth", "services", "instances", "discovery", "clients")],
    "security": [{"bearerAuth": []}],
    "paths": PATHS,
    "components": {
        "securitySchemes": {
            "bearerAuth": {
                "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                "description": "A token from POST /api/auth/token, sent as 'Authorization: Bearer <token>'.",
            },
        },
        "headers": {
            "Index": {"schema": {"type": "integer", "minimum": 0},
                      "description": "The registry's change index when the answer was made."},
        },
        "schemas": SCHEMAS,
        "responses": RESPONSES,
    },
}

_DOCUMENT_BODY = json.dumps(DOCUMENT, indent=1).encode()


async def show_openapi(_request: web.Request) -> web.Response:
    return web.Response(body=_DOCUMENT_BODY, content_type=JSON)


def add_openapi_route(app: web.Application) -> None:
    app.router.add_get(OPENAPI_PATH, show_openapi)
