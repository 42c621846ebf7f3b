"""Log output of the server: one stderr handler, its format and the logger levels.

``configure_logging`` runs once at start and again on SIGHUP, so every setting
here can change while the server runs.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import TextIO

from logpose.config import Settings
from logpose.log import access_log

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# journald stamps every line it receives, so a second time stamp would only repeat it.
JOURNAL_TEXT_FORMAT = "%(levelname)s %(name)s: %(message)s"

_handler: logging.Handler | None = None
_logger_levels: tuple[tuple[str, str], ...] = ()


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object on one line.

    The keys are ``time`` (RFC 3339, UTC, milliseconds), ``level``, ``logger``
    and ``message``, plus ``exception`` with the traceback text when the
    record carries one.
    """

    def format(self, record: logging.LogRecord) -> str:
        seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        document = {
            "time": f"{seconds}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            document["exception"] = record.exc_text
        if record.stack_info:
            document["stack"] = self.formatStack(record.stack_info)
        return json.dumps(document, ensure_ascii=False)


def stderr_is_journal(environ: Mapping[str, str] | None = None, stream: TextIO | None = None) -> bool:
    """Return whether stderr is connected to journald.

    systemd sets ``$JOURNAL_STREAM`` to the device and inode numbers of the
    journal stream it connects. As systemd.exec(5) advises, they are compared
    with stderr's, so a child process whose stderr was redirected elsewhere
    keeps its time stamps.
    """
    environ = os.environ if environ is None else environ
    stream = sys.stderr if stream is None else stream
    device, sep, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    if not sep or not device.isdigit() or not inode.isdigit():
        return False
    try:
        status = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (status.st_dev, status.st_ino) == (int(device), int(inode))


def build_formatter(log_format: str, *, journal: bool) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter()
    return logging.Formatter(JOURNAL_TEXT_FORMAT if journal else TEXT_FORMAT)


def configure_logging(settings: Settings | None = None) -> None:
    """Send logs to stderr in the configured format and set every logger's level.

    Without ``settings``, as before the settings are read, the defaults apply.
    The root logger takes ``log_level``, and each logger named in
    ``log_levels`` takes its own level. A logger that an earlier call named
    but this one does not goes back to the root's level.
    """
    global _handler, _logger_levels
    settings = settings or Settings()
    root = logging.getLogger()
    if _handler is None:
        _handler = logging.StreamHandler(sys.stderr)
        root.addHandler(_handler)
    _handler.setFormatter(build_formatter(settings.log_format, journal=stderr_is_journal()))
    root.setLevel(settings.log_level)

    for name, _level in _logger_levels:
        logging.getLogger(name).setLevel(logging.NOTSET)
    for name, level in settings.log_levels:
        logging.getLogger(name).setLevel(level)
    _logger_levels = settings.log_levels

    # The logger stays attached to the HTTP server and is disabled instead, so
    # SIGHUP can turn the access log back on. aiohttp checks it before formatting.
    access_log.disabled = not settings.access_log
