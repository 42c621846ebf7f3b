"""Log output: text or JSON lines, time stamps under journald, per-logger levels, the access log."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import dns.message
import dns.query
import httpx
import pytest

from logpose.config import load_settings
from logpose.errors import ConfigError
from logpose.logsetup import JsonFormatter, stderr_is_journal

TIME_STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")
JSON_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def make_record(message: str, *arguments: object, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("logpose.test", logging.ERROR, __file__, 1, message, arguments, exc_info)


# ----- settings -------------------------------------------------------------------


@pytest.mark.parametrize(("source", "value", "expected"), [
    ("flag", ["logpose.access=warning,logpose.dns=DEBUG"], (("logpose.access", "WARNING"), ("logpose.dns", "DEBUG"))),
    ("flag", ["logpose.dns=DEBUG", "logpose.store=ERROR"], (("logpose.dns", "DEBUG"), ("logpose.store", "ERROR"))),
    ("env", "logpose.access=WARNING", (("logpose.access", "WARNING"),)),
    ("toml", '{ "logpose.dns" = "DEBUG" }', (("logpose.dns", "DEBUG"),)),
    ("toml", '"aiohttp.server=ERROR"', (("aiohttp.server", "ERROR"),)),
    ("toml", "{}", ()),
])
def test_log_levels_sources(tmp_path, source, value, expected):
    assert load_from(tmp_path, source, "log_levels", value).log_levels == expected


@pytest.mark.parametrize(("value", "fragment"), [
    ('"logpose.dns"', "'logpose.dns' is not LOGGER=LEVEL"),
    ('"logpose.dns=LOUD"', "log_levels in"),
    ('{ "logpose dns" = "DEBUG" }', "'logpose dns' is not a logger name"),
    ("3", "must be a list of strings"),
])
def test_log_levels_invalid(tmp_path, value, fragment):
    with pytest.raises(ConfigError) as raised:
        load_from(tmp_path, "toml", "log_levels", value)
    assert fragment in raised.value.detail


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("log_format", "JSON", "json"),
    ("log_format", "text", "text"),
    ("access_log", "false", False),
    ("access_log", "on", True),
])
def test_log_format_and_access_log_from_environment(tmp_path, key, value, expected):
    assert getattr(load_from(tmp_path, "env", key, value), key) == expected


@pytest.mark.parametrize(("key", "value", "fragment"), [
    ("log_format", "xml", "LOGPOSE_LOG_FORMAT: must be one of text, json"),
    ("access_log", "sometimes", "LOGPOSE_ACCESS_LOG: must be true or false"),
])
def test_log_settings_invalid_name_the_variable(tmp_path, key, value, fragment):
    with pytest.raises(ConfigError) as raised:
        load_from(tmp_path, "env", key, value)
    assert fragment in raised.value.detail


def load_from(tmp_path, source, key, value):
    if source == "flag":
        return load_settings({key: value}, {})
    if source == "env":
        return load_settings({}, {f"LOGPOSE_{key.upper()}": value})
    path = tmp_path / "logpose.toml"
    path.write_text(f"{key} = {value}\n")
    return load_settings({}, {}, path)


# ----- formatting -------------------------------------------------------------------


def test_json_formatter_one_object_per_line():
    line = JsonFormatter().format(make_record("probe of %s failed\nsecond line", "10.0.0.1:80"))

    document = json.loads(line)

    assert "\n" not in line
    assert set(document) == {"time", "level", "logger", "message"}
    assert JSON_TIME.match(document["time"])
    assert document["level"] == "ERROR"
    assert document["logger"] == "logpose.test"
    assert document["message"] == "probe of 10.0.0.1:80 failed\nsecond line"


def test_json_formatter_includes_exception():
    try:
        raise ValueError("bad value")
    except ValueError:
        record = make_record("failed", exc_info=sys.exc_info())

    document = json.loads(JsonFormatter().format(record))

    assert document["message"] == "failed"
    assert document["exception"].startswith("Traceback (most recent call last):")
    assert "ValueError: bad value" in document["exception"]


def test_journal_detected_only_for_matching_stream(tmp_path):
    path = tmp_path / "stream"
    path.touch()
    status = os.stat(path)
    with path.open("w") as stream:
        matching = stderr_is_journal({"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"}, stream)
        other = stderr_is_journal({"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino + 1}"}, stream)
        malformed = stderr_is_journal({"JOURNAL_STREAM": "journal"}, stream)
        unset = stderr_is_journal({}, stream)

    assert matching is True
    assert other is False
    assert malformed is False
    assert unset is False


def test_reconfigure_resets_loggers_no_longer_named():
    """A second configuration without a logger's level puts it back on the root's level."""
    script = (
        "import logging\n"
        "from logpose.config import Settings\n"
        "from logpose.logsetup import configure_logging\n"
        "configure_logging(Settings(log_levels=(('logpose.dns', 'DEBUG'),), access_log=False))\n"
        "first = (logging.getLogger('logpose.dns').getEffectiveLevel(), logging.getLogger('logpose.access').disabled)\n"
        "configure_logging(Settings(log_level='WARNING'))\n"
        "second = (logging.getLogger('logpose.dns').getEffectiveLevel(), logging.getLogger('logpose.access').disabled)\n"
        "print(first, second, len(logging.getLogger().handlers))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)

    assert result.stdout.split("\n")[0] == "(10, True) (30, False) 1", result.stderr


# ----- a real server ------------------------------------------------------------------


def dns_query(server, name: str) -> None:
    dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=server.dns_port, timeout=2)


def stopped_log(server) -> list[str]:
    assert server.stop() == 0, server.log()
    return server.log().splitlines()


def test_server_json_lines_with_access_log(server_factory):
    server = server_factory(extra_args=["--log-format", "json"])
    httpx.get(server.url + "/healthz", timeout=5)
    dns_query(server, "quiet.logpose.internal")

    documents = [json.loads(line) for line in stopped_log(server)]

    for document in documents:
        assert {"time", "level", "logger", "message"} <= set(document), document
        assert JSON_TIME.match(document["time"])
    loggers = {document["logger"] for document in documents}
    assert {"logpose.server", "logpose.store", "logpose.access"} <= loggers
    assert any("GET /healthz" in document["message"] for document in documents if document["logger"] == "logpose.access")
    # DNS queries are logged only at DEBUG.
    assert not any("quiet.logpose.internal" in document["message"] for document in documents)


def test_server_logger_levels_and_no_access_log(server_factory):
    server = server_factory(
        extra_args=["--no-access-log"], environment={"LOGPOSE_LOG_LEVELS": "logpose.dns=DEBUG"}
    )
    httpx.get(server.url + "/healthz", timeout=5)
    dns_query(server, "loud.logpose.internal")

    lines = stopped_log(server)

    assert not [line for line in lines if " logpose.access: " in line]
    assert [line for line in lines if " DEBUG logpose.dns: " in line and "loud.logpose.internal" in line]
    assert not [line for line in lines if " DEBUG logpose.store: " in line]  # other loggers stay at INFO
    assert all(TIME_STAMP.match(line) for line in lines if " logpose." in line)


def test_server_under_journald_omits_time_stamps(server_factory, tmp_path):
    log_path = tmp_path / "data-server.log"  # where the fixture sends the server's stderr
    log_path.touch()
    status = os.stat(log_path)

    server = server_factory(environment={"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"})
    lines = [line for line in stopped_log(server) if " logpose." in line]

    assert lines
    assert any(line.startswith("INFO logpose.server: LogPose ready") for line in lines)
    assert not [line for line in lines if TIME_STAMP.match(line)]
