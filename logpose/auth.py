"""Clients, secrets and JWT bearer tokens.

Secrets are stored only as salted scrypt hashes. Tokens are HS256 JWTs signed
with a per-install random key (or a configured one); verification pins the
algorithm and requires every claim LogPose relies on.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol as TypingProtocol

import jwt

from logpose.errors import AuthenticationError, PermissionDeniedError
from logpose.log import auth_log
from logpose.model import ClientRecord

ALGORITHM = "HS256"
ISSUER = "logpose"
AUDIENCE = "logpose-api"
CLOCK_SKEW_LEEWAY = 30  # seconds accepted between nodes' clocks
KEY_FILE_NAME = "jwt.key"
ADMIN_SECRET_FILE_NAME = "admin.secret"
ADMIN_COMMON_NAME = "admin"
ROLES = ("reader", "registrar", "admin")

# scrypt cost: N=2^14, r=8, p=1 uses 16 MiB and about 50 ms per check on one core.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


class ClientDirectory(TypingProtocol):
    """The client records the authenticator needs; ``logpose.store.SqlStore`` provides them."""

    async def get_client(self, common_name: str) -> ClientRecord | None: ...

    async def list_clients(self) -> list[ClientRecord]: ...

    async def create_client(self, client: ClientRecord) -> None: ...


@dataclass(frozen=True, slots=True)
class Principal:
    """Who made a request, from a verified token."""

    common_name: str
    role: str
    services: tuple[str, ...]
    token_id: str
    expires_at: int

    def require_reader(self) -> None:
        """Every role may read."""

    def require_admin(self, action: str) -> None:
        if self.role != "admin":
            raise PermissionDeniedError(f"{action} needs the admin role; client {self.common_name!r} is {self.role}", "admin")

    def require_service(self, action: str, service: str) -> None:
        """Allow admins, and registrars whose service list holds ``service`` or ``*``."""
        if self.role == "admin":
            return
        if self.role == "registrar" and ("*" in self.services or service in self.services):
            return
        raise PermissionDeniedError(
            f"{action} needs the registrar role for service {service!r}; "
            f"client {self.common_name!r} is {self.role} for {', '.join(self.services) or 'no services'}",
            f"register:{service}",
        )


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


class Authenticator:
    """Issue and verify tokens for the clients of a ``ClientDirectory``."""

    def __init__(self, directory: ClientDirectory, signing_key: bytes, token_lifetime: int) -> None:
        self._directory = directory
        self._key = signing_key
        self._lifetime = token_lifetime

    @property
    def token_lifetime(self) -> int:
        return self._lifetime

    async def ensure_admin(self, data_dir: Path) -> None:
        """Create the ``admin`` client on first start and hand its secret over in a 0600 file."""
        if any(client.role == "admin" for client in await self._directory.list_clients()):
            return
        secret = secrets.token_urlsafe(32)
        path = data_dir / ADMIN_SECRET_FILE_NAME
        path.unlink(missing_ok=True)
        _write_private_file(path, secret + "\n")
        secret_hash = await asyncio.to_thread(hash_secret, secret)
        await self._directory.create_client(ClientRecord(ADMIN_COMMON_NAME, "admin", ("*",), secret_hash, time.time()))
        auth_log.warning("Created client 'admin'; its secret is in %s (readable by this user only)", path)

    async def issue_token(self, common_name: str, secret: str, peer: str | None) -> str:
        """Check the client's secret and return a signed token; raise AuthenticationError otherwise."""
        client = await self._directory.get_client(common_name)
        # An unknown name still pays for a hash, so timing does not reveal which names exist.
        encoded = client.secret_hash if client else _DUMMY_HASH
        valid = await asyncio.to_thread(verify_secret, secret, encoded)
        if client is None or not valid:
            auth_log.warning("Rejected token request for common name %r from %s: invalid credentials", common_name, peer)
            raise AuthenticationError("invalid common_name or secret")
        now = int(time.time())
        claims = {
            "sub": client.common_name,
            "role": client.role,
            "services": list(client.services),
            "iat": now,
            "nbf": now,
            "exp": now + self._lifetime,
            "jti": str(uuid.uuid4()),
            "iss": ISSUER,
            "aud": AUDIENCE,
        }
        auth_log.info("Issued token %s to %r (%s) from %s", claims["jti"], common_name, client.role, peer)
        return jwt.encode(claims, self._key, algorithm=ALGORITHM)

    def verify_token(self, token: str) -> Principal:
        """Return the token's principal; raise AuthenticationError for any invalid token."""
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[ALGORITHM],
                audience=AUDIENCE,
                issuer=ISSUER,
                leeway=CLOCK_SKEW_LEEWAY,
                options={"require": ["sub", "role", "exp", "iat", "jti", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthenticationError("the token has expired; request a new one at /api/auth/token") from exc
        except jwt.PyJWTError as exc:
            raise AuthenticationError(f"invalid token: {exc}") from exc
        role = claims["role"]
        services = claims.get("services", [])
        if role not in ROLES or not isinstance(services, list) or not isinstance(claims["sub"], str):
            raise AuthenticationError("invalid token: unexpected role or services claim")
        return Principal(claims["sub"], role, tuple(str(s) for s in services), str(claims["jti"]), int(claims["exp"]))


_DUMMY_HASH = hash_secret(secrets.token_hex(16))
