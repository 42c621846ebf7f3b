"""Service manager notifications over the sd_notify(3) datagram protocol.

systemd starts a ``Type=notify`` service with ``$NOTIFY_SOCKET`` naming a Unix
datagram socket: a path, or an abstract socket written with a leading ``@``.
The service sends newline-separated ``KEY=VALUE`` assignments to it
(``READY=1``, ``STOPPING=1``, ``WATCHDOG=1``, ``STATUS=...``). Without the
variable, as when the server is run by hand, every call does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

from logpose.log import server_log

SEND_TIMEOUT = 1.0  # seconds; a full receive queue must not stall the event loop for long


class SystemdNotifier:
    """Sends state changes, and watchdog keep-alives, to the service manager.

    A failed send is logged and never raised: a lost notification must not stop
    a server that is otherwise working.
    """

    def __init__(self, address: str | None, watchdog_timeout: float | None = None) -> None:
        """``address`` is ``$NOTIFY_SOCKET`` as systemd sets it; ``watchdog_timeout`` is in seconds."""
        self._address = _socket_address(address) if address else None
        self.watchdog_timeout = watchdog_timeout if self._address else None
        self._failures = 0

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> SystemdNotifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` as sd_watchdog_enabled(3) does."""
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET") or None
        if address is not None and not address.startswith(("/", "@")):
            server_log.warning("NOTIFY_SOCKET=%s is not a Unix socket path or @name; systemd notifications are off", address)
            address = None
        notifier = cls(address, _watchdog_timeout(environ))
        if notifier.enabled:
            server_log.info(
                "systemd notifications go to %s%s", address,
                f", watchdog keep-alive every {notifier.watchdog_timeout / 2:g} s" if notifier.watchdog_timeout else "",
            )
        return notifier

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram; return whether it was sent."""
        if self._address is None:
            return False
        message = "\n".join(assignments).encode()
        # A new socket per message, as libsystemd's sd_notify does: notifications
        # are rare, and no socket stays open to leak into a fork.
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify_socket:
                notify_socket.settimeout(SEND_TIMEOUT)
                notify_socket.sendto(message, self._address)
        except OSError as exc:
            self._failures += 1
            # Log the first failure at WARNING and repeats at DEBUG, so a socket
            # that went away does not flood the journal with watchdog failures.
            server_log.log(
                logging.WARNING if self._failures == 1 else logging.DEBUG,
                "Sending %s to the service manager failed (%d failure(s) so far): %s",
                ", ".join(assignments), self._failures, exc,
            )
            return False
        return True

    def ready(self, status: str) -> bool:
        """Tell systemd the server is serving: units ordered after it may start now."""
        return self.notify("READY=1", f"STATUS={status}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1", "STATUS=Shutting down")

    async def run_watchdog(self) -> None:
        """Send ``WATCHDOG=1`` every half watchdog timeout until cancelled; return at once without one.

        The keep-alive runs on the event loop, so a loop blocked for longer than
        the timeout misses it and systemd restarts the server, as intended.
        """
        if self.watchdog_timeout is None:
            return
        interval = self.watchdog_timeout / 2
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(interval)


def _socket_address(address: str) -> str:
    # An abstract socket name starts with a NUL byte; systemd writes it as '@'.
    return "\0" + address[1:] if address.startswith("@") else address


def _watchdog_timeout(environ: Mapping[str, str]) -> float | None:
    """Return WATCHDOG_USEC in seconds when it is meant for this process, else None."""
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec:
        return None
    if not usec.isdigit() or int(usec) == 0:
        server_log.warning("WATCHDOG_USEC=%s is not a positive number of microseconds; the watchdog keep-alive is off", usec)
        return None
    # systemd sets WATCHDOG_PID to the main process, so a child that inherited
    # the environment does not send keep-alives in its place.
    pid = environ.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1_000_000
