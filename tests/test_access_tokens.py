"""Token verification against a real server: forged tokens, revocation by removal and rotation."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import time
from typing import Iterator

import httpx
import jwt
import pytest

from conftest import ServerProcess
from logpose.auth import Authenticator
from logpose.errors import AuthenticationError
from logpose.model import ClientRecord


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    process = ServerProcess(tmp_path_factory.mktemp("tokens") / "data").start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def admin(server) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


def request_token(server: ServerProcess, common_name: str, secret: str) -> httpx.Response:
    return httpx.post(server.url + "/api/auth/token", json={"common_name": common_name, "secret": secret})


def call_with(server: ServerProcess, token: str) -> httpx.Response:
    return httpx.get(server.url + "/api/services", headers={"Authorization": f"Bearer {token}"})


def signing_key(server: ServerProcess) -> str:
    return (server.data_dir / "jwt.key").read_text().strip()


def replace_claims(token: str, **changes) -> str:
    """Return ``token`` with changed claims and its original signature."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims.update(changes)
    encoded = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{encoded}.{signature}"


def create_client(admin: httpx.Client, common_name: str, role: str = "reader") -> str:
    answer = admin.post("/api/clients", json={"common_name": common_name, "role": role})
    assert answer.status_code == 201, answer.text
    return answer.json()["secret"]


# ----- forged tokens ----------------------------------------------------------------

FORGERIES = {
    "alg none": lambda claims, key, token: jwt.encode(claims, None, algorithm="none"),
    "changed claims": lambda claims, key, token: replace_claims(token, role="admin", sub="admin"),
    "wrong key": lambda claims, key, token: jwt.encode(claims, "w" * 64, algorithm="HS256"),
    "HS512 with real key": lambda claims, key, token: jwt.encode(claims, key, algorithm="HS512"),
    "expired": lambda claims, key, token: jwt.encode({**claims, "exp": int(time.time()) - 120}, key, algorithm="HS256"),
    "wrong aud": lambda claims, key, token: jwt.encode({**claims, "aud": "another-api"}, key, algorithm="HS256"),
    "wrong iss": lambda claims, key, token: jwt.encode({**claims, "iss": "another-issuer"}, key, algorithm="HS256"),
    "not yet valid": lambda claims, key, token: jwt.encode({**claims, "nbf": int(time.time()) + 3600}, key,
                                                           algorithm="HS256"),
    "no secret_version": lambda claims, key, token: jwt.encode(
        {name: value for name, value in claims.items() if name != "secret_version"}, key, algorithm="HS256"),
    "wrong secret_version": lambda claims, key, token: jwt.encode({**claims, "secret_version": "AAAA"}, key,
                                                                  algorithm="HS256"),
    "unknown subject": lambda claims, key, token: jwt.encode({**claims, "sub": "nobody"}, key, algorithm="HS256"),
    "garbage": lambda claims, key, token: "not.a.token",
}


@pytest.mark.parametrize("forgery", FORGERIES)
def test_forged_token_rejected(server, admin, forgery):
    common_name = "forge-" + "-".join(forgery.split())
    secret = create_client(admin, common_name)
    token = request_token(server, common_name, secret).json()["access_token"]
    assert call_with(server, token).status_code == 200
    claims = jwt.decode(token, options={"verify_signature": False})

    forged = FORGERIES[forgery](claims, signing_key(server), token)

    answer = call_with(server, forged)
    assert answer.status_code == 401, answer.text
    assert answer.json()["type"] == "urn:logpose:problem:unauthorized"


@pytest.mark.parametrize(("forged", "expected"), [
    ("not.a.token", "not a JWT of three base64url parts"),
    ("\u00b7\u00b7\u00b7", "not a JWT of three base64url parts"),
    ("onlyone", "not a JWT of three base64url parts"),
    (jwt.encode({"sub": "admin"}, "w" * 64, algorithm="HS256"), "signature does not match"),
])
def test_bad_token_detail_names_the_problem(server, forged, expected):
    # As raw bytes, so a token outside ASCII reaches the server as sent.
    header = f"Bearer {forged}".encode("latin-1")
    answer = httpx.get(server.url + "/api/services", headers={"Authorization": header}, timeout=10)
    assert answer.status_code == 401, answer.text
    assert expected in answer.json()["detail"]


def test_token_claims(server, admin):
    secret = create_client(admin, "claims-reader")
    answer = request_token(server, "claims-reader", secret)
    claims = jwt.decode(answer.json()["access_token"], signing_key(server), algorithms=["HS256"],
                        audience="logpose-api", issuer="logpose")
    assert claims["sub"] == "claims-reader"
    assert claims["role"] == "reader"
    assert claims["exp"] - claims["iat"] == answer.json()["expires_in"] == 3600
    assert claims["jti"] and claims["secret_version"]


