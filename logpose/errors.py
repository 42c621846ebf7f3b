"""Error families of the registry core.

Front ends map these to protocol answers in exactly one place each: the HTTP API
turns them into problem details, the DNS front end into response codes. Foreign
exceptions (SQLAlchemy, OSError, pyjwt) are converted at the module boundary
where they are caught, chained with ``from exc``.
"""

from __future__ import annotations


def shown(value: object) -> str:
    """Spell a rejected value for an error message as JSON and TOML write it: true, false, null, else repr()."""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    return repr(value)


class LogPoseError(Exception):
    """Base class of every error LogPose raises on purpose."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class ValidationError(LogPoseError):
    """Input that breaks a domain rule; ``field`` names the offending field."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.reason = detail


class MalformedRequestError(ValidationError):
    """Input that cannot even be parsed (a body that is not JSON)."""


class NotFoundError(LogPoseError):
    """The named service, instance or client does not exist."""


class InstanceNotRegisteredError(NotFoundError):
    """A health report for an instance id the registry does not hold: the client must register again."""


class ConflictError(LogPoseError):
    """The write contradicts the current catalog (duplicate code, service in use)."""


class AuthenticationError(LogPoseError):
    """Missing, malformed, expired or forged credentials."""


class PermissionDeniedError(LogPoseError):
    """Valid credentials that lack the permission the action needs."""

    def __init__(self, detail: str, permission: str) -> None:
        super().__init__(detail)
        self.permission = permission


class TooManyRequestsError(LogPoseError):
    """Too many failed attempts; ``retry_after`` is the whole seconds to wait before the next one."""

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class StoreUnavailableError(LogPoseError):
    """The database cannot be reached, so the write was not committed."""


class ConfigError(LogPoseError):
    """An invalid setting in flags, environment or the TOML file."""
