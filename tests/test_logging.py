"""Log output: text or JSON lines, time stamps under journald, per-logger levels, the access log."""

from __future__ import annotations

import asyncio
import io
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
from conftest import wait_until
from logpose.logsetup import BufferedStreamHandler, JsonFormatter, stderr_is_journal

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


def buffered_handler() -> tuple[BufferedStreamHandler, io.StringIO]:
    stream = io.StringIO()
    handler = BufferedStreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    return handler, stream


def named_record(name: str, message: str) -> logging.LogRecord:
    return logging.LogRecord(name, logging.INFO, __file__, 1, message, (), None)


async def wait_for_output(stream: io.StringIO, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if stream.getvalue():
            return
        await asyncio.sleep(0.05)


def test_buffered_handler_holds_access_lines_in_order():
    async def scenario() -> list[str]:
        handler, stream = buffered_handler()
        handler.handle(named_record("logpose.access", "first request"))
        held = stream.getvalue()
        handler.handle(named_record("logpose.server", "shutting down"))
        both = stream.getvalue()
        handler.handle(named_record("logpose.access", "last request"))
        handler.flush()
        return [held, both, stream.getvalue()]

    held, both, flushed = asyncio.run(scenario())

    assert held == ""
    assert both == "logpose.access first request\nlogpose.server shutting down\n"
    assert flushed == both + "logpose.access last request\n"


def test_buffered_handler_writes_held_lines_on_timer():
    async def scenario() -> str:
        handler, stream = buffered_handler()
        handler.handle(named_record("logpose.access", "request"))
        await wait_for_output(stream)
        return stream.getvalue()

    assert asyncio.run(scenario()) == "logpose.access request\n"


def test_buffered_handler_writes_at_once_outside_event_loop():
    handler, stream = buffered_handler()

    handler.handle(named_record("logpose.access", "request"))

    assert stream.getvalue() == "logpose.access request\n"


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


def test_access_log_complete_after_stop(server_factory):
    server = server_factory()
    with httpx.Client(base_url=server.url, timeout=5) as client:
        for number in range(300):
            assert client.get(f"/healthz?request={number}").status_code == 200

    lines = stopped_log(server)

    numbers = [line.split("request=")[1].split(" ")[0] for line in lines if "GET /healthz?request=" in line]
    assert sorted(numbers, key=int) == [str(number) for number in range(300)]


def test_access_line_written_while_running(server_factory):
    server = server_factory()
    assert httpx.get(server.url + "/healthz?running=1", timeout=5).status_code == 200

    written = wait_until(lambda: "GET /healthz?running=1 HTTP/1.1" in server.log(), 10)

    assert written, server.log()
