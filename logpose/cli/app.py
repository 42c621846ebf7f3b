"""``logpose-command``: the operator's command line for a LogPose server.

Flag values are checked here with the same validators the server uses, so a
bad value fails before any request is sent. Every failure ends in one line on
stderr that starts with ``error:``. The exit code is 1 when the server or the
network failed and 2 when the command line itself is wrong (bad flag value,
missing credentials, unreadable secret file).

In table mode stdout carries aligned columns. In JSON mode stdout carries
only the server's JSON, and notes such as "created instance ..." go to stderr.
"""

from __future__ import annotations

import enum
import json
import math
import os
import re
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, NoReturn, Sequence

import httpx
import typer

from logpose import __version__
from logpose.auth import parse_client_services, parse_common_name, parse_role
from logpose.cli.client import ApiError, LogPoseClient
from logpose.errors import LogPoseError, ValidationError
from logpose.model import (
    parse_address,
    parse_check,
    parse_health,
    parse_health_report,
    parse_metadata,
    parse_output,
    parse_protocol,
    parse_service_code,
    parse_service_name,
    parse_tags,
    parse_weight,
)

PROGRAM_NAME = "logpose-command"
DEFAULT_SERVER_URL = "http://127.0.0.1:8470"
EXIT_API_ERROR = 1
EXIT_USAGE_ERROR = 2
MISSING_CREDENTIALS = "missing credentials: give --token or LOGPOSE_TOKEN, or --common-name with --secret-file"


class OutputFormat(str, enum.Enum):
    TABLE = "table"
    JSON = "json"


class InvalidUsageError(LogPoseError):
    """A command line that cannot work, found before any request is sent; exits with 2."""


@dataclass(frozen=True)
class Settings:
    """Global options, shared by every command through the click context."""

    server: str
    token: str | None
    common_name: str | None
    secret_file: Path | None
    output: OutputFormat
    timeout: float


app = typer.Typer(
    name=PROGRAM_NAME,
    help="Manage services and instances of a LogPose server and discover healthy instances.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)
service_app = typer.Typer(help="Create, list, show and remove services.", no_args_is_help=True, rich_markup_mode=None)
instance_app = typer.Typer(help="Register, list, show and remove instances.", no_args_is_help=True, rich_markup_mode=None)
health_app = typer.Typer(help="Report the health of an instance.", no_args_is_help=True, rich_markup_mode=None)
client_app = typer.Typer(
    help="Create, list, show and remove clients, and rotate their secrets.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(service_app, name="service")
app.add_typer(instance_app, name="instance")
app.add_typer(health_app, name="health")
app.add_typer(client_app, name="client")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"{PROGRAM_NAME} {__version__}")
        raise typer.Exit()


@app.callback()
def configure(
    ctx: typer.Context,
    server: Annotated[
        str, typer.Option("--server", envvar="LOGPOSE_URL", metavar="URL", help="Base URL of the LogPose HTTP API.")
    ] = DEFAULT_SERVER_URL,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="LOGPOSE_TOKEN",
            metavar="TOKEN",
            help="Bearer token sent with every request; used instead of --common-name when both are given.",
        ),
    ] = None,
    common_name: Annotated[
        str | None,
        typer.Option(
            "--common-name",
            envvar="LOGPOSE_COMMON_NAME",
            metavar="NAME",
            help="Client name to obtain a token with, together with --secret-file.",
        ),
    ] = None,
    secret_file: Annotated[
        Path | None,
        typer.Option(
            "--secret-file",
            envvar="LOGPOSE_SECRET_FILE",
            metavar="FILE",
            help="File that contains the client's secret (surrounding whitespace is ignored).",
        ),
    ] = None,
    output: Annotated[
        str, typer.Option("--output", "-o", metavar="table|json", help="Output format.")
    ] = OutputFormat.TABLE.value,
    timeout: Annotated[
        str, typer.Option("--timeout", metavar="SECONDS", help="Seconds to wait to connect and for each response.")
    ] = "10",
    version: Annotated[
        bool,
        typer.Option("--version", is_eager=True, callback=_print_version, help="Print the version and exit."),
    ] = False,
) -> None:
    """Manage services and instances of a LogPose server and discover healthy instances."""
    ctx.obj = Settings(
        server=_parse_server_url(server),
        token=token or None,
        common_name=common_name or None,
        secret_file=secret_file,
        output=_parse_output_format(output),
        timeout=_parse_timeout(timeout),
    )


