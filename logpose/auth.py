"""Clients, secrets and JWT bearer tokens.

Secrets are stored only as salted scrypt hashes. Tokens are HS256 JWTs signed
with a per-install random key (or a configured one); verification pins the
algorithm and requires every claim LogPose relies on.

The authenticator keeps every client in memory, so verifying a token costs one
HMAC and a dictionary look-up: no database query and no scrypt. Each token
carries a fingerprint of its client's stored secret hash (the ``secret_version``
claim). Rotating the secret changes the hash, and removing the client drops it
from the table, so either makes the client's earlier tokens fail at once.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import re
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol as TypingProtocol

import jwt

from logpose.errors import (
    AuthenticationError,
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
    TooManyRequestsError,
    ValidationError,
)
from logpose.log import auth_log
from logpose.model import ClientRecord, parse_service_code
from logpose.ratelimit import FailureLimiter

ALGORITHM = "HS256"
ISSUER = "logpose"
AUDIENCE = "logpose-api"
CLOCK_SKEW_LEEWAY = 30  # seconds accepted between nodes' clocks
KEY_FILE_NAME = "jwt.key"
ADMIN_SECRET_FILE_NAME = "admin.secret"
ADMIN_COMMON_NAME = "admin"
ROLES = ("reader", "registrar", "admin")
ALL_SERVICES = "*"
SECRET_VERSION_CLAIM = "secret_version"
REQUIRED_CLAIMS = ("sub", "role", "exp", "iat", "jti", "iss", "aud", SECRET_VERSION_CLAIM)

COMMON_NAME_PATTERN = re.compile(r"[A-Za-z0-9._@-]{1,128}")
MAX_CLIENT_SERVICES = 256

# Failed token requests allowed per common name and per source address in the window.
MAX_TOKEN_FAILURES = 10
TOKEN_FAILURE_WINDOW = 60.0  # seconds
VERIFIED_TOKEN_CACHE_SIZE = 10000  # tokens whose signature check is remembered

# scrypt cost: N=2^14, r=8, p=1 uses 16 MiB and about 50 ms per check on one core.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


class ClientDirectory(TypingProtocol):
    """The client records the authenticator needs; ``logpose.store.SqlStore`` provides them."""

    async def get_client(self, common_name: str) -> ClientRecord | None: ...

    async def list_clients(self) -> list[ClientRecord]: ...

    async def create_client(self, client: ClientRecord) -> None: ...

    async def update_client(self, client: ClientRecord) -> bool: ...

    async def delete_client(self, common_name: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class Principal:
    """The client behind a verified token, with its current role and services."""

    common_name: str
    role: str
    services: tuple[str, ...]
    token_id: str
    expires_at: int

    def require_admin(self, action: str) -> None:
        if self.role != "admin":
            raise PermissionDeniedError(f"{action} needs the admin role; client {self.common_name!r} is {self.role}", "admin")

    def require_service(self, action: str, service: str) -> None:
        """Allow admins, and registrars whose service list contains ``service`` or ``*``."""
        if self.role == "admin":
            return
        if self.role == "registrar" and (ALL_SERVICES in self.services or service in self.services):
            return
        raise PermissionDeniedError(
            f"{action} needs the registrar role for service {service!r}; "
            f"client {self.common_name!r} is {self.role} for {', '.join(self.services) or 'no services'}",
            f"register:{service}",
        )


# ----- input validation ---------------------------------------------------------

def parse_common_name(value: Any, field_name: str = "common_name") -> str:
    if not isinstance(value, str) or not COMMON_NAME_PATTERN.fullmatch(value):
        described = repr(value[:64]) if isinstance(value, str) else type(value).__name__
        raise ValidationError(
            field_name, f"{described} is not a client name: use 1 to 128 characters of A-Z, a-z, 0-9, '.', '_', '@' and '-'"
        )
    return value


def parse_role(value: Any, field_name: str = "role") -> str:
    if value not in ROLES:
        raise ValidationError(field_name, f"must be one of {', '.join(ROLES)}, got {value!r}")
    return value


def parse_client_services(value: Any, role: str, field_name: str = "services") -> tuple[str, ...]:
    """Validate the services a client may write to: codes or ``*``, required for a registrar.

    Readers and admins act on every service, so for them the list may only be
    absent, empty or ``["*"]``, and is stored as ``("*",)``.
    """
    if value is None:
        value = []
    if not isinstance(value, list):
        raise ValidationError(field_name, f"must be a list of service codes or '*', got {type(value).__name__}")
    if role != "registrar":
        if value not in ([], [ALL_SERVICES]):
            raise ValidationError(
                field_name, f"applies only to the registrar role; a {role} acts on every service, so omit it or send ['*']"
            )
        return (ALL_SERVICES,)
    if not value:
        raise ValidationError(field_name, "a registrar needs at least one service code, or '*' for every service")
    if len(value) > MAX_CLIENT_SERVICES:
        raise ValidationError(field_name, f"must have at most {MAX_CLIENT_SERVICES} entries, got {len(value)}")
    codes = [item if item == ALL_SERVICES else parse_service_code(item, f"{field_name}[{position}]")
             for position, item in enumerate(value)]
    if ALL_SERVICES in codes and len(set(codes)) > 1:
        raise ValidationError(field_name, "'*' already covers every service; send ['*'] alone or only service codes")
    return tuple(dict.fromkeys(codes))


# ----- secrets and keys ----------------------------------------------------------

def hash_secret(secret: str) -> str:
    """Return ``scrypt$N$r$p$salt$hash`` with a random 16-byte salt (base64 fields)."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32)
    return "$".join(["scrypt", str(_SCRYPT_N), str(_SCRYPT_R), str(_SCRYPT_P),
                     base64.b64encode(salt).decode(), base64.b64encode(digest).decode()])


