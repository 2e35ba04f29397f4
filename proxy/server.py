"""The embedded ASGI server: uvicorn running on the supervisor's own event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING

import uvicorn

if TYPE_CHECKING:
    from instances.supervisor import Supervisor

log = logging.getLogger("tenement.http")


class EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The supervisor owns SIGTERM/SIGINT and shuts the server down itself.
        yield


def parse_bind(bind: str) -> tuple[str, int]:
    """'HOST:PORT', '[::1]:PORT' or ':PORT' -> (host, port), with a clear error."""
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"invalid --bind {bind!r}: expected HOST:PORT, e.g. 127.0.0.1:8000")
    return host.strip("[]") or "0.0.0.0", int(port)


def bind_socket(bind: str) -> socket.socket:
    """Bind now, so 'address in use' is a clear start-up error rather than a dead task."""
    host, port = parse_bind(bind)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {bind}: {e.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


def http_task(sock: socket.socket) -> Callable[[Supervisor], Awaitable[None]]:
    """A Supervisor task that serves the ASGI app on `sock` until the supervisor stops."""

    async def serve(supervisor: Supervisor) -> None:
        from tenement_site.asgi import application

        config = uvicorn.Config(
            application,
            lifespan="off",
            access_log=False,
            log_level="warning",
            server_header=False,
            # We are the edge: X-Forwarded-For from a client is data, not its address.
            proxy_headers=False,
        )
        server = EmbeddedServer(config)
        host, port = sock.getsockname()[:2]
        log.info("serving http on %s:%d", host, port)
        serving = asyncio.create_task(server.serve(sockets=[sock]), name="tenement-uvicorn")
        stopping = asyncio.create_task(supervisor.stop_event.wait(), name="tenement-http-stop")
        try:
            await asyncio.wait([serving, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            server.should_exit = True
            stopping.cancel()
            await serving
        if not supervisor.stop_event.is_set():
            raise RuntimeError("the HTTP server stopped unexpectedly")

    return serve