# Services


@service_app.command("add")
def service_add(
    ctx: typer.Context,
    code: Annotated[str, typer.Argument(metavar="CODE", help="Service code: one lower-case DNS label.")],
    name: Annotated[str | None, typer.Option("--name", help="Display name; defaults to the code.")] = None,
) -> None:
    """Create a service."""
    code = _validate(parse_service_code, code, "CODE")
    if name is not None:
        name = _validate(parse_service_name, name, "--name")

    service = _connect(ctx).create_service(code, name)

    settings = _settings(ctx)
    _note(settings, f"created service {code!r}")
    _emit(settings, service, _print_service)


@service_app.command("list")
def service_list(ctx: typer.Context) -> None:
    """List every service with its instance counts."""
    services = _connect(ctx).list_services()
    _emit(_settings(ctx), services, _print_services)


@service_app.command("show")
def service_show(
    ctx: typer.Context,
    code: Annotated[str, typer.Argument(metavar="CODE", help="Service code.")],
) -> None:
    """Show one service."""
    code = _validate(parse_service_code, code, "CODE")
    service = _connect(ctx).get_service(code)
    _emit(_settings(ctx), service, _print_service)


@service_app.command("remove")
def service_remove(
    ctx: typer.Context,
    code: Annotated[str, typer.Argument(metavar="CODE", help="Service code.")],
    force: Annotated[bool, typer.Option("--force", help="Remove the service's instances too.")] = False,
) -> None:
    """Remove a service. Without --force the server rejects a service that still has instances."""
    code = _validate(parse_service_code, code, "CODE")
    _connect(ctx).delete_service(code, force=force)
    _note(_settings(ctx), f"removed service {code!r}")


# Instances


@instance_app.command("add")
def instance_add(
    ctx: typer.Context,
    service: Annotated[str, typer.Option("--service", metavar="CODE", help="Code of the service.")],
    address: Annotated[
        str, typer.Option("--address", metavar="HOST:PORT", help="IPv4:port, [IPv6]:port or hostname:port.")
    ],
    protocol: Annotated[
        str, typer.Option("--protocol", metavar="PROTOCOL", help="One of Http, Https, Grpc, Tcp, Udp (any case).")
    ],
    tags: Annotated[
        list[str] | None, typer.Option("--tag", metavar="TAG", help="A tag; repeat the flag for several.")
    ] = None,
    meta: Annotated[
        list[str] | None,
        typer.Option("--meta", metavar="KEY=VALUE", help="A metadata entry; repeat the flag for several."),
    ] = None,
    weight: Annotated[
        str | None, typer.Option("--weight", metavar="N", help="SRV weight from 0 to 65535; the server uses 1.")
    ] = None,
    check: Annotated[
        str | None,
        typer.Option(
            "--check",
            metavar="tcp|http|ttl|none",
            help="Health check; the server picks tcp, or none for Udp, when this is not given.",
        ),
    ] = None,
    ttl: Annotated[
        str | None,
        typer.Option(
            "--ttl", metavar="SECONDS", help="Seconds allowed between health reports; implies --check ttl."
        ),
    ] = None,
    check_path: Annotated[
        str | None,
        typer.Option("--check-path", metavar="PATH", help="URL path of an HTTP check, like /health; implies --check http."),
    ] = None,
    check_interval: Annotated[
        str | None,
        typer.Option("--check-interval", metavar="SECONDS", help="Seconds between probes; the server default when not given."),
    ] = None,
    check_timeout: Annotated[
        str | None,
        typer.Option("--check-timeout", metavar="SECONDS", help="Seconds before a probe fails; less than the interval."),
    ] = None,
) -> None:
    """Register an instance, or update it if the same address and protocol are already registered."""
    service = _validate(parse_service_code, service, "--service")
    probe = {"path": check_path, "interval": check_interval, "timeout": check_timeout}
    body = _registration_body(address, protocol, tags or [], meta or [], weight, check, ttl, probe)

    instance, created = _connect(ctx).register_instance(service, body)

    settings = _settings(ctx)
    _note(settings, f"{'created' if created else 'updated'} instance {instance.get('id', '?')}")
    check_type = instance.get("check", {}).get("type") if isinstance(instance.get("check"), dict) else None
    if check_type in ("none", "ttl") and instance.get("health") == "Unknown":
        _note(
            settings,
            f"note: a {check_type} check is not probed; the instance stays out of discovery until it reports "
            f"with 'health report {instance.get('id', 'ID')} --status Healthy'",
        )
    _emit(settings, instance, _print_instance)