def verify_secret(secret: str, encoded: str) -> bool:
    try:
        scheme, n, r, p, salt, expected = encoded.split("$")
        if scheme != "scrypt":
            return False
        digest = hashlib.scrypt(secret.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p), dklen=32)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(digest, base64.b64decode(expected))


def secret_version(secret_hash: str) -> str:
    """Return a short fingerprint of a stored secret hash, which changes with every new secret.

    The hash is salted, so a fingerprint reveals nothing about the secret and
    differs even between two clients that were given the same secret.
    """
    digest = hashlib.sha256(secret_hash.encode()).digest()[:16]
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _write_private_file(path: Path, content: str) -> None:
    """Create ``path`` with mode 0600 from the start, so the content is never readable by others."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(content)
        file.flush()
        os.fsync(file.fileno())


def load_signing_key(data_dir: Path, configured: str | None) -> bytes:
    """Return the configured JWT key, or the per-install key from ``data_dir``, made on first start."""
    if configured:
        return configured.encode()
    path = data_dir / KEY_FILE_NAME
    try:
        key = path.read_text().strip()
    except FileNotFoundError:
        key = secrets.token_hex(32)
        _write_private_file(path, key + "\n")
        auth_log.info("Created token signing key %s", path)
    if len(key) < 64:
        raise OSError(f"token signing key file {path} is shorter than 256 bits; delete it to make a new one")
    return key.encode()


# ----- the authenticator -----------------------------------------------------------

_MALFORMED_TOKEN = "invalid token: not a JWT of three base64url parts (header.payload.signature)"

@dataclass(slots=True)
class _VerifiedToken:
    subject: str
    secret_version: str
    token_id: str
    expires_at: int  # Unix time, seconds
    # The client entry that the secret version was last checked against, and the
    # principal built from it; both are replaced when the client's entry changes.
    client: _KnownClient | None = None
    principal: Principal | None = None


@dataclass(frozen=True, slots=True)
class _KnownClient:
    record: ClientRecord
    secret_version: str


class Authenticator:
    """Manage clients, and issue and verify their tokens.

    Call :meth:`load_clients` before anything else. Every client write goes to
    the ``ClientDirectory`` first and then to the in-memory table, so a write
    is durable when its coroutine returns and its effect on tokens is immediate
    on this node.
    """

    def __init__(self, directory: ClientDirectory, signing_key: bytes, token_lifetime: int) -> None:
        self._directory = directory
        self._key = signing_key
        self._lifetime = token_lifetime
        self._clients: dict[str, _KnownClient] = {}
        self._verified: dict[str, _VerifiedToken] = {}  # oldest first, so the first entry is evicted
        # Serialises client writes, so the last-admin check and the delete after it see the same table.
        self._write_lock = asyncio.Lock()
        self._failures_by_name = FailureLimiter(MAX_TOKEN_FAILURES, TOKEN_FAILURE_WINDOW)
        self._failures_by_address = FailureLimiter(MAX_TOKEN_FAILURES, TOKEN_FAILURE_WINDOW)

    @property
    def token_lifetime(self) -> int:
        return self._lifetime

    async def load_clients(self) -> None:
        """Replace the in-memory client table with the directory's clients.

        With several nodes on one database, the change feed calls this after
        another node changed a client, so its removal or rotation revokes the
        client's tokens here too.
        """
        records = await self._directory.list_clients()
        self._clients = {record.common_name: _known(record) for record in records}
        auth_log.info("Loaded %d client(s)", len(self._clients))

    async def ensure_admin(self, data_dir: Path) -> None:
        """Create the ``admin`` client on first start and hand its secret over in a 0600 file."""
        if any(known.record.role == "admin" for known in self._clients.values()):
            return
        secret = secrets.token_urlsafe(32)
        path = data_dir / ADMIN_SECRET_FILE_NAME
        path.unlink(missing_ok=True)
        _write_private_file(path, secret + "\n")
        secret_hash = await asyncio.to_thread(hash_secret, secret)
        record = ClientRecord(ADMIN_COMMON_NAME, "admin", (ALL_SERVICES,), secret_hash, time.time())
        await self._directory.create_client(record)
        self._clients[record.common_name] = _known(record)
        auth_log.warning("Created client 'admin'; its secret is in %s (readable by this user only)", path)

    # ----- client management -------------------------------------------------

    def clients(self) -> list[ClientRecord]:
        return [self._clients[name].record for name in sorted(self._clients)]

    def get_client(self, common_name: str) -> ClientRecord:
        known = self._clients.get(common_name)
        if known is None:
            raise NotFoundError(f"client {common_name!r} not found")
        return known.record

    async def create_client(self, common_name: str, role: str, services: tuple[str, ...]) -> tuple[ClientRecord, str]:
        """Create a client with a new random secret; return it and the secret, which is stored only hashed."""
        secret = secrets.token_urlsafe(32)
        secret_hash = await asyncio.to_thread(hash_secret, secret)
        async with self._write_lock:
            if common_name in self._clients:
                raise ConflictError(
                    f"client {common_name!r} already exists; rotate its secret with "
                    f"POST /api/clients/{common_name}/rotate, or remove it first"
                )
            record = ClientRecord(common_name, role, services, secret_hash, time.time())
            await self._directory.create_client(record)
            self._clients[common_name] = _known(record)
        auth_log.info("Created client %r (%s for %s)", common_name, role, ", ".join(services))
        return record, secret

    async def rotate_secret(self, common_name: str) -> tuple[ClientRecord, str]:
        """Give a client a new random secret; its earlier tokens fail from now on."""
        secret = secrets.token_urlsafe(32)
        secret_hash = await asyncio.to_thread(hash_secret, secret)
        async with self._write_lock:
            old = self.get_client(common_name)
            record = ClientRecord(old.common_name, old.role, old.services, secret_hash, old.created_at)
            if not await self._directory.update_client(record):
                raise NotFoundError(f"client {common_name!r} not found")
            self._clients[common_name] = _known(record)
        auth_log.info("Rotated the secret of client %r; its earlier tokens are revoked", common_name)
        return record, secret

    async def delete_client(self, common_name: str) -> None:
        """Remove a client and revoke its tokens; the last admin cannot be removed."""
        async with self._write_lock:
            record = self.get_client(common_name)
            admins = [known for known in self._clients.values() if known.record.role == "admin"]
            if record.role == "admin" and len(admins) == 1:
                raise ConflictError(
                    f"client {common_name!r} is the last admin; create another admin client before removing it"
                )
            await self._directory.delete_client(common_name)
            del self._clients[common_name]
        auth_log.info("Removed client %r; its tokens are revoked", common_name)

    # ----- tokens -----------------------------------------------------------

    async def issue_token(
        self,
        common_name: str,
        secret: str | None,
        peer: str | None,
        certificate_name: str | None = None,
    ) -> str:
        """Check the client's credentials and return a signed token.

        The credential is ``secret`` when one is given, otherwise
        ``certificate_name``: the CN of a client certificate that the TLS layer
        has already verified against the configured client CA. Raise
        TooManyRequestsError while the name or the peer has failed too often,
        ValidationError when neither credential is given, and
        AuthenticationError when the credential does not match.
        """
        address = peer or "unknown"
        self._check_failure_rate(common_name, address)
        known = self._clients.get(common_name)
        if secret is not None:
            # An unknown name still pays for a hash, so timing does not reveal which names exist.
            encoded = known.record.secret_hash if known else _DUMMY_HASH
            valid = await asyncio.to_thread(verify_secret, secret, encoded)
            method = "secret"
        elif certificate_name is not None:
            valid = certificate_name == common_name
            method = f"client certificate (CN {certificate_name!r})"
        else:
            raise ValidationError(
                "secret", "is required unless the connection presents a client certificate (mutual TLS)"
            )
        if known is None or not valid:
            self._record_failure(common_name, address, method)
            if secret is not None:
                raise AuthenticationError("invalid common_name or secret")
            raise AuthenticationError("the client certificate's CN is not common_name, or no such client exists")

        self._failures_by_name.reset(common_name)
        record = known.record
        now = int(time.time())
        claims = {
            "sub": record.common_name,
            "role": record.role,
            "services": list(record.services),
            "iat": now,
            "nbf": now,
            "exp": now + self._lifetime,
            "jti": str(uuid.uuid4()),
            "iss": ISSUER,
            "aud": AUDIENCE,
            SECRET_VERSION_CLAIM: known.secret_version,
        }
        auth_log.info("Issued token %s to %r (%s) from %s by %s", claims["jti"], common_name, record.role, address, method)
        return jwt.encode(claims, self._key, algorithm=ALGORITHM)

    def verify_token(self, token: str) -> Principal:
        """Return the token's principal; raise AuthenticationError for any invalid or revoked token.

        The role and services come from the client table, not from the token,
        so they are always the client's current ones.
        """
        verified = self._verified.get(token)
        if verified is None or time.time() > verified.expires_at + CLOCK_SKEW_LEEWAY:
            verified = self._decode(token)
        # Revocation is checked on every request, cached signature or not. Every
        # client write and reload puts a new entry in the table, so while the
        # entry is the one checked before, neither the client nor its secret changed.
        known = self._clients.get(verified.subject)
        if known is not None and known is verified.client:
            return verified.principal
        subject, version = verified.subject, verified.secret_version
        if known is None or not hmac.compare_digest(known.secret_version.encode(), version.encode()):
            raise AuthenticationError(
                f"the token was revoked: client {subject!r} was removed or its secret rotated; request a new token"
            )
        record = known.record
        verified.principal = Principal(
            record.common_name, record.role, record.services, verified.token_id, verified.expires_at
        )
        verified.client = known
        return verified.principal

    def _decode(self, token: str) -> _VerifiedToken:
        """Check the token's signature and claims, and remember the result for later requests."""
        if not token.isascii():
            # Bytes outside ASCII reach here as surrogates, which PyJWT cannot encode.
            raise AuthenticationError(_MALFORMED_TOKEN)
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[ALGORITHM],
                audience=AUDIENCE,
                issuer=ISSUER,
                leeway=CLOCK_SKEW_LEEWAY,
                options={"require": list(REQUIRED_CLAIMS)},
            )
        except jwt.ExpiredSignatureError as exc:
            self._verified.pop(token, None)
            raise AuthenticationError("the token has expired; request a new one at /api/auth/token") from exc
        except jwt.InvalidSignatureError as exc:
            raise AuthenticationError("invalid token: its signature does not match this server's key") from exc
        except jwt.DecodeError as exc:
            # PyJWT's text here names decoder internals (base64, UTF-8, JSON).
            raise AuthenticationError(_MALFORMED_TOKEN) from exc
        except jwt.PyJWTError as exc:
            raise AuthenticationError(f"invalid token: {exc}") from exc
        subject = claims["sub"]
        version = claims[SECRET_VERSION_CLAIM]
        if not isinstance(subject, str) or not isinstance(version, str):
            raise AuthenticationError("invalid token: the sub and secret_version claims must be strings")
        verified = _VerifiedToken(subject, version, str(claims["jti"]), int(claims["exp"]))
        # Checking a JWT costs more than the rest of a discovery request, so
        # verified tokens are kept, a bounded number, until they expire.
        if len(self._verified) >= VERIFIED_TOKEN_CACHE_SIZE:
            self._verified.pop(next(iter(self._verified)))
        self._verified[token] = verified
        return verified

    # ----- failed attempts ---------------------------------------------------

    def _check_failure_rate(self, common_name: str, address: str) -> None:
        wait = max(self._failures_by_name.retry_after(common_name), self._failures_by_address.retry_after(address))
        if wait > 0:
            auth_log.debug("Rejected token request for common name %r from %s: too many failures", common_name, address)
            raise TooManyRequestsError(
                f"too many failed token requests for this common name or from this address; retry in {wait} s",
                wait,
            )

    def _record_failure(self, common_name: str, address: str, method: str) -> None:
        auth_log.warning("Rejected token request for common name %r from %s: invalid %s", common_name, address, method)
        for limiter, key, kind in ((self._failures_by_name, common_name, "common name"),
                                   (self._failures_by_address, address, "address")):
            if limiter.record_failure(key):
                auth_log.warning(
                    "Blocking token requests for %s %r for up to %g s after %d failures",
                    kind, key, TOKEN_FAILURE_WINDOW, MAX_TOKEN_FAILURES,
                )


def _known(record: ClientRecord) -> _KnownClient:
    return _KnownClient(record, secret_version(record.secret_hash))


_DUMMY_HASH = hash_secret(secrets.token_hex(16))
