"""The HTTP API's TLS context, built and checked at start.

Every file is read once here, so a missing file, a certificate that is not
PEM or a key that does not match its certificate stops the server with the
setting named, before any listener is bound.
"""

from __future__ import annotations

import ssl
import stat
from pathlib import Path

from logpose.errors import ConfigError
from logpose.log import server_log


def server_ssl_context(cert: Path | None, key: Path | None, client_ca: Path | None) -> ssl.SSLContext | None:
    """Return the server's TLS context, or None when TLS is not configured.

    With ``client_ca``, clients may present a certificate (``CERT_OPTIONAL``):
    the handshake fails for a certificate that the CA did not sign, and a
    client without one still connects and authenticates with its secret.
    """
    if cert is None or key is None:
        return None
    _check_readable("tls_cert", cert)
    _check_readable("tls_key", key)
    _warn_if_others_can_read(key)
    _check_certificates("tls_cert", cert)

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2

    def reject_encrypted_key() -> bytes:
        raise ConfigError(f"tls_key: {key} is encrypted; give an unencrypted key file readable by this user only")

    try:
        context.load_cert_chain(cert, key, password=reject_encrypted_key)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"tls_key: {key} does not match the certificate in tls_cert {cert}") from exc
        raise ConfigError(f"tls_key: {key} is not a usable PEM private key ({exc.reason or exc})") from exc

    if client_ca is not None:
        _check_readable("tls_client_ca", client_ca)
        _check_certificates("tls_client_ca", client_ca)
        context.load_verify_locations(cafile=client_ca)
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def _check_readable(setting: str, path: Path) -> None:
    try:
        with path.open("rb") as file:
            file.read(1)
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror or exc}") from exc


def _check_certificates(setting: str, path: Path) -> None:
    """Raise ConfigError unless ``path`` contains at least one PEM certificate that OpenSSL can parse."""
    scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        scratch.load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise ConfigError(f"{setting}: {path} contains no usable PEM certificate ({exc.reason or exc})") from exc


def _warn_if_others_can_read(key: Path) -> None:
    if key.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        server_log.warning("TLS key %s is readable by its group or others; restrict it with chmod 600", key)
