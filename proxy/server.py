"""The embedded ASGI server: uvicorn running on the supervisor's own event loop."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import uvicorn
from django.conf import settings

from proxy.edge import EdgeHttpProtocol, EdgeWebSocketProtocol
from proxy.limits import EdgeLimits, Gate

if TYPE_CHECKING:
    from instances.supervisor import Supervisor

log = logging.getLogger("tenement.http")

GOING_AWAY = 1001


class CoalescingTransport:
    """Joins a response's head and body into one send.

    uvicorn writes them separately: two syscalls and two packets for every small
    response. A write is held until the next write of the same event-loop turn (then
    both go together) or the end of the turn, whichever comes first.
    """

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if self._pending:  # the second write of this turn (the body): send both now
            self._pending.append(data)
            self.flush()
            return
        self._pending.append(data)
        asyncio.get_running_loop().call_soon(self.flush)  # a lone write goes out this turn

    def flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.flush()  # the upgrade response goes out before the WebSocket takes over
        self._transport.set_protocol(protocol)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(EdgeHttpProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport))  # type: ignore[arg-type]


class EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The supervisor owns SIGTERM/SIGINT and shuts the server down itself.
        yield


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (measured: ~1.4x the proxy's throughput), else asyncio's.

    TENEMENT_LOOP=asyncio forces the stock loop, e.g. to rule uvloop out of a bug hunt.
    """
    if os.environ.get("TENEMENT_LOOP", "auto") == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def parse_bind(bind: str) -> tuple[str, int]:
    """'HOST:PORT', '[::1]:PORT' or ':PORT' -> (host, port), with a clear error."""
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"invalid --bind {bind!r}: expected HOST:PORT, e.g. 127.0.0.1:8000")
    return host.strip("[]") or "0.0.0.0", int(port)


def bind_socket(bind: str) -> socket.socket:
    """Bind now, so 'address in use' is a clear start-up error rather than a dead task.

    Not listening yet: the server's loop calls listen() when it starts serving, so until
    migrations, config and recovery are done a client is refused, not queued (and a port
    someone else listens on fails this bind before anything else is touched)."""
    host, port = parse_bind(bind)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio turns on TCP_NODELAY only for sockets whose proto
    # says TCP, and without it Nagle meets delayed ACKs and every response waits ~40 ms.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {bind}: {e.strerror}") from None
    sock.set_inheritable(False)
    return sock


def bind_private_socket(bind: str) -> socket.socket:
    """The --metrics-bind listener: `unix:PATH` (0600, tenants cannot reach it) or
    HOST:PORT (reachable by tenants with network = host: say so at start)."""
    if not bind.startswith("unix:"):
        return bind_socket(bind)
    path = bind.removeprefix("unix:")
    if not os.path.isabs(path):
        raise ValueError(f"invalid --metrics-bind {bind!r}: expected unix:/absolute/path")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a stale socket from a previous run
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # born 0600: no window in which another user may connect
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {bind}: {e.strerror}") from None
    finally:
        os.umask(old)
    sock.set_inheritable(False)
    return sock


PRIVATE_PATHS = ("/metrics", "/status", "/health")


