"""DNS over UDP and TCP (RFC 1035 §4.2, RFC 7766) in front of a ``Responder``."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
from typing import Any, cast

from logpose.errors import ConfigError
from logpose.log import dns_log
from logpose.nameserver.answer import ForwardedQuery, Responder
from logpose.nameserver.forward import format_address
from logpose.nameserver.limits import ResponseRateLimiter
from logpose.nameserver.throttle import LogThrottle

# Tries at binding TCP to the port the kernel picked for UDP when port 0 was asked. UDP
# ports come from the same range as the local ports of outgoing TCP connections, so on a
# busy host several picks in a row can be taken for TCP.
PORT_PICK_ATTEMPTS = 20
MAX_RATE_LIMIT = 1_000_000  # responses per second and source
_RATE_LIMIT_LOG_INTERVAL = 10.0  # seconds between two log lines about dropped responses


class DnsServer:
    """UDP and TCP listeners on each (host, port) that pass every query to ``responder``.

    Hosts must be IP addresses. Port 0 picks a free port and gives UDP and TCP the same
    one on that host. An IPv6 listener accepts IPv6 only (IPV6_V6ONLY), so IPv4 needs its
    own address. A TCP connection may carry many queries, answered in order; it is closed
    after ``tcp_idle_timeout`` seconds without a complete query or when the client stops
    reading. Above ``max_tcp_connections`` open connections a new one is closed at once.
    With ``rate_limit`` above 0, each source address gets at most that many UDP responses
    per second, and the queries over it get no response at all (see ``ResponseRateLimiter``).
    With ``reuse_port``, every socket is bound with SO_REUSEPORT, so other processes of
    the same user can bind the same addresses and the kernel spreads clients over all
    of them (see ``logpose.nameserver.workers``).
    """

    def __init__(
        self,
        responder: Responder,
        listen: list[tuple[str, int]],
        *,
        tcp_idle_timeout: float = 10.0,
        max_tcp_connections: int = 256,
        rate_limit: int = 0,
        reuse_port: bool = False,
    ) -> None:
        if not listen:
            raise ConfigError("dns_listen must name at least one host:port")
        for host, port in listen:
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise ConfigError(f"dns_listen host {host!r} must be an IPv4 or IPv6 address") from None
            if not 0 <= port <= 65535:
                raise ConfigError(f"dns_listen port {port} of {host} must be from 0 to 65535")
        if tcp_idle_timeout <= 0:
            raise ConfigError(f"tcp_idle_timeout must be more than 0 seconds, got {tcp_idle_timeout}")
        if max_tcp_connections < 1:
            raise ConfigError(f"max_tcp_connections must be at least 1, got {max_tcp_connections}")
        if isinstance(rate_limit, bool) or not isinstance(rate_limit, int) or not 0 <= rate_limit <= MAX_RATE_LIMIT:
            raise ConfigError(
                f"rate_limit must be a whole number of responses per second from 0 (off) to {MAX_RATE_LIMIT}, "
                f"got {rate_limit!r}"
            )
        self._responder = responder
        self._listen = list(listen)
        self._tcp_idle_timeout = tcp_idle_timeout
        self._max_tcp_connections = max_tcp_connections
        self._udp_transports: list[asyncio.DatagramTransport] = []
        self._tcp_servers: list[asyncio.Server] = []
        # Strong references to the running connection handlers, so close() can cancel them.
        self._connections: set[asyncio.Task[Any]] = set()
        self._forwards: set[asyncio.Task[None]] = set()  # UDP queries waiting on the recursors
        self._rate_limiter = ResponseRateLimiter(rate_limit) if rate_limit else None
        self._rate_limit_log = LogThrottle(_RATE_LIMIT_LOG_INTERVAL)
        self._rejected_connections = 0
        self._reuse_port = reuse_port
        self.bound_addresses: list[tuple[str, int]] = []

    def set_rate_limit(self, rate_limit: int) -> None:
        """Limit UDP responses to ``rate_limit`` per second and source from now on; 0 turns the limit off."""
        self._rate_limiter = ResponseRateLimiter(rate_limit) if rate_limit else None

    async def start(self) -> None:
        """Bind UDP and TCP on every listen address, or close what was bound and raise OSError.

        The OSError's ``strerror`` is a whole sentence that names the protocol and address.
        """
        if self.bound_addresses:
            raise RuntimeError("DnsServer.start() was already called; call close() first")
        try:
            for host, port in self._listen:
                await self._bind(host, port)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop listening, close open TCP connections and wait for their handlers to end."""
        for transport in self._udp_transports:
            transport.close()
        for server in self._tcp_servers:
            server.close()
        for task in list(self._connections) + list(self._forwards):
            task.cancel()
        if self._connections or self._forwards:
            await asyncio.gather(*self._connections, *self._forwards, return_exceptions=True)
        for server in self._tcp_servers:
            await server.wait_closed()
        self._udp_transports.clear()
        self._tcp_servers.clear()
        self.bound_addresses.clear()

    # ----- binding --------------------------------------------------------

    async def _bind(self, host: str, port: int) -> None:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        attempts = PORT_PICK_ATTEMPTS if port == 0 else 1
        for attempt in range(1, attempts + 1):
            udp_socket = _bound_socket(family, socket.SOCK_DGRAM, host, port, self._reuse_port)
            bound_port = udp_socket.getsockname()[1]
            try:
                tcp_socket = _bound_socket(family, socket.SOCK_STREAM, host, bound_port, self._reuse_port)
            except OSError as exc:
                udp_socket.close()
                if port != 0 or exc.errno != errno.EADDRINUSE or attempt == attempts:
                    raise
                dns_log.info("TCP port %d on %s is taken, picking another port for UDP and TCP", bound_port, host)
                continue
            break

        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_datagram_endpoint(lambda: _UdpProtocol(self), sock=udp_socket)
        except BaseException as exc:
            udp_socket.close()
            tcp_socket.close()
            if isinstance(exc, OSError):
                raise _listen_error(exc, "UDP", host, bound_port) from exc
            raise
        self._udp_transports.append(transport)
        try:
            server = await asyncio.start_server(self._accept, sock=tcp_socket)
        except BaseException as exc:
            tcp_socket.close()
            if isinstance(exc, OSError):
                raise _listen_error(exc, "TCP", host, bound_port) from exc
            raise
        self._tcp_servers.append(server)

        self.bound_addresses.append((host, bound_port))
        address = _format_peer((host, bound_port))
        dns_log.info("DNS listening on udp %s", address)
        dns_log.info("DNS listening on tcp %s", address)

    # ----- TCP ------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _format_peer(writer.get_extra_info("peername"))
        if len(self._connections) >= self._max_tcp_connections:
            # Logged when the limit is first reached, then as a count when it clears,
            # so a flood of connections does not flood the log.
            if self._rejected_connections == 0:
                dns_log.warning(
                    "Rejected TCP connection from %s: the limit of %d open connections is reached",
                    peer, self._max_tcp_connections,
                )
            self._rejected_connections += 1
            writer.close()
            return
        if self._rejected_connections:
            dns_log.warning("Rejected %d TCP connection(s) at the connection limit", self._rejected_connections)
            self._rejected_connections = 0

        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._serve_connection(reader, writer, peer)
        except asyncio.CancelledError:
            # close() cancels the handler. Ending it normally keeps asyncio (3.11) from
            # logging the cancellation as an unhandled error of the connection callback.
            pass
        except Exception:
            dns_log.exception("TCP connection from %s failed", peer)
        finally:
            self._connections.discard(task)
            writer.close()

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
        # Each message has a 2-byte length prefix (RFC 1035 §4.2.2). Queries are answered
        # one after another, which RFC 7766 §6.2.1.1 allows for pipelined queries.
        timeout = self._tcp_idle_timeout
        address = writer.get_extra_info("peername")
        while True:
            try:
                prefix = await asyncio.wait_for(reader.readexactly(2), timeout)
                message = await asyncio.wait_for(reader.readexactly(int.from_bytes(prefix, "big")), timeout)
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    dns_log.debug("TCP connection from %s closed in the middle of a message", peer)
                return
            except TimeoutError:
                dns_log.debug("Closed TCP connection from %s after %.1f s without a query", peer, timeout)
                return
            except OSError as exc:
                dns_log.debug("TCP connection from %s failed while reading: %s", peer, exc)
                return

            reply = self._respond(message, "tcp", address)
            if isinstance(reply, ForwardedQuery):
                # Later queries on this connection wait: answers go out in order.
                reply = await self._responder.forward(reply)
            if reply is None:
                # A message without a full header gets no response, and the stream may
                # be out of step, so the connection ends.
                dns_log.debug("Closed TCP connection from %s after a message that got no answer", peer)
                return
            try:
                writer.write(len(reply).to_bytes(2, "big") + reply)
                await asyncio.wait_for(writer.drain(), timeout)
            except TimeoutError:
                dns_log.debug("Closed TCP connection from %s: it read no answer for %.1f s", peer, timeout)
                return
            except OSError as exc:
                dns_log.debug("TCP connection from %s failed while writing: %s", peer, exc)
                return


    def _respond(self, wire: bytes, transport: str, address: Any) -> bytes | ForwardedQuery | None:
        """Return the response to ``wire`` from the client at ``address``: the cached one if any, else the full path."""
        source = address[0]
        # A cached response needs no peer name, which only log lines use, and at
        # DEBUG respond() writes the line that each query gets.
        if not dns_log.isEnabledFor(logging.DEBUG):
            reply = self._responder.respond_cached(wire, transport, source)
            if reply is not None:
                return reply
        return self._responder.respond(wire, transport, _format_peer(address), source)

    # ----- UDP ------------------------------------------------------------

    def _udp_allowed(self, source: str) -> bool:
        """Return False when ``source`` is over its response rate, logging that at most once per interval.

        The caller checks first that a rate limit is set.
        """
        assert self._rate_limiter is not None
        if self._rate_limiter.allow(source):
            return True
        held_back = self._rate_limit_log.ready()
        if held_back is not None:
            dns_log.warning(
                "Dropped a UDP query from %s over the rate limit; %d more dropped since the last message",
                source, held_back,
            )
        return False

    def _forward_udp(self, query: ForwardedQuery, transport: asyncio.DatagramTransport, addr: Any) -> None:
        async def forward() -> None:
            reply = await self._responder.forward(query)
            if not transport.is_closing():
                transport.sendto(reply, addr)

        task = asyncio.get_running_loop().create_task(forward())
        self._forwards.add(task)
        task.add_done_callback(self._forward_done)

    def _forward_done(self, task: asyncio.Task[None]) -> None:
        self._forwards.discard(task)
        if not task.cancelled() and task.exception() is not None:
            dns_log.error("Forwarding a UDP query failed", exc_info=task.exception())


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self._server = server
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's UDP transport does not subclass DatagramTransport, so no isinstance check.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        server = self._server
        if server._rate_limiter is not None and not server._udp_allowed(addr[0]):
            return
        try:
            reply = server._respond(data, "udp", addr)
        except Exception:
            # respond() handles bad input itself, so this is a bug. One datagram must
            # not stop the listener.
            dns_log.exception("Failed to respond to a UDP message from %s", _format_peer(addr))
            return
        if reply is None or self._transport is None:
            return
        if isinstance(reply, ForwardedQuery):
            self._server._forward_udp(reply, self._transport, addr)
        else:
            self._transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        # Mostly ICMP port unreachable for an answer to a client that already left.
        if dns_log.isEnabledFor(logging.DEBUG):
            dns_log.debug("UDP socket error: %s", exc)


def _bound_socket(
    family: socket.AddressFamily, kind: socket.SocketKind, host: str, port: int, reuse_port: bool = False
) -> socket.socket:
    """Return a non-blocking socket bound to (host, port), or raise OSError naming the address."""
    sock = socket.socket(family, kind)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == socket.SOCK_STREAM:
            # Lets a restarted server bind while old connections sit in TIME_WAIT. Not set
            # for UDP, where it would let a second process share the port.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise _listen_error(exc, "UDP" if kind == socket.SOCK_DGRAM else "TCP", host, port) from exc
    return sock


def _listen_error(exc: OSError, protocol: str, host: str, port: int) -> OSError:
    """Return an OSError whose ``strerror`` names the protocol and address that could not be bound, and why."""
    reason = exc.strerror or str(exc)
    if exc.errno == errno.EACCES and port < 1024:
        reason += " (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    return OSError(exc.errno, f"cannot listen for DNS over {protocol} on {format_address(host, port)}: {reason}")


def _format_peer(address: Any) -> str:
    if not isinstance(address, tuple) or len(address) < 2:
        return str(address)
    return format_address(str(address[0]), address[1])
