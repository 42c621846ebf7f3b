"""HTTP client of the LogPose API, as used by ``logpose-command``.

Every failure, whether a transport error or a problem details response
(RFC 9457), is converted here into :class:`ApiError`, whose message is one line
fit for a terminal. Callers pass values that are already validated, so this module does
no domain validation of its own.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx

from logpose import __version__
from logpose.errors import LogPoseError

# Messages longer than this are cut, so that one odd response cannot flood the terminal.
MAX_MESSAGE_LENGTH = 1000


class ApiError(LogPoseError):
    """A request that failed; ``status`` is the HTTP status, or None when no response arrived."""

    def __init__(self, detail: str, status: int | None = None) -> None:
        super().__init__(_one_line(detail))
        self.status = status


class LogPoseClient:
    """Synchronous client of one LogPose server.

    ``base_url`` is the server's root, like ``http://127.0.0.1:8470``. When
    ``token`` is given, it is sent as a bearer token. ``timeout`` is in seconds
    and applies to connecting and to each read. Use the client as a context
    manager, or call :meth:`close`, to release the connection pool.
    """

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        headers = {"Accept": "application/json", "User-Agent": f"logpose-command/{__version__}"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def __enter__(self) -> LogPoseClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # Authentication

    def issue_token(self, common_name: str, secret: str) -> dict[str, Any]:
        """Exchange a client's secret for ``{"access_token", "token_type", "expires_in"}``."""
        body = {"common_name": common_name, "secret": secret}
        return self._json(self._request("POST", "/api/auth/token", json=body))

    # Services

    def list_services(self) -> list[dict[str, Any]]:
        return self._json(self._request("GET", "/api/services"))

    def create_service(self, code: str, name: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"code": code}
        if name is not None:
            body["name"] = name
        return self._json(self._request("POST", "/api/services", json=body))

    def get_service(self, code: str) -> dict[str, Any]:
        return self._json(self._request("GET", f"/api/services/{_segment(code)}"))

    def delete_service(self, code: str, force: bool = False) -> None:
        params = {"force": "true"} if force else None
        self._request("DELETE", f"/api/services/{_segment(code)}", params=params)

    # Instances

    def register_instance(self, service: str, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Register an instance; return it and True if it was created, False if it was updated."""
        response = self._request("POST", f"/api/services/{_segment(service)}/instances", json=body)
        return self._json(response), response.status_code == httpx.codes.CREATED

    def list_instances(self, service: str | None = None, health: str | None = None) -> list[dict[str, Any]]:
        params = {key: value for key, value in (("service", service), ("health", health)) if value is not None}
        return self._json(self._request("GET", "/api/instances", params=params))

    def get_instance(self, instance_id: str) -> dict[str, Any]:
        return self._json(self._request("GET", f"/api/instances/{_segment(instance_id)}"))

    def delete_instance(self, instance_id: str) -> None:
        self._request("DELETE", f"/api/instances/{_segment(instance_id)}")

    def report_health(self, instance_id: str, status: str, output: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"status": status}
        if output is not None:
            body["output"] = output
        return self._json(self._request("POST", f"/api/instances/{_segment(instance_id)}/health", json=body))

    def set_maintenance(self, instance_id: str, enabled: bool, reason: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"enabled": enabled}
        if reason is not None:
            body["reason"] = reason
        return self._json(self._request("POST", f"/api/instances/{_segment(instance_id)}/maintenance", json=body))

    def instance_history(self, instance_id: str) -> list[dict[str, Any]]:
        return self._json(self._request("GET", f"/api/instances/{_segment(instance_id)}/history"))

    # Discovery

    def discover(self, service: str) -> list[dict[str, Any]]:
        """Return the healthy instances of a service, as the server orders them."""
        return self._json(self._request("GET", f"/api/discover/{_segment(service)}"))

    # Clients

    def create_client(self, common_name: str, role: str, services: list[str]) -> dict[str, Any]:
        """Create a client; the response contains its ``secret``, which the server never shows again."""
        body = {"common_name": common_name, "role": role, "services": services}
        return self._json(self._request("POST", "/api/clients", json=body))

    def list_clients(self) -> list[dict[str, Any]]:
        return self._json(self._request("GET", "/api/clients"))

    def get_client(self, common_name: str) -> dict[str, Any]:
        return self._json(self._request("GET", f"/api/clients/{_segment(common_name)}"))

    def delete_client(self, common_name: str) -> None:
        self._request("DELETE", f"/api/clients/{_segment(common_name)}")

    def rotate_client_secret(self, common_name: str) -> dict[str, Any]:
        """Give a client a new secret, returned in ``secret``; its earlier tokens stop working."""
        return self._json(self._request("POST", f"/api/clients/{_segment(common_name)}/rotate"))

    # Transport

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send one request and return a 2xx response; raise ApiError for anything else."""
        url = f"{self.base_url}{path}"
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise ApiError(
                f"timed out after {self.timeout:g} s waiting for {method} {url}; "
                "raise --timeout if the server is slow"
            ) from exc
        except httpx.ConnectError as exc:
            raise ApiError(
                f"cannot connect to {self.base_url}: {_os_reason(exc)}; "
                "is logpose-server running? set --server or LOGPOSE_URL"
            ) from exc
        except httpx.TransportError as exc:
            raise ApiError(f"{method} {url} failed: {_os_reason(exc)}") from exc

        if response.is_success:
            return response
        raise ApiError(_problem_message(response, method, url), status=response.status_code)

    def _json(self, response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError as exc:
            raise ApiError(
                f"invalid JSON in the response to {response.request.method} {response.request.url} "
                f"(HTTP {response.status_code}); is {self.base_url} a LogPose server?",
                status=response.status_code,
            ) from exc


def _segment(value: str) -> str:
    """Quote a value for use as one URL path segment."""
    return quote(value, safe="")


def _problem_message(response: httpx.Response, method: str, url: str) -> str:
    """Build one line from a problem+json body, or from the status when there is none.

    Validation problems list each field in ``errors``; entries that ``detail``
    does not already contain are appended to it.
    """
    try:
        body = response.json()
    except ValueError:
        body = None
    status = f"HTTP {response.status_code}"

    if not isinstance(body, dict) or not isinstance(body.get("detail") or body.get("title"), str):
        reason = f"{status} {response.reason_phrase}".rstrip()
        return f"{reason} from {method} {url}; is that a LogPose server?"

    message = body.get("detail") or body.get("title")
    errors = body.get("errors")
    if isinstance(errors, list):
        extra = []
        for error in errors:
            if not isinstance(error, dict):
                continue
            text = f"{error.get('field', '?')}: {error.get('message', '')}".rstrip(": ")
            if text not in message:
                extra.append(text)
        if extra:
            message = f"{message} ({'; '.join(extra)})"
    return f"{message} ({status})"


def _os_reason(exc: BaseException) -> str:
    """Return the operating system's reason behind a transport error, like 'connection refused'."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror[0].lower() + cause.strerror[1:]
        cause = cause.__cause__ or cause.__context__
    return str(exc) or type(exc).__name__


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    if len(line) > MAX_MESSAGE_LENGTH:
        line = line[: MAX_MESSAGE_LENGTH - 3] + "..."
    return line