def private_listener(app: Any) -> Any:
    """The ASGI app of the --metrics-bind listener: /metrics, /status and /health of the
    control host without a token; nothing else."""
    from django.conf import settings

    from instances.metrics_view import PRIVATE_LISTENER

    host = settings.TENEMENT_DOMAIN.encode()

    async def serve(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"].rstrip("/") not in PRIVATE_PATHS:
            if scope["type"] == "http":
                await send({"type": "http.response.start", "status": 404, "headers": []})
                await send({"type": "http.response.body", "body": b"not found\n"})
            return
        headers = [(k, v) for k, v in scope["headers"] if k != b"host"]
        scope = {**scope, PRIVATE_LISTENER: True, "headers": [(b"host", host), *headers]}
        # Django wants a client address; a Unix socket has none.
        scope.setdefault("client", None)
        scope["client"] = scope["client"] or ("127.0.0.1", 0)
        await app(scope, receive, send)

    return serve


def edge_config(application: Any, *, private: bool = False) -> uvicorn.Config:
    """uvicorn's config for a tenant-facing listener (plain or TLS): the edge limits."""
    limits = EdgeLimits.from_settings()
    return uvicorn.Config(
        application,
        lifespan="off",
        access_log=False,
        log_level="warning",
        # Keep Django's LOGGING (tenement_site/logging.py): uvicorn's own dictConfig
        # would print its warnings in another format, breaking TENEMENT_LOG_FORMAT=json.
        log_config=None,
        server_header=False,
        # The edge limits (proxy/edge.py): one Gate counts this server's connections.
        # The private metrics listener stays open when the edge sheds for descriptors:
        # that is when the operator needs /health and /status.
        http=functools.partial(
            CoalescingHttpToolsProtocol, gate=Gate(limits, guard_fds=not private)
        ),  # type: ignore[arg-type]
        ws=EdgeWebSocketProtocol,
        timeout_keep_alive=limits.keepalive_timeout,  # type: ignore[arg-type]
        # We are the edge: X-Forwarded-For from a client is data, not its address.
        proxy_headers=False,
    )


def http_task(
    sock: socket.socket,
    *,
    private: bool = False,
    wrap: Callable[[Any], Any] | None = None,
    make_server: Callable[[uvicorn.Config], uvicorn.Server] = EmbeddedServer,
    name: str = "http",
) -> Callable[[Supervisor], Awaitable[None]]:
    """A Supervisor task that serves the ASGI app on `sock` until the supervisor stops
    (with `private`, only the metrics listener's paths; `wrap` puts an app in front,
    `make_server` serves with another uvicorn.Server, the HTTPS one)."""

    async def serve(supervisor: Supervisor) -> None:
        from tenement_site.asgi import application as tenant_facing

        application = private_listener(tenant_facing) if private else tenant_facing
        if wrap is not None:
            application = wrap(application)

        # Everything loaded so far (Django, the app registry) lives for the whole process:
        # move it out of the collector's sight so full collections stay short (p99).
        gc.freeze()

        server = make_server(edge_config(application, private=private))
        log.info("serving %s%s on %s", name, " (metrics)" if private else "", sock.getsockname())
        serving = asyncio.create_task(server.serve(sockets=[sock]), name=f"tenement-uvicorn-{name}")
        stopping = asyncio.create_task(supervisor.stop_event.wait(), name=f"tenement-{name}-stop")
        try:
            await asyncio.wait([serving, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            await drain(server, serving, supervisor.force_event, settings.TENEMENT_DRAIN_TIMEOUT)
        if not supervisor.stop_event.is_set():
            raise RuntimeError(f"the {name.upper()} server stopped unexpectedly")

    return serve


async def drain(
    server: uvicorn.Server, serving: asyncio.Task[None], force: asyncio.Event, timeout: float
) -> None:
    """Stop accepting, tell WebSocket clients 1001, give in-flight requests `timeout`
    seconds (less if `force` is set: a second signal), then cut what is left.

    Instances are still running meanwhile: the supervisor stops them after this returns.
    """
    if serving.done():
        return
    close_tenant_websockets(GOING_AWAY)
    server.should_exit = True  # uvicorn closes its listening sockets within 0.1 s
    forced = asyncio.create_task(force.wait(), name="tenement-http-force")
    try:
        await asyncio.wait([serving, forced], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        forced.cancel()
    if serving.done():
        return
    state = server.server_state
    log.warning(
        "%s: cutting %d connections still open",
        "second signal" if force.is_set() else f"drain deadline ({timeout:g}s) passed",
        len(state.connections),
        extra={"event": "drain_cut", "connections": len(state.connections)},
    )
    server.force_exit = True
    for task in list(state.tasks):
        task.cancel()
    for connection in list(state.connections):
        transport = getattr(connection, "transport", None)
        if transport is not None:
            transport.close()
    await serving


def close_tenant_websockets(code: int) -> None:
    """Close every proxied WebSocket with `code` (1001: going away), before the server's
    own shutdown would say 1012 (restart) to them."""
    from proxy.state import existing

    if (state := existing()) is not None:
        for closers in list(state.closers.values()):
            for close in list(closers):
                close(code)
