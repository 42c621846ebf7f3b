"""Waiting for HTTP requests in flight before the HTTP server closes its connections.

Once aiohttp starts closing connections (``AppRunner.cleanup``), it ignores
bytes that arrive on them, so a request whose body is still on its way would
never complete. Shutdown therefore stops the listeners first, waits here until
no request is in flight, and only then lets aiohttp close the connections.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from logpose.api.problems import Handler


class RequestDrain:
    """Counts the HTTP requests in flight through an aiohttp middleware."""

    def __init__(self) -> None:
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.in_flight += 1
        self._idle.clear()
        try:
            return await handler(request)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; return False when ``timeout`` seconds passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True
