"""The control connection of a node on PostgreSQL: LISTEN for changes and hold
the prober's advisory lock.

Both live on one dedicated asyncpg connection outside the SQLAlchemy pool. When
it is lost the node gives up the lock (PostgreSQL releases it with the session)
and catches up from the change log after reconnecting.
"""

from __future__ import annotations

import asyncio
from typing import Callable

import asyncpg
from sqlalchemy.engine import make_url

from logpose.log import store_log
from logpose.store.sql import NOTIFY_CHANNEL

# pg_advisory_lock key of the node that probes; any constant that other
# applications on the same database are unlikely to use.
PROBER_LOCK_KEY = 0x4C6F67506F7365  # "LogPose" in ASCII
CONNECT_TIMEOUT = 5.0  # seconds
LIVENESS_TIMEOUT = 5.0  # seconds for the keep-alive query


class ControlChannel:
    """Run LISTEN and leader election for one node until cancelled.

    ``on_notify`` is called for every change notice and after each (re)connect;
    ``on_leadership`` with True when this node takes the prober lock and False
    when it loses it. Both run on the event loop and must not block.
    """

    def __init__(
        self,
        url: str,
        *,
        node_id: str,
        on_notify: Callable[[], None],
        on_leadership: Callable[[bool], None],
        period: float,
    ) -> None:
        self._dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        self._safe_url = make_url(url).render_as_string(hide_password=True)
        self._node_id = node_id
        self._on_notify = on_notify
        self._on_leadership = on_leadership
        self._period = period
        self.leader = False
        self.connected = False
        self._stopping = False

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                connection = await asyncpg.connect(self._dsn, timeout=CONNECT_TIMEOUT)
            except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as exc:
                if failures == 0:
                    store_log.warning("Control connection to %s failed, retrying every %.3g s: %s",
                                      self._safe_url, self._period, exc)
                failures += 1
                await asyncio.sleep(self._period)
                continue
            if failures:
                store_log.info("Control connection to %s restored after %d failed attempt(s)", self._safe_url, failures)
            failures = 0
            try:
                await self._serve(connection)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncio.TimeoutError) as exc:
                store_log.warning("Control connection to %s lost: %s", self._safe_url, exc or type(exc).__name__)
            except asyncio.CancelledError:
                self._stopping = True  # a planned shutdown, not a fault
                raise
            finally:
                self.connected = False
                self._set_leader(False)
                connection.terminate()

    async def _serve(self, connection: asyncpg.Connection) -> None:
        await connection.add_listener(NOTIFY_CHANNEL, lambda *_arguments: self._on_notify())
        self.connected = True
        # Notices sent while disconnected are gone: catch up from the change log.
        self._on_notify()
        while True:
            if not self.leader:
                acquired = await asyncio.wait_for(
                    connection.fetchval("SELECT pg_try_advisory_lock($1)", PROBER_LOCK_KEY), LIVENESS_TIMEOUT
                )
                if acquired:
                    self._set_leader(True)
            else:
                await asyncio.wait_for(connection.fetchval("SELECT 1"), LIVENESS_TIMEOUT)
            await asyncio.sleep(self._period)

    def _set_leader(self, leader: bool) -> None:
        if leader == self.leader:
            return
        self.leader = leader
        if leader:
            store_log.info("Node %s took the prober lock: it probes every instance now", self._node_id)
        elif self._stopping:
            store_log.info("Node %s released the prober lock on shutdown", self._node_id)
        else:
            store_log.warning("Node %s lost the prober lock with its control connection", self._node_id)
        self._on_leadership(leader)
