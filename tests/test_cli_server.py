"""``logpose-command`` against a real server process."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import closed_port, one_error_line, run_cli, wait_until


@pytest.fixture
def cli(server):
    def run(*arguments: str, credentials: bool = True) -> subprocess.CompletedProcess[str]:
        return run_cli(server, *arguments, credentials=credentials)

    return run


def test_service_lifecycle(cli):
    assert cli("service", "add", "billing", "--name", "Billing API").returncode == 0
    listed = cli("--output", "json", "service", "list")
    assert [service["code"] for service in json.loads(listed.stdout)] == ["billing"]
    shown = cli("service", "show", "billing")
    assert "Billing API" in shown.stdout
    duplicate = cli("service", "add", "billing")
    assert duplicate.returncode == 1
    assert "already exists" in one_error_line(duplicate)
    assert cli("service", "remove", "billing").returncode == 0
    missing = cli("service", "show", "billing")
    assert missing.returncode == 1
    assert "not found" in one_error_line(missing)


def test_instance_lifecycle_and_health_report(cli):
    added = cli("--output", "json", "instance", "add", "--service", "web", "--address", "10.0.0.5:8080",
                "--protocol", "http", "--check", "none", "--tag", "blue", "--meta", "zone=a", "--weight", "5")
    assert added.returncode == 0, added.stderr
    instance = json.loads(added.stdout)
    assert instance["protocol"] == "Http"
    assert instance["weight"] == 5

    again = cli("--output", "json", "instance", "add", "--service", "web", "--address", "10.0.0.5:8080",
                "--protocol", "HTTP", "--check", "none")
    assert json.loads(again.stdout)["id"] == instance["id"]

    assert cli("discover", "web").stdout.strip() == ""
    reported = cli("health", "report", instance["id"], "--status", "Healthy", "--check-output", "fine")
    assert reported.returncode == 0, reported.stderr
    discovered = json.loads(cli("--output", "json", "discover", "web").stdout)
    assert [item["id"] for item in discovered] == [instance["id"]]

    busy = cli("service", "remove", "web")
    assert busy.returncode == 1
    assert "instance" in one_error_line(busy)
    assert cli("instance", "remove", instance["id"]).returncode == 0
    gone = cli("instance", "show", instance["id"])
    assert gone.returncode == 1
    assert "not found" in one_error_line(gone)


def test_probed_instance_listed_by_health(cli):
    port = closed_port()
    assert cli("instance", "add", "--service", "down", "--address", f"127.0.0.1:{port}",
               "--protocol", "Tcp").returncode == 0
    assert wait_until(lambda: json.loads(cli("--output", "json", "instance", "list", "--health", "Unhealthy").stdout),
                      timeout=5)


@pytest.mark.parametrize(
    "arguments, fragment",
    [
        (("instance", "add", "--service", "Web", "--address", "10.0.0.5:80", "--protocol", "Http"), "lower case"),
        (("instance", "add", "--service", "web", "--address", "10.0.0.5", "--protocol", "Http"), "--address"),
        (("instance", "add", "--service", "web", "--address", "10.0.0.5:80", "--protocol", "ftp"), "--protocol"),
        (("instance", "show", "not-an-id"), "instance"),
        (("--output", "xml", "service", "list"), "--output"),
    ],
)
def test_bad_input_one_line_and_nothing_changed(cli, arguments, fragment):
    result = cli(*arguments)
    assert result.returncode == 2
    assert fragment in one_error_line(result)
    assert json.loads(cli("--output", "json", "instance", "list").stdout or "[]") == []


def test_wrong_secret_is_one_line(cli, tmp_path):
    wrong = tmp_path / "wrong.secret"
    wrong.write_text("not-the-secret\n")
    result = cli("--common-name", "admin", "--secret-file", str(wrong), "service", "list", credentials=False)
    assert result.returncode == 1
    assert "invalid" in one_error_line(result)


def test_missing_credentials_is_one_line(cli):
    result = cli("service", "list", credentials=False)
    assert result.returncode == 2
    assert "missing credentials" in one_error_line(result)


def test_drain_undrain_and_history(cli, server):
    added = cli("--output", "json", "instance", "add", "--service", "web", "--address",
                f"127.0.0.1:{server.http_port}", "--protocol", "Http", "--check-path", "/healthz")
    assert added.returncode == 0, added.stderr
    instance = json.loads(added.stdout)
    assert instance["check"]["type"] == "http"
    assert wait_until(lambda: json.loads(cli("--output", "json", "discover", "web").stdout), timeout=5)

    drained = cli("instance", "drain", instance["id"], "--reason", "kernel update")
    assert drained.returncode == 0, drained.stderr
    assert json.loads(cli("--output", "json", "discover", "web").stdout) == []
    assert cli("instance", "undrain", instance["id"]).returncode == 0
    assert json.loads(cli("--output", "json", "discover", "web").stdout)

    history = cli("instance", "history", instance["id"])
    assert "Healthy" in history.stdout


def test_drained_instance_marked_in_tables(cli, server):
    added = cli("--output", "json", "instance", "add", "--service", "web", "--address", "10.0.0.5:80",
                "--protocol", "Http", "--check", "none")
    instance = json.loads(added.stdout)
    cli("instance", "drain", instance["id"], "--reason", "kernel patch")
    assert "Unknown (drained)" in cli("instance", "list").stdout
    shown = cli("instance", "show", instance["id"]).stdout
    assert "kernel patch" in shown