@instance_app.command("list")
def instance_list(
    ctx: typer.Context,
    service: Annotated[str | None, typer.Option("--service", metavar="CODE", help="Only this service.")] = None,
    health: Annotated[
        str | None,
        typer.Option("--health", metavar="Healthy|Unhealthy|Unknown", help="Only instances in this health state."),
    ] = None,
) -> None:
    """List instances of every health state, optionally filtered."""
    if service is not None:
        service = _validate(parse_service_code, service, "--service")
    health_value = _validate(parse_health, health, "--health").value if health is not None else None

    instances = _connect(ctx).list_instances(service=service, health=health_value)
    _emit(_settings(ctx), instances, _print_instances)


@instance_app.command("show")
def instance_show(
    ctx: typer.Context,
    instance_id: Annotated[str, typer.Argument(metavar="ID", help="Instance id (a UUID).")],
) -> None:
    """Show one instance."""
    instance_id = _parse_instance_id(instance_id)
    instance = _connect(ctx).get_instance(instance_id)
    _emit(_settings(ctx), instance, _print_instance)


@instance_app.command("remove")
def instance_remove(
    ctx: typer.Context,
    instance_id: Annotated[str, typer.Argument(metavar="ID", help="Instance id (a UUID).")],
) -> None:
    """Deregister an instance."""
    instance_id = _parse_instance_id(instance_id)
    _connect(ctx).delete_instance(instance_id)
    _note(_settings(ctx), f"removed instance {instance_id}")


@instance_app.command("drain")
def instance_drain(
    ctx: typer.Context,
    instance_id: Annotated[str, typer.Argument(metavar="ID", help="Instance id (a UUID).")],
    reason: Annotated[str, typer.Option("--reason", help="Why, shown in instance show (at most 500 characters).")] = "maintenance",
) -> None:
    """Take an instance out of discovery (DNS and HTTP) without deregistering it."""
    instance_id = _parse_instance_id(instance_id)
    if not reason or len(reason) > 500:
        raise InvalidUsageError(f"invalid value for --reason: must be 1 to 500 characters, got {len(reason)}")
    instance = _connect(ctx).set_maintenance(instance_id, True, reason)
    _emit(_settings(ctx), instance, _print_instance)
    _note(_settings(ctx), f"drained instance {instance_id}")


@instance_app.command("undrain")
def instance_undrain(
    ctx: typer.Context,
    instance_id: Annotated[str, typer.Argument(metavar="ID", help="Instance id (a UUID).")],
) -> None:
    """Return a drained instance to discovery; its checks decide whether it is answered."""
    instance_id = _parse_instance_id(instance_id)
    instance = _connect(ctx).set_maintenance(instance_id, False)
    _emit(_settings(ctx), instance, _print_instance)
    _note(_settings(ctx), f"undrained instance {instance_id}")


@instance_app.command("history")
def instance_history(
    ctx: typer.Context,
    instance_id: Annotated[str, typer.Argument(metavar="ID", help="Instance id (a UUID).")],
) -> None:
    """Show an instance's recent health transitions, oldest first."""
    instance_id = _parse_instance_id(instance_id)
    transitions = _connect(ctx).instance_history(instance_id)
    _emit(
        _settings(ctx),
        transitions,
        lambda rows: _print_table(
            ["AT", "FROM", "TO", "OUTPUT"], [[row.get("at"), row.get("from"), row.get("to"), row.get("output")] for row in rows]
        ),
    )


# Clients


