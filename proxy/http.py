"""Forward one HTTP request to its instance, waking it first if it sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from django.conf import settings

from proxy import headers as h
from proxy.client import ClientGone, ClientReader, hold
from proxy.responses import plain
from proxy.session import Session
from proxy.state import WakeRejected
from proxy.upstream import ConnectFailed, UpstreamConnection, UpstreamError
from tenement_site import logging as logctx

log = logging.getLogger("tenement.proxy")


# A request the app may have acted on is sent again only if repeating it is harmless:
# after an app exit only safe methods; on a stale pooled connection idempotent ones too.
SAFE = frozenset({"GET", "HEAD", "OPTIONS"})
IDEMPOTENT = SAFE | {"PUT", "DELETE"}
# CONNECT cannot be forwarded over a Unix socket; TRACE would echo a client's cookies back.
REFUSED_METHODS = frozenset({"CONNECT", "TRACE"})
# A response head slower than this gets the client watched for leaving meanwhile (not
# at once: most heads come within milliseconds, and a watcher costs a task).
WATCH_HEAD_AFTER = 0.25


class BodyTooLarge(Exception):
    """The request body passed max_body_mb while streaming."""


class Refused(Exception):
    """A request refused before any work is done for it (a bad method, a bad length)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


class Exchange(Session):
    """One request through the proxy: wake if needed, forward, stream back."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.rid = h.request_id(self.scope["headers"])
        self.woke_ms: int | None = None
        self.status = 0  # the status sent to the client, for metrics; 0 = none yet
        self.sent_bytes = 0  # response body bytes, for the access log
        self.started = False
        self.body_started = False
        self.max_body = settings.TENEMENT_MAX_BODY_MB * 1024 * 1024
        self.client = ClientReader(self.receive, str(self.key))
        self.receive = self.client.receive

    async def run(self) -> None:
        # Lines logged while handling this request (a 502, a 504) carry its id and key.
        context = logctx.bind(self.rid, self.key)
        try:
            self.precheck()
            await self.forward()
        except Refused as e:
            await self.fail(e.status, str(e))
        except WakeRejected as e:
            await self.fail(503, str(e), retry_after=e.retry_after)
        except BodyTooLarge:
            await self.fail(413, f"the limit is {settings.TENEMENT_MAX_BODY_MB} MB")
        except TimeoutError:
            await self.fail(504, f"no response within {self.target.request_timeout:g}s")
        except UpstreamError as e:
            await self.fail(502, str(e))
        except ClientGone:
            pass
        finally:
            await self.client.stop_watching()
            logctx.unbind(context)

    def precheck(self) -> None:
        """The refusals that cost nothing, before any wake or pooled connection: a
        2 GB Content-Length to a sleeping tenant must not wake it."""
        method = self.scope["method"]
        if method in REFUSED_METHODS:
            raise Refused(405, f"{method} is not forwarded to tenants")
        fields = self.scope["headers"]
        lengths = {v.strip() for n, v in fields if n == b"content-length"}
        if not lengths:
            return
        if len(lengths) > 1 or not next(iter(lengths)).isdigit():
            raise Refused(400, "malformed Content-Length")
        if h.header(fields, b"transfer-encoding") is not None:
            raise Refused(400, "both Content-Length and Transfer-Encoding")
        if int(next(iter(lengths))) > self.max_body:
            raise BodyTooLarge

    async def fail(self, status: int, detail: str, retry_after: int | None = None) -> None:
        if self.started:
            # Headers are out: all we can do is cut the response short.
            log.warning(
                "%s: %s after the response began; closing",
                self.key,
                detail,
                extra={"event": "proxy_cut", "status": status},
            )
            return
        log.info(
            "%s %s: %s", self.key, status, detail, extra={"event": "proxy_error", "status": status}
        )
        self.status = status
        await plain(self.send, status, detail, retry_after=retry_after, extra=self.own_headers())

    def own_headers(self) -> list[tuple[bytes, bytes]]:
        extra = [(b"x-request-id", self.rid)]
        if self.woke_ms is not None:
            extra.append((b"x-tenement-wake", str(self.woke_ms).encode()))
        return extra

    # ---- wake and retry ----------------------------------------------------------------

    async def forward(self) -> None:
        socket = self.state.running.get(self.key)
        if socket is None:
            socket = await self.wake()
        try:
            await self.exchange(socket)
        except UpstreamError as e:
            if not isinstance(e, ConnectFailed) and not self.replayable():
                raise
            # It exited between our look and the exchange (idle stop, crash): wake once.
            self.state.forget_socket(self.key, socket)
            await self.exchange(await self.wake(suspect=socket))

    def replayable(self) -> bool:
        """Safe to send again: nothing reached the client and the request has no body."""
        return not self.started and not self.body_started and self.scope["method"] in SAFE

    async def wake(self, suspect: str | None = None) -> str:
        """Hold for the wake; a client that leaves meanwhile is dropped from it at once."""
        began = time.monotonic()
        socket = await hold(
            self.client,
            lambda: self.state.wake(self.key, self.target.wake_timeout, suspect),
            f"wake {self.key}",
        )
        self.woke_ms = round((time.monotonic() - began) * 1000)
        return socket

    # ---- one exchange with the app ---------------------------------------------------------

    async def exchange(self, socket: str) -> None:
        pool = self.state.pools.get(socket)
        conn, reused = await pool.acquire()
        try:
            status, headers = await self.request(conn)
        except UpstreamError:
            conn.close()
            if not reused or self.body_started or self.scope["method"] not in IDEMPOTENT:
                raise
            # A pooled connection the app had closed meanwhile: once more on a fresh one.
            conn = await pool.connect()
            status, headers = await self.request_or_close(conn)
        except BaseException:
            conn.close()
            raise
        try:
            await self.respond(conn, status, headers)
        finally:
            pool.release(conn)

    async def request_or_close(self, conn: UpstreamConnection) -> tuple[int, h.Headers]:
        try:
            return await self.request(conn)
        except BaseException:
            conn.close()
            raise

    async def request(self, conn: UpstreamConnection) -> tuple[int, h.Headers]:
        """Send the request (streaming its body) and wait for the response head."""
        scope = self.scope
        framing, chunked = self.framing()
        fwd = h.forwarded(scope, self.host, self.rid)
        conn.begin(
            h.request_head(scope["method"], h.target(scope), fwd, framing),
            head_only=scope["method"] == "HEAD",
        )
        if not framing:
            return await self.head_within_timeout(conn)
        sender = asyncio.create_task(self.send_body(conn, chunked), name=f"body {self.key}")
        try:
            return await self.head_after_body(conn, sender)
        finally:
            if not sender.done():
                sender.cancel()
                conn.reusable = False

    def framing(self) -> tuple[h.Headers, bool]:
        """How the body is framed for the app: its length, chunked, or no body."""
        length = h.header(self.scope["headers"], b"content-length")
        if length is not None:
            if int(length) > self.max_body:
                raise BodyTooLarge
            return [(b"content-length", length)], False
        if h.header(self.scope["headers"], b"transfer-encoding") is not None:
            return [(b"transfer-encoding", b"chunked")], True
        return [], False

    async def head_after_body(
        self, conn: UpstreamConnection, sender: asyncio.Task[None]
    ) -> tuple[int, h.Headers]:
        # The app may answer before reading the whole body (a 401, a 413 of its own).
        done, _ = await asyncio.wait([sender, conn.head], return_when=asyncio.FIRST_COMPLETED)
        if sender in done and sender.exception() is not None:
            raise sender.exception()  # type: ignore[misc]
        return await self.head_within_timeout(conn, watch=sender.done())

    async def head_within_timeout(
        self, conn: UpstreamConnection, watch: bool = True
    ) -> tuple[int, h.Headers]:
        """The response head; `watch`: nothing else reads the client meanwhile, so watch
        it for leaving (the exchange is then dropped, not left to the timeout)."""
        # Plain timers on the future: asyncio.timeout's cancel/uncancel dance measured
        # several µs per request on this path.
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.target.request_timeout, _expire, conn.head)
        watcher = None
        if watch:

            def abort() -> None:
                conn.abort(ClientGone())

            if self.client.watcher is not None:
                self.client.watch(abort)  # already watching since the wake
            else:
                watcher = loop.call_later(WATCH_HEAD_AFTER, self.client.watch, abort)
        try:
            return await conn.head
        finally:
            timer.cancel()
            if watcher is not None:
                watcher.cancel()

    async def send_body(self, conn: UpstreamConnection, chunked: bool) -> None:
        total = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_body:
                raise BodyTooLarge
            if chunk:
                self.body_started = True
                await conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
            if not message.get("more_body"):
                break
        if chunked:
            await conn.write(b"0\r\n\r\n")

    # ---- the response -----------------------------------------------------------------------

    async def respond(self, conn: UpstreamConnection, status: int, headers: h.Headers) -> None:
        if self.client.watcher is not None:
            await self.client.stop_watching()  # from here, stream() watches the client
        # The ASGI server stamps its own Date; a second one from the app would duplicate it.
        out = [(n, v) for n, v in h.end_to_end(headers) if n.lower() != b"date"]
        if h.header(out, b"x-request-id") is None:
            out.append((b"x-request-id", self.rid))
        if self.woke_ms is not None:
            out.append((b"x-tenement-wake", str(self.woke_ms).encode()))
        self.status = status
        await self.send({"type": "http.response.start", "status": status, "headers": out})
        self.started = True
        if conn.complete:  # the common case: the whole (small) body is already here
            body = b"".join(conn.chunks)
            conn.chunks.clear()
            self.sent_bytes += len(body)
            await self.send({"type": "http.response.body", "body": body})
            return
        await self.stream(conn)

    async def stream(self, conn: UpstreamConnection) -> None:
        watcher = asyncio.create_task(self.watch_disconnect(conn), name=f"watch {self.key}")
        try:
            async for chunk in conn.body():
                self.sent_bytes += len(chunk)
                await self.send({"type": "http.response.body", "body": chunk, "more_body": True})
            await self.send({"type": "http.response.body", "body": b""})
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def watch_disconnect(self, conn: UpstreamConnection) -> None:
        """Abort the upstream exchange when the client goes (SSE, long polls, downloads)."""
        while (await self.receive())["type"] != "http.disconnect":
            pass
        conn.abort(ClientGone())


def _expire(head: asyncio.Future[tuple[int, h.Headers]]) -> None:
    if not head.done():
        head.set_exception(TimeoutError())
