"""HTTPS and mutual TLS on a real server, with a CA and certificates made by the test."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from conftest import ServerProcess, free_port
from logpose.config import load_settings


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


class CertificateAuthority:
    """A throw-away CA that writes PEM files into ``directory``."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.certificate = (
            self._builder(subject, self.key.public_key(), subject)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.path = directory / f"{name}.crt"
        self.path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))

    def _builder(self, subject: x509.Name, public_key, issuer: x509.Name) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.timezone.utc)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    def issue(self, common_name: str, *, server: bool = False) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            self._builder(subject, key.public_key(), self.certificate.subject)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
            )
        certificate = builder.sign(self.key, hashes.SHA256())
        paths = Issued(self.directory / f"{common_name}.crt", self.directory / f"{common_name}.key")
        paths.cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        paths.key.write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
        )
        paths.key.chmod(0o600)
        return paths


@dataclass(frozen=True)
class Pki:
    ca: CertificateAuthority
    server: Issued
    billing: Issued  # a client certificate for the client "billing"
    stranger: Issued  # a client certificate for a name that is no client
    rogue: Issued  # a client certificate for "billing" from a CA the server does not trust


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(directory, "test-ca")
    rogue_directory = directory / "rogue"
    rogue_directory.mkdir()
    rogue_ca = CertificateAuthority(rogue_directory, "rogue-ca")
    return Pki(ca, ca.issue("server", server=True), ca.issue("billing"), ca.issue("stranger"),
               rogue_ca.issue("billing"))


def tls_args(pki: Pki, client_ca: bool = True) -> list[str]:
    arguments = ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key)]
    if client_ca:
        arguments += ["--tls-client-ca", str(pki.ca.path)]
    return arguments


@pytest.fixture(scope="module")
def server(pki, tmp_path_factory) -> Iterator[ServerProcess]:
    process = ServerProcess(tmp_path_factory.mktemp("tls") / "data", tls_args(pki), ca_file=pki.ca.path).start()
    with process.client() as admin:
        created = admin.post("/api/clients", json={"common_name": "billing", "role": "registrar",
                                                   "services": ["billing"]})
        assert created.status_code == 201, created.text
    yield process
    process.stop()


def https_client(server: ServerProcess, pki: Pki, certificate: Issued | None = None) -> httpx.Client:
    context = ssl.create_default_context(cafile=pki.ca.path)
    if certificate is not None:
        context.load_cert_chain(certificate.cert, certificate.key)
    return httpx.Client(base_url=server.url, verify=context, timeout=10)


# ----- HTTPS ---------------------------------------------------------------------------

def test_api_serves_https(server, pki):
    with https_client(server, pki) as client:
        assert client.get("/healthz").status_code == 200
    assert "HTTP API listening on https://" in server.log()


def test_plain_http_is_not_served(server):
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{server.http_port}/healthz", timeout=5)


# ----- token by client certificate ---------------------------------------------------------

def test_certificate_gets_token_without_secret(server, pki):
    with https_client(server, pki, pki.billing) as client:
        answer = client.post("/api/auth/token", json={"common_name": "billing"})
        assert answer.status_code == 200, answer.text
        token = answer.json()["access_token"]
        registered = client.post(
            "/api/services/billing/instances",
            json={"address": "127.0.0.1:9", "protocol": "Tcp", "check": {"type": "none"}},
            headers={"Authorization": f"Bearer {token}"},
        )
    assert registered.status_code == 201, registered.text
    assert "'billing' (registrar) from 127.0.0.1 by client certificate" in server.log()


def test_certificate_for_another_name_rejected(server, pki):
    with https_client(server, pki, pki.billing) as client:
        answer = client.post("/api/auth/token", json={"common_name": "admin"})
    assert answer.status_code == 401
    assert answer.json()["type"] == "urn:logpose:problem:unauthorized"


def test_certificate_without_client_rejected(server, pki):
    with https_client(server, pki, pki.stranger) as client:
        answer = client.post("/api/auth/token", json={"common_name": "stranger"})
    assert answer.status_code == 401


def test_untrusted_certificate_fails_handshake(server, pki):
    with https_client(server, pki, pki.rogue) as client, pytest.raises(httpx.HTTPError):
        client.post("/api/auth/token", json={"common_name": "billing"})


def test_no_certificate_needs_secret(server, pki):
    with https_client(server, pki) as client:
        answer = client.post("/api/auth/token", json={"common_name": "billing"})
        assert answer.status_code == 422
        assert answer.json()["errors"][0]["field"] == "secret"
        with_secret = client.post("/api/auth/token", json={"common_name": "admin", "secret": server.admin_secret()})
    assert with_secret.status_code == 200


def test_secret_is_checked_even_with_certificate(server, pki):
    with https_client(server, pki, pki.billing) as client:
        answer = client.post("/api/auth/token", json={"common_name": "billing", "secret": "not-the-secret"})
    assert answer.status_code == 401


