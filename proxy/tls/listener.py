"""The HTTPS listener: the certificate is chosen per connection, before the handshake.

Python's `sni_callback` runs inside OpenSSL's handshake and cannot wait, but a name with
no certificate yet must wait (bounded) for an ACME order. So each accepted socket is
read with MSG_PEEK until OpenSSL itself (a throw-away SSLObject over memory buffers,
aborted from its SNI callback) has found the server name in the ClientHello; nothing is
consumed. Then the manager picks or obtains the context, and the socket is handed to
the event loop with it: the real handshake, then uvicorn's HTTP protocol with the same
edge limits as the plain listener (proxy/edge.py), serving the same ASGI application.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

from proxy.limits import EdgeLimits, Gate, Slot, log_throttle
from proxy.server import EmbeddedServer
from proxy.tls.manager import CertManager

log = logging.getLogger("tenement.tls")

MAX_HELLO = 16 * 1024 + 5  # one TLS record: a ClientHello that needs more is not one
PEEK_RETRY = 0.005  # seconds between peeks while the rest of a ClientHello is in flight


class NotTls(Exception):
    """The client sent something that is not a TLS ClientHello, or closed first."""


def _abort_after_name(ssl_object: Any, server_name: str | None, _: ssl.SSLContext) -> int:
    ssl_object.tenement_server_name = server_name
    return ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE  # stop here: this handshake is a probe


_probe_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
_probe_context.sni_callback = _abort_after_name


class HelloProbe:
    """Feeds a ClientHello's bytes to OpenSSL until it has seen the server name."""

    def __init__(self) -> None:
        self.incoming = ssl.MemoryBIO()
        self.tls = _probe_context.wrap_bio(self.incoming, ssl.MemoryBIO(), server_side=True)

    def feed(self, data: bytes) -> bool:
        """True once the ClientHello is parsed (server_name then holds what it named)."""
        self.incoming.write(data)
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLError:
            if not hasattr(self.tls, "tenement_server_name"):
                raise NotTls("not a TLS ClientHello") from None
        return True

    @property
    def server_name(self) -> str | None:
        return getattr(self.tls, "tenement_server_name", None)


async def readable(conn: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(conn.fileno(), lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(conn.fileno())


async def peek_server_name(conn: socket.socket) -> str | None:
    """The SNI of the ClientHello waiting on `conn`, without consuming a byte."""
    probe, fed = HelloProbe(), 0
    while True:
        await readable(conn)
        data = conn.recv(MAX_HELLO, socket.MSG_PEEK)
        if not data:
            raise NotTls("closed before a ClientHello")
        if len(data) > fed and probe.feed(data[fed:]):
            return probe.server_name
        fed = len(data)
        if fed >= MAX_HELLO:
            raise NotTls("ClientHello too large")
        # Peeked bytes keep the socket readable: pause instead of spinning on them.
        await asyncio.sleep(PEEK_RETRY)


class TlsListener:
    """Accepts on one socket; stands in for asyncio's Server in uvicorn's server list."""

    def __init__(
        self,
        sock: socket.socket,
        protocol_factory: Callable[[], asyncio.Protocol],
        manager: CertManager,
        gate: Gate,
    ) -> None:
        self.sock = sock
        self.protocol_factory = protocol_factory
        self.manager = manager
        # The edge's caps (total, per address, descriptors) for handshakes under way;
        # once one completes, the HTTP protocol's own Gate counts the connection.
        self.gate = gate
        self.hello_timeout = gate.limits.header_timeout
        self.pending: set[asyncio.Task[None]] = set()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.sock.setblocking(False)
        self.task = asyncio.create_task(self.accept_loop(), name="tenement-https-accept")

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        for task in list(self.pending):
            task.cancel()  # handshakes not done yet: nothing of theirs to drain

    async def wait_closed(self) -> None:
        if self.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, address = await loop.sock_accept(self.sock)
            slot = self.gate.admit(address[0] if isinstance(address, tuple) else None)
            if isinstance(slot, str):
                # No plaintext answer fits a TLS client: refused before any handshake work.
                if (held := log_throttle.allow(slot)) is not None:
                    log.warning(
                        "TLS connection refused: too many %s (%d more not logged)", slot, held
                    )
                conn.close()
                continue
            task = asyncio.create_task(self.handshake(conn, slot), name="tenement-https-handshake")
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)

    async def handshake(self, conn: socket.socket, slot: Slot) -> None:
        try:
            await self.start_tls(conn)
        finally:
            slot.release()

    async def start_tls(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            async with asyncio.timeout(self.hello_timeout):
                name = await peek_server_name(conn)
            context = await self.manager.context_for(name)
            await loop.connect_accepted_socket(
                self.protocol_factory,
                sock=conn,
                ssl=context,
                ssl_handshake_timeout=self.hello_timeout,
            )
        except (OSError, TimeoutError, NotTls, ssl.SSLError, ConnectionError) as e:
            log.debug("TLS handshake not completed: %s", e)
            conn.close()
        except asyncio.CancelledError:
            conn.close()
            raise


class TlsServer(EmbeddedServer):
    """uvicorn with TlsListeners instead of asyncio servers on its sockets."""

    def __init__(self, config: Any, manager: CertManager, limits: EdgeLimits) -> None:
        super().__init__(config)
        self.manager = manager
        self.limits = limits

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        config = self.config

        def create_protocol() -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state
            )

        listeners = [
            TlsListener(sock, create_protocol, self.manager, Gate(self.limits))
            for sock in sockets or []
        ]
        for listener in listeners:
            listener.start()
        self.servers = listeners  # type: ignore[assignment]
        self.started = True
