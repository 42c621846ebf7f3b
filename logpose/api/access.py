"""The HTTP access log: one line per request on ``logpose.access``."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

ACCESS_LINE_FORMAT = '%s "%s %s HTTP/%d.%d" %d %d %.1f ms'


class AccessLogger(AbstractAccessLogger):
    """Log peer, request line, status, body size and duration, formatted lazily.

    aiohttp's own access logger parses a format string and formats a time stamp
    per request. The logging formatter adds the time already, so this one skips
    both. It also makes its record itself and passes it to ``Logger.handle``,
    which skips the stack walk that ``Logger.info`` makes to find the caller's
    file and line, since no LogPose log format shows them.
    """

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        logger = self.logger
        # aiohttp checks ``enabled`` once per connection, and SIGHUP can change the level since.
        if not logger.isEnabledFor(logging.INFO):
            return
        arguments = (
            request.remote,
            request.method,
            request.path_qs,
            request.version.major,
            request.version.minor,
            response.status,
            response.body_length,
            time * 1000,  # aiohttp passes seconds
        )
        record = logger.makeRecord(logger.name, logging.INFO, "(unknown file)", 0, ACCESS_LINE_FORMAT, arguments, None)
        logger.handle(record)

    @property
    def enabled(self) -> bool:
        """Whether a line would be written, checked by aiohttp before it calls ``log``."""
        return self.logger.isEnabledFor(logging.INFO)