# ----- revocation -----------------------------------------------------------------

def test_rotation_revokes_old_tokens(server, admin):
    old_secret = create_client(admin, "rotated")
    old_token = request_token(server, "rotated", old_secret).json()["access_token"]
    assert call_with(server, old_token).status_code == 200

    rotated = admin.post("/api/clients/rotated/rotate")
    assert rotated.status_code == 200, rotated.text
    new_secret = rotated.json()["secret"]

    refused = call_with(server, old_token)
    assert refused.status_code == 401
    assert "revoked" in refused.json()["detail"]
    assert request_token(server, "rotated", old_secret).status_code == 401
    new_token = request_token(server, "rotated", new_secret).json()["access_token"]
    assert call_with(server, new_token).status_code == 200


def test_removal_revokes_tokens(server, admin):
    secret = create_client(admin, "removed")
    token = request_token(server, "removed", secret).json()["access_token"]
    assert call_with(server, token).status_code == 200

    assert admin.delete("/api/clients/removed").status_code == 204

    assert call_with(server, token).status_code == 401
    assert request_token(server, "removed", secret).status_code == 401


def test_recreated_client_does_not_revive_tokens(server, admin):
    first_secret = create_client(admin, "reborn")
    old_token = request_token(server, "reborn", first_secret).json()["access_token"]
    assert admin.delete("/api/clients/reborn").status_code == 204

    second_secret = create_client(admin, "reborn")

    assert call_with(server, old_token).status_code == 401
    assert call_with(server, request_token(server, "reborn", second_secret).json()["access_token"]).status_code == 200


def test_removed_admin_loses_admin_rights(server, admin):
    secret = create_client(admin, "second-admin", role="admin")
    token = request_token(server, "second-admin", secret).json()["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    assert httpx.get(server.url + "/api/clients", headers=headers).status_code == 200

    assert admin.delete("/api/clients/second-admin").status_code == 204

    assert httpx.get(server.url + "/api/clients", headers=headers).status_code == 401


def test_revocation_survives_restart(server_factory):
    server = server_factory()
    with server.client() as admin:
        kept_secret = create_client(admin, "kept")
        kept_token = request_token(server, "kept", kept_secret).json()["access_token"]
        rotated_secret = create_client(admin, "rotated-before-restart")
        stale_token = request_token(server, "rotated-before-restart", rotated_secret).json()["access_token"]
        assert admin.post("/api/clients/rotated-before-restart/rotate").status_code == 200

    server.stop()
    server.start()

    assert call_with(server, kept_token).status_code == 200
    assert call_with(server, stale_token).status_code == 401


# ----- the verified-token cache -----------------------------------------------------

class MemoryDirectory:
    """Client records in a dictionary, in place of the store."""

    def __init__(self) -> None:
        self.records: dict[str, ClientRecord] = {}

    async def get_client(self, common_name: str) -> ClientRecord | None:
        return self.records.get(common_name)

    async def list_clients(self) -> list[ClientRecord]:
        return list(self.records.values())

    async def create_client(self, client: ClientRecord) -> None:
        self.records[client.common_name] = client

    async def update_client(self, client: ClientRecord) -> bool:
        if client.common_name not in self.records:
            return False
        self.records[client.common_name] = client
        return True

    async def delete_client(self, common_name: str) -> bool:
        return self.records.pop(common_name, None) is not None


def test_cached_token_follows_client_table():
    """A token verified before takes the client's current role, and fails once its secret is rotated."""
    directory = MemoryDirectory()
    authenticator = Authenticator(directory, b"k" * 64, 3600)

    async def scenario():
        _client, secret = await authenticator.create_client("cached", "registrar", ("web",))
        token = await authenticator.issue_token("cached", secret, "127.0.0.1")
        first = authenticator.verify_token(token)
        again = authenticator.verify_token(token)
        # Another node made the client a reader, with the same secret.
        record = directory.records["cached"]
        directory.records["cached"] = dataclasses.replace(record, role="reader", services=("*",))
        await authenticator.load_clients()
        reloaded = authenticator.verify_token(token)
        await authenticator.rotate_secret("cached")
        return token, first, again, reloaded

    token, first, again, reloaded = asyncio.run(scenario())

    assert again is first
    assert (first.role, first.services) == ("registrar", ("web",))
    assert (reloaded.role, reloaded.services) == ("reader", ("*",))
    with pytest.raises(AuthenticationError, match="revoked"):
        authenticator.verify_token(token)