@client_app.command("add")
def client_add(
    ctx: typer.Context,
    common_name: Annotated[
        str, typer.Argument(metavar="NAME", help="Client name: 1 to 128 characters of A-Z, a-z, 0-9, '.', '_', '@', '-'.")
    ],
    role: Annotated[str, typer.Option("--role", metavar="reader|registrar|admin", help="What the client may do.")],
    services: Annotated[
        list[str] | None,
        typer.Option(
            "--service", metavar="CODE",
            help="A service a registrar may write to, or '*' for every service; repeat the flag for several.",
        ),
    ] = None,
    save_secret: Annotated[
        Path | None,
        typer.Option(
            "--save-secret", metavar="FILE",
            help="Write the new secret to FILE, created with mode 0600, instead of printing it.",
        ),
    ] = None,
) -> None:
    """Create a client and show its secret, which the server stores only as a hash and never shows again."""
    common_name = _validate(parse_common_name, common_name, "NAME")
    role = _validate(parse_role, role, "--role")
    service_codes = list(_validate(parse_client_services, list(services or []), "--service", role))
    _check_secret_destination(save_secret)

    client = _connect(ctx).create_client(common_name, role, service_codes)

    settings = _settings(ctx)
    _note(settings, f"created client {common_name!r}")
    _emit_client_secret(settings, client, save_secret)


@client_app.command("list")
def client_list(ctx: typer.Context) -> None:
    """List every client with its role and services."""
    clients = _connect(ctx).list_clients()
    _emit(_settings(ctx), clients, _print_clients)


@client_app.command("show")
def client_show(
    ctx: typer.Context,
    common_name: Annotated[str, typer.Argument(metavar="NAME", help="Client name.")],
) -> None:
    """Show one client."""
    common_name = _validate(parse_common_name, common_name, "NAME")
    client = _connect(ctx).get_client(common_name)
    _emit(_settings(ctx), client, _print_client)


@client_app.command("remove")
def client_remove(
    ctx: typer.Context,
    common_name: Annotated[str, typer.Argument(metavar="NAME", help="Client name.")],
) -> None:
    """Remove a client; its tokens stop working at once. The server keeps at least one admin."""
    common_name = _validate(parse_common_name, common_name, "NAME")
    _connect(ctx).delete_client(common_name)
    _note(_settings(ctx), f"removed client {common_name!r}")


@client_app.command("rotate")
def client_rotate(
    ctx: typer.Context,
    common_name: Annotated[str, typer.Argument(metavar="NAME", help="Client name.")],
    save_secret: Annotated[
        Path | None,
        typer.Option(
            "--save-secret", metavar="FILE",
            help="Write the new secret to FILE, created with mode 0600, instead of printing it.",
        ),
    ] = None,
) -> None:
    """Give a client a new secret; its earlier tokens stop working at once."""
    common_name = _validate(parse_common_name, common_name, "NAME")
    _check_secret_destination(save_secret)

    client = _connect(ctx).rotate_client_secret(common_name)

    settings = _settings(ctx)
    _note(settings, f"rotated the secret of client {common_name!r}")
    _emit_client_secret(settings, client, save_secret)


def _check_secret_destination(path: Path | None) -> None:
    """Reject a --save-secret file before the request, so a new secret is never lost."""
    if path is not None and (path.exists() or not path.parent.is_dir()):
        reason = "exists" if path.exists() else "is in a directory that does not exist"
        raise InvalidUsageError(f"--save-secret {path} {reason}; give a new file in an existing directory")


def _emit_client_secret(settings: Settings, client: dict[str, Any], path: Path | None) -> None:
    """Show a client with its new secret, or save the secret to ``path`` and show the client without it."""
    secret = client.get("secret")
    if path is not None and isinstance(secret, str):
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w", encoding="utf-8") as file:
                file.write(secret + "\n")
        except OSError as exc:
            # The server cannot show this secret again, so print it rather than lose it.
            typer.echo(f"cannot write --save-secret {path}: {exc.strerror or exc}; the secret is shown instead", err=True)
        else:
            client = {key: value for key, value in client.items() if key != "secret"}
            typer.echo(f"saved the secret to {path}", err=True)
    if "secret" in client:
        typer.echo("keep the secret now: the server stores only its hash and cannot show it again", err=True)
    _emit(settings, client, _print_client)