def test_command_line_trusts_ssl_cert_file(server, pki):
    environment = {key: value for key, value in os.environ.items() if not key.startswith("LOGPOSE_")}
    environment.update(SSL_CERT_FILE=str(pki.ca.path), LOGPOSE_URL=server.url, LOGPOSE_COMMON_NAME="admin",
                       LOGPOSE_SECRET_FILE=str(server.data_dir / "admin.secret"))
    result = subprocess.run([sys.executable, "-c", "from logpose.cli.app import main; main()", "client", "list"],
                            capture_output=True, text=True, env=environment, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "billing" in result.stdout


def test_certificate_ignored_without_client_ca(pki, tmp_path):
    process = ServerProcess(tmp_path / "data", tls_args(pki, client_ca=False), ca_file=pki.ca.path).start()
    try:
        with process.client() as admin:
            assert admin.post("/api/clients", json={"common_name": "billing", "role": "reader"}).status_code == 201
        with https_client(process, pki, pki.billing) as client:
            answer = client.post("/api/auth/token", json={"common_name": "billing"})
        assert answer.status_code == 422
    finally:
        process.stop()


# ----- configuration errors ----------------------------------------------------------------

def start_failure(tmp_path: Path, arguments: list[str]) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("LOGPOSE_")}
    command = [sys.executable, "-m", "logpose.server.main", "--data-dir", str(tmp_path / "data"),
               "--http-listen", f"127.0.0.1:{free_port()}", "--dns-listen", f"127.0.0.1:{free_port()}", *arguments]
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=30)


def test_config_errors_name_the_setting(pki, tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cases = {
        "tls_key": ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.billing.key)],
        "tls_cert: cannot read": ["--tls-cert", str(tmp_path / "missing.crt"), "--tls-key", str(pki.server.key)],
        "tls_cert": ["--tls-cert", str(garbage), "--tls-key", str(pki.server.key)],
        "tls_key is missing": ["--tls-cert", str(pki.server.cert)],
        "tls_client_ca needs tls_cert": ["--tls-client-ca", str(pki.ca.path)],
        "tls_client_ca:": [*tls_args(pki, client_ca=False), "--tls-client-ca", str(garbage)],
    }
    for expected, arguments in cases.items():
        result = start_failure(tmp_path, arguments)
        assert result.returncode == 2, (expected, result.stderr)
        assert expected in result.stderr, (expected, result.stderr)
        assert "Traceback" not in result.stderr


def test_tls_settings_from_every_source(tmp_path):
    config = tmp_path / "logpose.toml"
    config.write_text('tls_cert = "/file/cert.pem"\ntls_key = "/file/key.pem"\ntls_client_ca = "/file/ca.pem"\n')
    from_file = load_settings({}, {}, config)
    assert (from_file.tls_cert, from_file.tls_key, from_file.tls_client_ca) == (
        Path("/file/cert.pem"), Path("/file/key.pem"), Path("/file/ca.pem"))

    environ = {"LOGPOSE_TLS_CERT": "/env/cert.pem", "LOGPOSE_TLS_KEY": "/env/key.pem"}
    from_environment = load_settings({}, environ, config)
    assert from_environment.tls_cert == Path("/env/cert.pem")
    assert from_environment.tls_client_ca == Path("/file/ca.pem")

    from_flags = load_settings({"tls_key": "/flag/key.pem"}, environ, config)
    assert from_flags.tls_key == Path("/flag/key.pem")


def test_mismatched_key_message(pki, tmp_path):
    result = start_failure(tmp_path, ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.billing.key)])
    assert f"tls_key: {pki.billing.key} does not match the certificate in tls_cert {pki.server.cert}" in result.stderr


# ----- nothing secret in the log -----------------------------------------------------------

def test_log_contains_no_secret_token_or_key(pki, tmp_path):
    process = ServerProcess(tmp_path / "data", [*tls_args(pki), "--log-level", "DEBUG"], ca_file=pki.ca.path)
    process.start()
    seen: list[str] = [process.admin_secret()]
    answers: list[httpx.Response] = []
    try:
        with process.client() as admin, https_client(process, pki) as anonymous:
            created = admin.post("/api/clients", json={"common_name": "billing", "role": "registrar",
                                                       "services": ["*"]})
            seen.append(created.json()["secret"])
            rotated = admin.post("/api/clients/billing/rotate")
            seen.append(rotated.json()["secret"])
            for attempt in range(3):
                wrong = f"guessed-secret-{attempt}-abcdefgh"
                seen.append(wrong)
                answers.append(anonymous.post("/api/auth/token", json={"common_name": "billing", "secret": wrong}))
            issued = anonymous.post("/api/auth/token", json={"common_name": "billing", "secret": seen[2]})
            token = issued.json()["access_token"]
            seen.append(token)
            answers.append(anonymous.get("/api/services", headers={"Authorization": f"Bearer {token}x"}))
            assert admin.delete("/api/clients/billing").status_code == 204
            answers.append(anonymous.get("/api/services", headers={"Authorization": f"Bearer {token}"}))
            seen.append(admin.headers["Authorization"].removeprefix("Bearer "))
        with https_client(process, pki, pki.stranger) as client:
            answers.append(client.post("/api/auth/token", json={"common_name": "stranger"}))
    finally:
        process.stop()

    seen.append((process.data_dir / "jwt.key").read_text().strip())
    for key_file in (pki.server.key, pki.billing.key, pki.stranger.key):
        seen.extend(line for line in key_file.read_text().splitlines() if not line.startswith("-----"))
    log = process.log()
    assert "Rejected token request for common name 'billing' from 127.0.0.1" in log
    for value in seen:
        assert value not in log
    for answer in answers:
        assert answer.status_code in (401, 429), answer.text
        for value in seen:
            assert value not in answer.text
