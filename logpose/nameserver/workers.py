"""DNS worker processes: more processes answering on the server's DNS ports.

With ``dns_workers`` above 1 the server starts that many minus one workers, each
``python -m logpose.nameserver.workers``. Every process, the server included,
binds each DNS address with SO_REUSEPORT, and the kernel spreads the clients
over them by their address and port, so DNS uses more than one core.

A worker keeps a read-only copy of the catalog in a ``Registry`` without a store.
The server writes to the worker's stdin: the start settings, the whole catalog,
then every change as the registry applies it. A change travels as the current
rows of what it touched, and the worker applies them in order with
``Registry.apply_records``, as the cluster change feed does. The worker writes
to its stdout that it is ready, the number of each change message it applied,
and once a second its DNS response counts, which the server adds to its
metrics. Both directions carry length-prefixed pickles between processes of one
installation.

The response to an HTTP write goes out only once every worker applied the write
(``wait_applied``). So a client that changed the catalog gets the change in its
next DNS response, whichever process sends it.

A worker ends with exit code 0 when its stdin closes (the server stopped, or
was killed) or on SIGTERM or SIGINT, as when systemd stops the whole unit. The
server starts again a worker that ends any other way: a crash, or SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import signal
import struct
import sys
from dataclasses import dataclass
from typing import Any

from logpose.config import Settings
from logpose.log import dns_log
from logpose.logsetup import configure_logging
from logpose.metrics import DnsTally
from logpose.nameserver.answer import Responder
from logpose.nameserver.throttle import LogThrottle
from logpose.nameserver.transport import DnsServer
from logpose.nameserver.zone import ZoneSettings
from logpose.registry import CatalogSnapshot, Change, ChangeRecord, Registry

READY_TIMEOUT = 60.0  # seconds for a worker to load the catalog and bind
RESTART_DELAY = 1.0  # seconds before a worker that ended is started again
MAX_RESTART_DELAY = 30.0  # seconds between attempts at most, for a worker that keeps failing to start
STOP_TIMEOUT = 5.0  # seconds for a worker to exit after its stdin closes
APPLY_TIMEOUT = 1.0  # seconds an HTTP write waits for the workers to apply it
TALLY_PERIOD = 1.0  # seconds between two reports of a worker's response counts
_FRAME_HEADER = struct.Struct("!I")  # length of the pickle that follows, in bytes
_SLOW_LOG_INTERVAL = 10.0  # seconds between two log lines about workers slow to apply


@dataclass(frozen=True, slots=True)
class WorkerStart:
    """The settings a worker needs before the catalog: listen addresses, zone, rate limit and logging."""

    number: int
    zone: ZoneSettings
    listen: tuple[tuple[str, int], ...]  # the bound addresses, so port 0 became a real port
    rate_limit: int
    logging: Settings  # only the log_* fields are read


def log_settings(settings: Settings) -> Settings:
    """Return the settings a worker logs with: the log fields of ``settings``, defaults elsewhere (no secrets)."""
    return Settings(log_level=settings.log_level, log_levels=settings.log_levels, log_format=settings.log_format)


def encode_frame(message: Any) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _FRAME_HEADER.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """Return the next message, or None at the end of the stream."""
    try:
        header = await reader.readexactly(_FRAME_HEADER.size)
        return pickle.loads(await reader.readexactly(_FRAME_HEADER.unpack(header)[0]))
    except asyncio.IncompleteReadError:
        return None


# ----- the server's side -------------------------------------------------


class DnsWorkers:
    """Starts ``count`` worker processes, feeds them the catalog, and restarts any that end.

    ``listen`` are the addresses the server's own ``DnsServer`` bound, with
    ``reuse_port`` set. Response counts the workers report go to ``tally``.
    """

    def __init__(
        self,
        registry: Registry,
        count: int,
        *,
        zone: ZoneSettings,
        listen: list[tuple[str, int]],
        rate_limit: int,
        settings: Settings,
        tally: DnsTally | None = None,
    ) -> None:
        self._registry = registry
        self._count = count
        self._zone = zone
        self._listen = tuple(listen)
        self._rate_limit = rate_limit
        self._logging = log_settings(settings)
        self._tally = tally
        self._workers: dict[int, _Worker] = {}
        self._restarts: set[asyncio.Task[None]] = set()  # strong references until they end
        self._unsubscribe: Any = None
        self._closing = False
        self._sent = 0  # number of the last change message sent
        self._progress = asyncio.Event()  # set whenever a worker reports or ends
        self._slow_log = LogThrottle(_SLOW_LOG_INTERVAL)

    @property
    def pids(self) -> list[int]:
        """Process ids of the running workers."""
        return [worker.process.pid for worker in self._workers.values() if worker.process is not None]

    async def start(self) -> None:
        """Start every worker and wait until each is ready; raise OSError naming the first that fails."""
        # Subscribed first: a change applied while a worker starts reaches it after its snapshot.
        self._unsubscribe = self._registry.subscribe(self._on_change)
        try:
            await asyncio.gather(*(self._start_worker(number) for number in range(1, self._count + 1)))
        except BaseException:
            await self.close()
            raise

    async def wait_applied(self, timeout: float = APPLY_TIMEOUT) -> bool:
        """Wait until every running worker applied the changes sent so far; False after ``timeout`` seconds.

        A worker being started again is not waited for: it starts from the catalog as it is then.
        """
        target = self._sent
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while any(worker.applied < target for worker in self._workers.values() if worker.running):
            remaining = deadline - loop.time()
            if remaining <= 0:
                held_back = self._slow_log.ready()
                if held_back is not None:
                    dns_log.warning(
                        "DNS workers did not apply change message %d within %.1f s; answering the write anyway "
                        "(%d more such waits since the last message)", target, timeout, held_back,
                    )
                return False
            # No await between the check above and this clear, so no report is missed.
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), remaining)
        return True

    def update_settings(self, zone: ZoneSettings) -> None:
        self._zone = zone
        self._send(("zone", zone))

    def set_rate_limit(self, rate_limit: int) -> None:
        self._rate_limit = rate_limit
        self._send(("rate_limit", rate_limit))

    def configure_logging(self, settings: Settings) -> None:
        self._logging = log_settings(settings)
        self._send(("logging", self._logging))

    async def close(self) -> None:
        """Stop every worker: close its stdin, wait, then kill one that has not exited."""
        self._closing = True
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        for task in list(self._restarts):
            task.cancel()
        workers = list(self._workers.values())
        self._workers.clear()
        await asyncio.gather(*(worker.stop() for worker in workers))

    async def _start_worker(self, number: int) -> None:
        worker = _Worker(number, self)
        self._workers[number] = worker
        await worker.start(
            WorkerStart(number, self._zone, self._listen, self._rate_limit, self._logging), self._snapshot(), self._sent
        )

    def _snapshot(self) -> CatalogSnapshot:
        registry = self._registry
        return CatalogSnapshot(services=registry.services(), instances=registry.instances(), index=registry.index)

    def _on_change(self, change: Change) -> None:
        self._sent += 1
        if not change.service:
            # The whole catalog was swapped (a reload after the feed fell behind).
            self._send(("snapshot", self._snapshot(), self._sent))
            return
        registry = self._registry
        record = ChangeRecord(change.index, change.kind.value, change.service, change.instance_id)
        service = registry.get_service(change.service)
        instance = registry.get_instance(change.instance_id) if change.instance_id else None
        self._send((
            "changes",
            [record],
            {service.code: service} if service is not None else {},
            {instance.id: instance} if instance is not None else {},
            self._sent,
        ))

    def _send(self, message: Any) -> None:
        if not self._workers:
            return
        frame = encode_frame(message)
        for worker in self._workers.values():
            worker.send(frame)

    def _worker_ended(self, worker: _Worker, returncode: int | None) -> None:
        if self._closing or self._workers.get(worker.number) is not worker:
            return
        if returncode == 0:
            # Stopped on purpose, by a signal to it or to the whole service.
            del self._workers[worker.number]
            dns_log.info(
                "DNS worker %d (pid %s) stopped; %d of %d DNS processes remain until a restart",
                worker.number, worker.pid, len(self._workers) + 1, self._count + 1,
            )
            return
        dns_log.error(
            "DNS worker %d (pid %s) %s; starting it again in %.0f s",
            worker.number, worker.pid, _describe_exit(returncode), RESTART_DELAY,
        )
        del self._workers[worker.number]
        task = asyncio.get_running_loop().create_task(self._restart(worker.number), name=f"dns-worker-{worker.number}")
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def _restart(self, number: int) -> None:
        delay = RESTART_DELAY
        while True:
            await asyncio.sleep(delay)
            if self._closing or number in self._workers:
                return
            try:
                await self._start_worker(number)
                return
            except OSError as exc:
                self._workers.pop(number, None)
                delay = min(delay * 2, MAX_RESTART_DELAY)
                dns_log.error(
                    "DNS worker %d could not start again, next attempt in %.0f s: %s", number, delay, exc.strerror or exc
                )


class _Worker:
    """One worker process, from the server's side."""

    def __init__(self, number: int, owner: DnsWorkers) -> None:
        self.number = number
        self.running = False  # started and not ended
        self.applied = 0  # number of the last change message it applied
        self.process: asyncio.subprocess.Process | None = None
        self._owner = owner
        self._reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    async def start(self, start: WorkerStart, snapshot: CatalogSnapshot, sent: int) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "logpose.nameserver.workers",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        self.send(encode_frame(("start", start)))
        self.send(encode_frame(("snapshot", snapshot, sent)))
        assert self.process.stdout is not None
        try:
            ready = await asyncio.wait_for(read_frame(self.process.stdout), READY_TIMEOUT)
        except TimeoutError:
            ready = None
        if not (isinstance(ready, tuple) and ready[0] == "ready"):
            await self.stop()
            raise OSError(f"DNS worker {self.number} did not start (exit code {self.process.returncode}); see its log lines above")
        dns_log.info("DNS worker %d started, pid %d, %d instance(s)", self.number, self.process.pid, len(snapshot.instances))
        self.applied = sent
        self.running = True
        self._reader = asyncio.get_running_loop().create_task(self._read_reports(), name=f"dns-worker-{self.number}")

    def send(self, frame: bytes) -> None:
        process = self.process
        if process is None or process.stdin is None or process.stdin.is_closing():
            return
        # NOTE: not awaited (drain); a worker that stops reading grows this buffer
        # until it is restarted. Workers read in their own loop and only apply rows.
        process.stdin.write(frame)

    async def stop(self) -> None:
        process = self.process
        if process is None:
            return
        if process.stdin is not None and not process.stdin.is_closing():
            process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
        except TimeoutError:
            dns_log.warning("DNS worker %d (pid %d) did not exit within %.0f s; killing it", self.number, process.pid, STOP_TIMEOUT)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def _read_reports(self) -> None:
        process = self.process
        assert process is not None and process.stdout is not None
        owner = self._owner
        while True:
            message = await read_frame(process.stdout)
            if message is None:
                break
            if message[0] == "applied":
                self.applied = message[1]
                owner._progress.set()
            elif message[0] == "tally" and owner._tally is not None:
                owner._tally.merge(*message[1:])
        self.running = False
        owner._progress.set()  # a write waiting for this worker waits no more
        owner._worker_ended(self, await process.wait())


