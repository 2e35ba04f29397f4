"""HTTP/1.1 client for instances' Unix sockets: pooled keep-alive, streamed both ways.

Measured in bench/proxy_candidates.py: an asyncio.Protocol with httptools' llhttp parser
forwards about twice as fast as an aiohttp or h11 client, which is what lets the proxy
keep up with upstream `ten`. Bodies are never held whole: the response side pauses
reading from the app while more than HIGH_WATER bytes wait for the client.
"""

from __future__ import annotations

import asyncio
import collections
import socket
from collections.abc import AsyncIterator

import httptools

from instances.addresses import parse_tcp

HIGH_WATER = 256 * 1024
MAX_IDLE_PER_SOCKET = 64
CONNECT_TIMEOUT = 5.0

Headers = list[tuple[bytes, bytes]]


class UpstreamError(Exception):
    """The app refused, reset or garbled the exchange (the answer is 502)."""


class ConnectFailed(UpstreamError):
    """Nothing listens on the socket: the instance has most likely just exited."""


class UpstreamConnection(asyncio.Protocol):
    """One connection to an app; carries one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.can_write = asyncio.Event()
        self.can_write.set()
        self._reset()

    def _reset(self) -> None:
        self.headers: Headers = []
        self.head: asyncio.Future[tuple[int, Headers]] = asyncio.get_running_loop().create_future()
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.complete = False
        self.reusable = False
        self.error: Exception | None = None
        self.data_ready = asyncio.Event()
        self.head_only = False
        # No Content-Length and not chunked: the body ends when the app closes.
        self.until_close = False

    # ---- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(UpstreamError(f"invalid HTTP response from the app: {e}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.can_write.set()
        if self.until_close and self.head.done() and not self.complete:
            self._finish(reusable=False)
        elif not self.complete:
            self._fail(UpstreamError("the app closed the connection"))

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    # ---- httptools callbacks --------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            self.headers = []  # an interim response (e.g. 103): wait for the real one
            return
        if not self.head.done():
            self.until_close = _delimited_by_close(status, self.headers)
            self.head.set_result((status, self.headers))
        if self.head_only:
            # llhttp cannot be told a HEAD response has no body; end here, never reuse.
            self._finish(reusable=False)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        self.data_ready.set()
        if self.buffered > HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if not self.head.done():
            return  # the end of an interim response
        self._finish(reusable=self.parser.should_keep_alive())

    # ---- request side -----------------------------------------------------------------

    def _finish(self, *, reusable: bool) -> None:
        self.complete = True
        self.reusable = reusable and not self.closed
        self.data_ready.set()

    def _fail(self, error: Exception) -> None:
        self.error = error
        if not self.head.done():
            self.head.set_exception(error)
            self.head.exception()  # retrieved here; the caller sees it via await
        self.data_ready.set()

    def begin(self, head: bytes, *, head_only: bool) -> None:
        self._reset()
        self.head_only = head_only
        assert self.transport is not None
        # The last response may have ended while reading was paused (a big body that
        # arrived whole): a reused connection must read again.
        self.transport.resume_reading()
        self.transport.write(head)

    async def write(self, data: bytes) -> None:
        if self.closed:
            raise UpstreamError("the app closed the connection")
        assert self.transport is not None
        self.transport.write(data)
        await self.can_write.wait()

    async def body(self) -> AsyncIterator[bytes]:
        """The response body as it arrives; raises UpstreamError if it is cut short."""
        while True:
            while self.chunks:
                chunk = self.chunks.popleft()
                self.buffered -= len(chunk)
                if self.buffered <= HIGH_WATER // 2 and self.transport is not None:
                    self.transport.resume_reading()
                yield chunk
            if self.complete:
                return
            if self.error is not None:
                raise self.error
            self.data_ready.clear()
            await self.data_ready.wait()

    def abort(self, error: Exception) -> None:
        """Give up on this exchange (the client went away): wake the reader, close."""
        self._fail(error)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


async def connect_unix(path: str) -> socket.socket:
    """A connected non-blocking Unix socket; while the app's accept queue is full, retry.

    A Unix socket answers a full backlog with EAGAIN rather than queueing the connect as
    TCP does, and asyncio's sock_connect mistakes that for "in progress" and hands back a
    socket that was never connected (every request on it fails). Apps often keep small
    backlogs (Python's socketserver: 5) and a wake releases every held request at once,
    so connect by hand (a Unix connect never blocks) and wait out a full queue. There is
    no readiness event for "backlog has room", hence the short waits.
    """
    delay = 0.001
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(path)
            return sock
        except BlockingIOError:
            sock.close()
        except BaseException:
            sock.close()
            raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


async def connect_upstream(address: str) -> socket.socket:
    """A connected non-blocking socket to a Unix socket path or a tcp: address."""
    if (tcp := parse_tcp(address)) is None:
        return await connect_unix(address)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.get_running_loop().sock_connect(sock, tcp)
    except BaseException:
        sock.close()
        raise
    return sock


def _delimited_by_close(status: int, headers: Headers) -> bool:
    if status in (204, 304):
        return False
    names = {name.lower() for name, _ in headers}
    return b"content-length" not in names and b"transfer-encoding" not in names


class Pool:
    """Idle keep-alive connections to one socket path."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.idle: collections.deque[UpstreamConnection] = collections.deque()

    async def acquire(self) -> tuple[UpstreamConnection, bool]:
        """A connection and whether it was reused (a reused one may be stale)."""
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn, True
        return await self.connect(), False

    async def connect(self) -> UpstreamConnection:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                return await self._connect_through_full_backlog()
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise ConnectFailed(f"nothing listens on {self.path}") from e
        except TimeoutError as e:
            raise UpstreamError(f"connect to {self.path} timed out") from e
        except OSError as e:
            raise UpstreamError(f"cannot connect to the app: {e.strerror or e}") from e

    async def _connect_through_full_backlog(self) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        if (tcp := parse_tcp(self.path)) is not None:
            # A TCP app (listen = "tcp", or "auto" and it opened $PORT): the kernel queues
            # connects on a full backlog, so a plain connect is enough.
            _, conn = await loop.create_connection(UpstreamConnection, *tcp)
            return conn
        sock = await connect_unix(self.path)
        _, conn = await loop.create_unix_connection(UpstreamConnection, sock=sock)
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        if conn.reusable and not conn.closed and len(self.idle) < MAX_IDLE_PER_SOCKET:
            self.idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        while self.idle:
            self.idle.pop().close()


class Pools:
    """One Pool per socket path; a pool is dropped when its instance goes down."""

    def __init__(self) -> None:
        self.by_path: dict[str, Pool] = {}

    def get(self, path: str) -> Pool:
        pool = self.by_path.get(path)
        if pool is None:
            pool = self.by_path[path] = Pool(path)
        return pool

    def drop(self, path: str) -> None:
        if (pool := self.by_path.pop(path, None)) is not None:
            pool.close()

    def close(self) -> None:
        for path in list(self.by_path):
            self.drop(path)
