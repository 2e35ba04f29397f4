"""uvicorn's httptools protocol with the edge limits (proxy/limits.py) enforced.

Everything here happens before a request reaches the ASGI app: bytes past the header
limit are never handed to the parser (httptools joins a header's pieces by copying, so an
unbounded header costs quadratic CPU), slow or idle clients are timed out, and
connections over the caps are refused the moment they are accepted.
"""

from __future__ import annotations

import asyncio
import http
import logging
import time
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from proxy.limits import EdgeLimits, Gate, Slot, log_throttle

log = logging.getLogger("tenement.edge")

# websockets re-parses the handshake uvicorn hands it with its own limits (8 KiB lines,
# 128 headers); past them it answers nothing at all. Refuse such handshakes ourselves.
WS_MAX_LINE = 8192 - 2  # its limit counts the CRLF
WS_MAX_HEADERS = 128


class Refused(Exception):
    """Raised from a parser callback: answer `status` and close."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def canned(status: int, reason: str, retry_after: int | None = None) -> bytes:
    """A complete close-delimited plain-text response."""
    body = f"{status} {http.HTTPStatus(status).phrase.lower()}: {reason}\n".encode()
    head = [
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
        "content-type: text/plain; charset=utf-8",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if retry_after is not None:
        head.append(f"retry-after: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def header_value(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def absolute_authority(url: bytes) -> bytes | None:
    """b'http://Host:1/x' -> b'host:1'; None for anything not absolute-form."""
    scheme, sep, rest = url.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        return None
    return rest.split(b"/", 1)[0].split(b"?", 1)[0].lower()


class EdgeHttpProtocol(HttpToolsProtocol):
    """Takes `gate` (shared by all connections of one server) as a keyword argument."""

    def __init__(self, *args: Any, gate: Gate, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = gate
        self.limits: EdgeLimits = gate.limits
        self.slot: Slot | None = None
        self.in_head = True  # between requests, or inside a request's head
        self.head_bytes = 0
        self.header_count = 0
        self.head_timer: asyncio.TimerHandle | None = None
        self.body_timer: asyncio.TimerHandle | None = None
        self.body_read_at = 0.0

    # Connections

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        admitted = self.gate.admit(self.client[0] if self.client else None)
        if isinstance(admitted, str):
            if (held := log_throttle.allow(admitted)) is not None:
                log.warning("connection refused: too many %s (%d more not logged)", admitted, held)
            self.transport.write(canned(503, f"too many {admitted}", retry_after=5))
            self.transport.close()
            return
        self.slot = admitted
        self.arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel_timers()
        if self.slot is not None:
            self.slot.release()
            self.slot = None
        super().connection_lost(exc)

    def handle_websocket_upgrade(self) -> None:
        # The WebSocket protocol takes the transport over, and with it the slot.
        slot, self.slot = self.slot, None
        self.cancel_timers()
        super().handle_websocket_upgrade()
        protocol = self.transport.get_protocol()
        if isinstance(protocol, EdgeWebSocketProtocol):
            protocol.slot = slot
        elif slot is not None:
            slot.release()

    # Bytes in

    def data_received(self, data: bytes) -> None:
        if self.slot is None:
            return  # refused at connect, or answered already: the transport is closing
        self._unset_keepalive_if_required()
        if self.in_head and self.head_timer is None:
            self.arm_head_timer()
        while data and self.parser is not None:
            if self.in_head:
                room = self.limits.max_head - self.head_bytes
                if room <= 0:
                    self.refuse(431, f"request head over {self.limits.max_head} bytes")
                    return
                chunk, data = data[:room], data[room:]
                self.head_bytes += len(chunk)
            else:
                chunk, data = data, b""
            if not self.feed(chunk):
                return

    def feed(self, data: bytes) -> bool:
        """Parse `data`; False when the connection was answered or handed over."""
        try:
            self.parser.feed_data(data)
        except Refused as e:
            self.refuse(e.status, e.reason)
            return False
        except httptools.HttpParserCallbackError as e:
            refused = e.__context__
            if isinstance(refused, Refused):
                self.refuse(refused.status, refused.reason)
            else:
                self.refuse(400, "invalid HTTP request")
            return False
        except httptools.HttpParserError:
            self.refuse(400, "invalid HTTP request")
            return False
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.check_websocket_handshake()
            else:
                self._unsupported_upgrade_warning()
            return False
        return True

    def check_websocket_handshake(self) -> None:
        lines = [len(name) + 2 + len(value) for name, value in self.headers]
        lines.append(len(self.scope["method"]) + len(self.url) + 10)  # "GET url HTTP/1.1"
        if len(lines) > WS_MAX_HEADERS + 1 or max(lines) > WS_MAX_LINE:
            self.refuse(431, "WebSocket handshake headers too large")
        else:
            self.handle_websocket_upgrade()

    def refuse(self, status: int, reason: str) -> None:
        """Answer and close; never write into a response already under way."""
        self.cancel_timers()
        if self.slot is not None:
            self.slot.release()  # the descriptor is freed soon; count it free now
            self.slot = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is None or not cycle.response_started:
            self.transport.write(canned(status, reason))
        if cycle is not None and not cycle.response_complete:
            # The app, if it is still at work on this request, sees a disconnect.
            cycle.disconnected = True
            cycle.message_event.set()
        if (held := log_throttle.allow(str(status))) is not None:
            log.info(
                "request refused: %d %s (%d more not logged)",
                status,
                reason,
                held,
                extra={"status": status},
            )
        self.transport.close()

    # Parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.header_count = 0

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.limits.max_url:
            raise Refused(414, f"request target over {self.limits.max_url} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_count += 1
        if self.header_count > self.limits.max_headers:
            raise Refused(431, f"more than {self.limits.max_headers} header lines")
        if len(name) + 2 + len(value) > self.limits.max_line:
            raise Refused(431, f"a header line over {self.limits.max_line} bytes")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.cancel_head_timer()
        self.check_framing()
        super().on_headers_complete()
        if not self.parser.should_upgrade():
            self.body_read_at = time.monotonic()
            self.body_timer = self.loop.call_later(self.limits.body_timeout, self.body_timeout)

    def on_body(self, body: bytes) -> None:
        self.body_read_at = time.monotonic()
        super().on_body(body)

    def on_message_complete(self) -> None:
        self.in_head, self.head_bytes = True, 0
        self.cancel_body_timer()
        super().on_message_complete()

    def check_framing(self) -> None:
        """Refuse the ambiguous forms llhttp accepts, so no hop reads them differently."""
        url = self.url
        if not url.startswith(b"/"):
            if url == b"*":
                if self.parser.get_method() != b"OPTIONS":
                    raise Refused(400, "the target '*' is for OPTIONS only")
            elif absolute_authority(url) != (header_value(self.headers, b"host") or b"").lower():
                # An origin server may take absolute-form, but then its authority, not
                # Host, names the site (RFC 9112 §3.2.2): accept it only when they agree.
                raise Refused(400, "an absolute-form target must name the Host it is sent to")
        if self.parser.get_http_version() == "1.0" and header_value(
            self.headers, b"transfer-encoding"
        ):
            raise Refused(400, "Transfer-Encoding in an HTTP/1.0 request")  # RFC 9112 §6.1

    # Timers

    def arm_head_timer(self) -> None:
        self.head_timer = self.loop.call_later(self.limits.header_timeout, self.head_timeout)

    def head_timeout(self) -> None:
        self.head_timer = None
        if self.head_bytes:
            self.refuse(408, f"request head not received within {self.limits.header_timeout}s")
        elif not self.transport.is_closing():
            self.transport.close()  # never sent a byte: nothing to answer

    def body_timeout(self) -> None:
        self.body_timer = None
        if self.transport.is_closing() or self.in_head:
            return
        waited = time.monotonic() - self.body_read_at
        # A paused read is our back-pressure (the app is slow), not the client's fault.
        if self.flow.read_paused or waited < self.limits.body_timeout:
            delay = max(self.limits.body_timeout - waited, 0.05)
            self.body_timer = self.loop.call_later(delay, self.body_timeout)
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
        self.refuse(408, f"no request body data for {self.limits.body_timeout}s")

    def cancel_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def cancel_body_timer(self) -> None:
        if self.body_timer is not None:
            self.body_timer.cancel()
            self.body_timer = None

    def cancel_timers(self) -> None:
        self.cancel_head_timer()
        self.cancel_body_timer()


class EdgeWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol that gives back the connection's slot when it ends."""

    slot: Slot | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            super().connection_lost(exc)
        finally:
            if self.slot is not None:
                self.slot.release()
                self.slot = None