def _describe_exit(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "an unknown signal"
        return f"was killed by signal {-returncode} ({name})"
    return f"exited with code {returncode}"


# ----- the worker's side -------------------------------------------------


async def run_worker() -> int:
    """Serve DNS from the catalog fed on stdin until it closes or a signal arrives; return the exit code."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, sys.stdout.buffer)
    writer = asyncio.StreamWriter(transport, protocol, None, loop)

    stop = asyncio.Event()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop.set)
    # The server reloads the settings and sends them on; a SIGHUP sent to the whole group must not end a worker.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    message = await read_frame(reader)
    if not (isinstance(message, tuple) and message[0] == "start"):
        print("logpose DNS worker: expected the start message on stdin; this program is started by logpose-server",
              file=sys.stderr)
        return 2
    start: WorkerStart = message[1]
    configure_logging(start.logging)
    snapshot = await read_frame(reader)
    if snapshot is None:
        return 0

    registry = Registry(None)
    registry.load_snapshot(snapshot[1])
    applied = snapshot[2]
    tally = DnsTally()
    responder = Responder(registry, start.zone)
    responder.observe = tally.observe
    server = DnsServer(responder, list(start.listen), rate_limit=start.rate_limit, reuse_port=True)
    try:
        await server.start()
    except OSError as exc:
        dns_log.error("DNS worker %d: %s", start.number, exc.strerror or exc)
        return 4
    writer.write(encode_frame(("ready", os.getpid())))

    async def report_tally() -> None:
        while True:
            await asyncio.sleep(TALLY_PERIOD)
            counts = tally.take()
            if counts is not None:
                writer.write(encode_frame(("tally", *counts)))

    async def follow() -> None:
        nonlocal applied
        while (message := await read_frame(reader)) is not None:
            kind = message[0]
            if kind == "changes":
                registry.apply_records(*message[1:4])
                applied = message[4]
            elif kind == "snapshot":
                registry.replace_catalog(message[1])
                applied = message[2]
            elif kind == "zone":
                responder.update_settings(message[1])
            elif kind == "rate_limit":
                server.set_rate_limit(message[1])
            elif kind == "logging":
                configure_logging(message[1])
            if kind in ("changes", "snapshot"):
                writer.write(encode_frame(("applied", applied)))

    tasks = [loop.create_task(follow()), loop.create_task(report_tally()), loop.create_task(stop.wait())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await server.close()
    dns_log.debug("DNS worker %d stopped", start.number)
    return 0


def main() -> None:
    # Logs go to stderr, which the server shares with its workers; stdout carries the reports.
    configure_logging()
    try:
        import uvloop
    except ImportError:
        code = asyncio.run(run_worker())
    else:
        code = uvloop.run(run_worker())
    logging.shutdown()
    sys.exit(code)


if __name__ == "__main__":
    main()