# Discovery, health and tokens


@app.command("discover")
def discover(
    ctx: typer.Context,
    code: Annotated[str, typer.Argument(metavar="CODE", help="Service code.")],
) -> None:
    """List the healthy instances of a service, as clients discover them."""
    code = _validate(parse_service_code, code, "CODE")
    instances = _connect(ctx).discover(code)

    settings = _settings(ctx)
    if not instances and settings.output is OutputFormat.TABLE:
        typer.echo(f"no healthy instances of {code!r}", err=True)
        return
    _emit(settings, instances, _print_instances)


@health_app.command("report")
def health_report(
    ctx: typer.Context,
    instance_id: Annotated[str, typer.Argument(metavar="ID", help="Instance id (a UUID).")],
    status: Annotated[str, typer.Option("--status", metavar="Healthy|Unhealthy", help="Reported health.")],
    check_output: Annotated[
        str | None, typer.Option("--check-output", metavar="TEXT", help="Check output kept with the instance (at most 4 KiB).")
    ] = None,
) -> None:
    """Report the result of a check made by the instance itself."""
    instance_id = _parse_instance_id(instance_id)
    health = _validate(parse_health_report, status, "--status")
    if check_output is not None:
        check_output = _validate(parse_output, check_output, "--check-output")

    instance = _connect(ctx).report_health(instance_id, health.value, check_output)

    settings = _settings(ctx)
    _note(settings, f"reported {health.value} for instance {instance_id}; health is now {instance.get('health', '?')}")
    _emit(settings, instance, _print_instance)


@app.command("token")
def token(ctx: typer.Context) -> None:
    """Print an access token obtained with --common-name and --secret-file.

    Use it as: export LOGPOSE_TOKEN=$(logpose-command token)
    """
    settings = _settings(ctx)
    if not (settings.common_name and settings.secret_file):
        raise InvalidUsageError(
            "token needs --common-name with --secret-file (or LOGPOSE_COMMON_NAME and LOGPOSE_SECRET_FILE)"
        )
    token_response = _issue_token(settings)
    if settings.output is OutputFormat.JSON:
        _print_json(token_response)
    else:
        typer.echo(token_response["access_token"])


# Input checks

# Flags that take numbers are read as text and converted here, so that their
# errors read like the server's instead of like the type coercion's.


def _parse_output_format(value: str) -> OutputFormat:
    for output_format in OutputFormat:
        if output_format.value == value.lower():
            return output_format
    accepted = ", ".join(f.value for f in OutputFormat)
    raise typer.BadParameter(f"{value!r}; accepted: {accepted}", param_hint="--output")


def _parse_seconds(value: str, flag: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds):
        raise typer.BadParameter(f"{value!r} is not a number of seconds", param_hint=flag)
    return seconds


def _parse_timeout(value: str) -> float:
    seconds = _parse_seconds(value, "--timeout")
    if seconds <= 0:
        raise typer.BadParameter(f"must be more than 0 seconds, got {value!r}", param_hint="--timeout")
    return seconds


def _whole_number_or_text(value: str) -> int | str:
    """Convert a flag value to int, or return the text unchanged for the validator to reject."""
    try:
        return int(value)
    except ValueError:
        return value


def _parse_server_url(value: str) -> str:
    try:
        url = httpx.URL(value)
    except httpx.InvalidURL as exc:
        raise typer.BadParameter(f"{value!r} is not a URL: {exc}", param_hint="--server") from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise typer.BadParameter(f"{value!r} is not an http:// or https:// URL with a host", param_hint="--server")
    if url.query or url.fragment:
        raise typer.BadParameter(f"{value!r} must not have a query or fragment", param_hint="--server")
    return value.rstrip("/")


def _validate(parse: Callable[..., Any], value: Any, flag: str, *args: Any) -> Any:
    """Run a model validator and turn its ValidationError into a usage error naming the flag."""
    try:
        return parse(value, *args)
    except ValidationError as exc:
        raise typer.BadParameter(exc.reason, param_hint=flag) from exc


