"""The README's commands still work, as a new user would type them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import run_cli, wait_until

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
CODE_BLOCKS = re.findall(r"```sh\n(.*?)```", README, re.DOTALL)


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    setup = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```sh\n(.*?)```", setup, re.DOTALL)
    assert len(commands) == 2
    run_command, test_command = (command.strip() for command in commands)
    assert "logpose-server" in run_command
    assert "pytest" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_first_registration_walkthrough(server):
    """Register the server's own HTTP port as the README does, then discover it by CLI and DNS."""
    added = run_cli(server, "instance", "add", "--service", "my-svc",
                "--address", f"127.0.0.1:{server.http_port}", "--protocol", "Http")
    assert added.returncode == 0, added.stderr
    assert wait_until(lambda: "Healthy" in run_cli(server, "instance", "list").stdout, timeout=5)
    discovered = run_cli(server, "--output", "json", "discover", "my-svc")
    assert discovered.returncode == 0, discovered.stderr
    assert f'"address": "127.0.0.1:{server.http_port}"' in discovered.stdout
    token = run_cli(server, "token")
    assert token.returncode == 0
    assert token.stdout.count(".") == 2, "a JWT has three dot-separated parts"


def test_dig_srv_as_in_readme(server, api):
    if shutil.which("dig") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("dig is required in CI; .ci/run installs dnsutils")
        pytest.skip("dig is not installed (Debian package dnsutils)")
    assert "dig @127.0.0.1 -p 8653 SRV my-svc.logpose.internal" in README
    api.post("/api/services/my-svc/instances",
             json={"address": f"127.0.0.1:{server.http_port}", "protocol": "Http"})

    def dig_srv() -> str:
        command = ["dig", "@127.0.0.1", "-p", str(server.dns_port), "SRV", "my-svc.logpose.internal", "+short"]
        return subprocess.run(command, capture_output=True, text=True, timeout=10).stdout

    answer = wait_until(dig_srv, timeout=5)
    assert f" {server.http_port} " in answer
    assert answer.strip().endswith(".my-svc.logpose.internal.")