def _parse_instance_id(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is not an instance id; ids are UUIDs like 0d5f6a4e-8b0e-4c1e-9a57-3c2f1f0e7b21",
            param_hint="ID",
        ) from None


def _parse_meta(entries: Sequence[str]) -> dict[str, str]:
    metadata: dict[str, str] = {}
    for entry in entries:
        key, sep, value = entry.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{entry!r} is not KEY=VALUE", param_hint="--meta")
        if key in metadata:
            raise typer.BadParameter(f"key {key!r} is given more than once", param_hint="--meta")
        metadata[key] = value
    try:
        return parse_metadata(metadata)
    except ValidationError as exc:
        raise typer.BadParameter(f"{exc.field}: {exc.reason}", param_hint="--meta") from exc


def _registration_body(
    address: str,
    protocol: str,
    tags: Sequence[str],
    meta: Sequence[str],
    weight: str | None,
    check: str | None,
    ttl: str | None,
    probe: dict[str, str | None],
) -> dict[str, Any]:
    """Validate the flags of ``instance add`` and build the registration request body."""
    parsed_protocol = _validate(parse_protocol, protocol, "--protocol")
    body: dict[str, Any] = {
        "address": str(_validate(parse_address, address, "--address")),
        "protocol": parsed_protocol.value,
    }
    if tags:
        body["tags"] = list(_validate(parse_tags, list(tags), "--tag"))
    if meta:
        body["metadata"] = _parse_meta(meta)
    if weight is not None:
        body["weight"] = _validate(parse_weight, _whole_number_or_text(weight), "--weight")

    if check is None and ttl is not None:
        check = "ttl"
    if check is None and probe["path"] is not None:
        check = "http"
    if check is None and (probe["interval"] is not None or probe["timeout"] is not None):
        check = "tcp"
    if check is not None:
        if check.lower() == "ttl" and ttl is None:
            raise InvalidUsageError("--check ttl needs --ttl SECONDS, the time allowed between health reports")
        requested: dict[str, Any] = {"type": check}
        if ttl is not None:
            requested["ttl"] = _parse_seconds(ttl, "--ttl")
        if probe["path"] is not None:
            requested["path"] = probe["path"]
        for name in ("interval", "timeout"):
            if probe[name] is not None:
                requested[name] = _parse_seconds(probe[name], f"--check-{name}")
        try:
            parsed_check = parse_check(requested, parsed_protocol)
        except ValidationError as exc:
            flags = {"ttl": "--ttl", "path": "--check-path", "interval": "--check-interval", "timeout": "--check-timeout"}
            flag = flags.get(exc.field.rsplit(".", 1)[-1], "--check")
            raise typer.BadParameter(exc.reason, param_hint=flag) from exc
        body["check"] = {key: value for key, value in parsed_check.to_json().items() if value is not None}
    return body


# Connection and credentials


def _settings(ctx: typer.Context) -> Settings:
    settings = ctx.find_object(Settings)
    assert settings is not None, "the app callback stores Settings before any command runs"
    return settings


def _connect(ctx: typer.Context) -> LogPoseClient:
    """Return a client authenticated by --token, or by a token obtained with the client secret.

    The client is closed when the click context ends.
    """
    settings = _settings(ctx)
    if settings.token:
        token = settings.token
    elif settings.common_name or settings.secret_file:
        token = _issue_token(settings)["access_token"]
    else:
        raise InvalidUsageError(MISSING_CREDENTIALS)

    client = LogPoseClient(settings.server, token=token, timeout=settings.timeout)
    ctx.call_on_close(client.close)
    return client


def _issue_token(settings: Settings) -> dict[str, Any]:
    """Obtain a token with --common-name and --secret-file and return the whole response body."""
    if not settings.common_name:
        raise InvalidUsageError(f"{MISSING_CREDENTIALS} (--secret-file is given without --common-name)")
    if settings.secret_file is None:
        raise InvalidUsageError(f"{MISSING_CREDENTIALS} (--common-name is given without --secret-file)")
    secret = _read_secret(settings.secret_file)

    with LogPoseClient(settings.server, timeout=settings.timeout) as client:
        try:
            token_response = client.issue_token(settings.common_name, secret)
        except ApiError as exc:
            if exc.status == httpx.codes.UNAUTHORIZED:
                raise ApiError(f"{exc.detail}; check --common-name and --secret-file", exc.status) from exc
            raise

    if not isinstance(token_response, dict) or not isinstance(token_response.get("access_token"), str):
        raise ApiError(f"the response to POST {settings.server}/api/auth/token has no access_token")
    return token_response


def _read_secret(path: Path) -> str:
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise InvalidUsageError(f"cannot read --secret-file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise InvalidUsageError(f"cannot read --secret-file {path}: it is not UTF-8 text") from exc
    if not secret:
        raise InvalidUsageError(f"--secret-file {path} is empty")
    return secret


# Output

# Characters that could move the cursor or recolour the terminal if a server
# value contains them: C0 and C1 controls and DEL.
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# json.dumps(ensure_ascii=False) escapes C0 controls but not these. They can occur
# only inside JSON strings, so a \uXXXX escape leaves the decoded value unchanged.
_UNESCAPED_JSON_CONTROLS = re.compile(r"[\x7f-\x9f]")


def _emit(settings: Settings, data: Any, print_table: Callable[[Any], None]) -> None:
    if settings.output is OutputFormat.JSON:
        _print_json(data)
    else:
        print_table(data)


def _note(settings: Settings, text: str) -> None:
    """Print a confirmation: on stdout in table mode, on stderr in JSON mode so stdout stays JSON."""
    typer.echo(text, err=settings.output is OutputFormat.JSON)


def _print_json(data: Any) -> None:
    text = json.dumps(data, indent=2, ensure_ascii=False)
    typer.echo(_UNESCAPED_JSON_CONTROLS.sub(lambda match: f"\\u{ord(match.group()):04x}", text))


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    return _CONTROL_CHARACTERS.sub(lambda match: repr(match.group())[1:-1], str(value))


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [list(headers)] + [[_cell(value) for value in row] for row in rows]
    widths = [max(len(row[column]) for row in cells) for column in range(len(headers))]
    for row in cells:
        typer.echo("  ".join(text.ljust(width) for text, width in zip(row, widths)).rstrip())


def _print_fields(pairs: Sequence[tuple[str, Any]]) -> None:
    width = max(len(label) for label, _ in pairs) + 1
    for label, value in pairs:
        typer.echo(f"{label + ':':<{width}} {_cell(value)}")


def _print_services(services: list[dict[str, Any]]) -> None:
    if not services:
        typer.echo("no services", err=True)
        return
    rows = [
        (s.get("code"), s.get("name"), s.get("instance_count"), s.get("healthy_count"))
        for s in services
    ]
    _print_table(("CODE", "NAME", "INSTANCES", "HEALTHY"), rows)


def _print_service(service: dict[str, Any]) -> None:
    _print_fields(
        [
            ("Code", service.get("code")),
            ("Name", service.get("name")),
            ("Instances", service.get("instance_count")),
            ("Healthy", service.get("healthy_count")),
            ("Created index", service.get("created_index")),
            ("Modify index", service.get("modify_index")),
        ]
    )


def _print_instances(instances: list[dict[str, Any]]) -> None:
    if not instances:
        typer.echo("no instances", err=True)
        return
    rows = [
        (
            i.get("id"),
            i.get("service"),
            i.get("address"),
            i.get("protocol"),
            _format_health(i),
            i.get("weight"),
            _format_check(i.get("check")),
            _format_tags(i.get("tags")),
        )
        for i in instances
    ]
    _print_table(("ID", "SERVICE", "ADDRESS", "PROTOCOL", "HEALTH", "WEIGHT", "CHECK", "TAGS"), rows)


def _print_instance(instance: dict[str, Any]) -> None:
    _print_fields(
        [
            ("ID", instance.get("id")),
            ("Service", instance.get("service")),
            ("Service name", instance.get("service_name")),
            ("Address", instance.get("address")),
            ("Protocol", instance.get("protocol")),
            ("Health", instance.get("health")),
            ("Maintenance", _format_maintenance(instance.get("maintenance"))),
            ("Output", instance.get("output")),
            ("Check", _format_check(instance.get("check"))),
            ("Weight", instance.get("weight")),
            ("Tags", _format_tags(instance.get("tags"))),
            ("Metadata", _format_metadata(instance.get("metadata"))),
            ("Registered", instance.get("registered_at")),
            ("Updated", instance.get("updated_at")),
            ("Modify index", instance.get("modify_index")),
        ]
    )


def _format_health(instance: dict[str, Any]) -> str:
    """Return the health, marked when the instance is drained and so out of discovery."""
    maintenance = instance.get("maintenance")
    drained = isinstance(maintenance, dict) and maintenance.get("enabled")
    return f"{instance.get('health')} (drained)" if drained else str(instance.get("health"))


def _format_maintenance(maintenance: Any) -> str:
    if not isinstance(maintenance, dict) or not maintenance.get("enabled"):
        return "off"
    return f"on since {maintenance.get('since')}: {maintenance.get('reason')}"


def _format_check(check: Any) -> str:
    if not isinstance(check, dict):
        return ""
    check_type = str(check.get("type", ""))
    ttl = check.get("ttl")
    return f"{check_type} {ttl:g}s" if isinstance(ttl, (int, float)) else check_type


def _format_tags(tags: Any) -> str:
    return ",".join(str(tag) for tag in tags) if isinstance(tags, list) else ""


def _format_metadata(metadata: Any) -> str:
    if not isinstance(metadata, dict):
        return ""
    return ", ".join(f"{key}={value}" for key, value in metadata.items())


def _print_clients(clients: list[dict[str, Any]]) -> None:
    if not clients:
        typer.echo("no clients", err=True)
        return
    rows = [(c.get("common_name"), c.get("role"), _format_tags(c.get("services")), c.get("created_at")) for c in clients]
    _print_table(("NAME", "ROLE", "SERVICES", "CREATED"), rows)


def _print_client(client: dict[str, Any]) -> None:
    pairs = [
        ("Name", client.get("common_name")),
        ("Role", client.get("role")),
        ("Services", _format_tags(client.get("services"))),
        ("Created", client.get("created_at")),
    ]
    if "secret" in client:
        pairs.append(("Secret", client.get("secret")))
    _print_fields(pairs)


# Entry point


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Run the command line and exit; every failure is one ``error:`` line on stderr."""
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name=PROGRAM_NAME, standalone_mode=False)
    except ApiError as exc:
        _fail(_with_token_hint(exc), EXIT_API_ERROR)
    except InvalidUsageError as exc:
        _fail(exc.detail, EXIT_USAGE_ERROR)
    except typer.TyperException as exc:
        # NOTE: click's exceptions derive from typer.TyperException only in typer
        # releases that bundle click (tested with 0.29.2); older ones need click's own classes.
        _exit_for_click_error(exc)
    except typer.Abort:
        _fail("aborted", EXIT_API_ERROR)
    except Exception as exc:  # noqa: BLE001 - the one place that turns bugs into a line, not a traceback
        _fail(f"unexpected {type(exc).__name__}: {exc}; this is a bug in {PROGRAM_NAME}", EXIT_API_ERROR)
    sys.exit(result if isinstance(result, int) else 0)


def _with_token_hint(exc: ApiError) -> str:
    if exc.status == httpx.codes.UNAUTHORIZED and "--common-name" not in exc.detail:
        return f"{exc.detail}; check --token or LOGPOSE_TOKEN, or get a new token with '{PROGRAM_NAME} token'"
    return exc.detail


def _exit_for_click_error(exc: typer.TyperException) -> NoReturn:
    """Print a click usage or parameter error as one line, with a pointer to --help."""
    # Running a group without a command raises an error whose message is the help text.
    if type(exc).__name__ == "NoArgsIsHelpError":
        typer.echo(exc.format_message())
        sys.exit(0)

    message = " ".join(exc.format_message().split()).rstrip(".")
    if message:
        message = message[0].lower() + message[1:]
    context = getattr(exc, "ctx", None)
    if exc.exit_code == EXIT_USAGE_ERROR and context is not None:
        message = f"{message}; see '{context.command_path} --help'"
    _fail(message, exc.exit_code)


def _fail(message: str, exit_code: int) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    sys.exit(exit_code)
