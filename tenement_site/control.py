"""Guards of the control host: body size before auth, same-origin WebSockets, a busy
database as 503, and the client address login throttling counts.

The control host (dashboard, API, admin) and tenant hosts are different security
origins: a page on a tenant's site must not drive the dashboard with an operator's cookie.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.db import OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse

log = logging.getLogger("tenement.control")

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]
RETRY_AFTER_S = 5


def error_body(path: str, status: int, message: str) -> tuple[bytes, bytes]:
    """(content type, body) in the API's error shape under /api/, plain text elsewhere."""
    if path.startswith("/api/"):
        body = json.dumps({"error": {"status": status, "message": message}}).encode()
        return b"application/json", body
    return b"text/plain; charset=utf-8", f"{status} {message}\n".encode()


class BodyLimit:
    """Refuses control-host bodies over TENEMENT_CONTROL_MAX_BODY_KB before Django sees them.

    Django's ASGI handler spools a whole body to a temporary file before any view (and
    so before authentication) runs: a 1 GiB anonymous POST would fill the disk first.
    Bodies within the limit are read into memory here and handed on; over it, a 413 that
    closes the connection, so the rest is never read.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.limit = settings.TENEMENT_CONTROL_MAX_BODY_KB * 1024

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = declared_length(scope["headers"])
        if length is not None and length > self.limit:
            await self.refuse(scope, send)
            return
        body = await self.read(receive)
        if body is None:
            await self.refuse(scope, send)
            return
        await self.app(scope, replay(body, receive), send)

    async def read(self, receive: Any) -> bytes | None:
        """The whole body, or None once it passes the limit."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b""  # the client left; Django sees an empty body and a disconnect
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def refuse(self, scope: dict[str, Any], send: Any) -> None:
        limit_kb = settings.TENEMENT_CONTROL_MAX_BODY_KB
        kind, body = error_body(scope["path"], 413, f"request body over {limit_kb} KiB")
        headers = [
            (b"content-type", kind),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def replay(body: bytes, receive: Any) -> Any:
    """A receive() that gives `body` once, then whatever the client sends next."""
    sent = False

    async def receive_again() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again


def same_origin(scope: dict[str, Any]) -> bool:
    """Whether the WebSocket's Origin is exactly the control host it was sent to."""
    origin = host = None
    for name, value in scope["headers"]:
        if name == b"origin":
            origin = value.decode("latin-1")
        elif name == b"host":
            host = value.decode("latin-1").lower()
    if not origin or not host:
        return False
    parts = urlsplit(origin)
    scheme = "https" if scope.get("scheme") == "wss" else "http"
    return parts.scheme == scheme and parts.netloc.lower() == host


class SameOriginWebSocket:
    """Control-host WebSockets only from the control host's own pages (CSWSH).

    Channels' AllowedHostsOriginValidator trusts every ALLOWED_HOSTS pattern, which would
    let a tenant's page open the dashboard's socket with the operator's cookie.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "websocket" and not same_origin(scope):
            await WebsocketDenier()(scope, receive, send)
            return
        await self.app(scope, receive, send)


class DatabaseBusy:
    """A locked, full or unreachable database is a 503 with Retry-After, not a 500."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exc: Exception) -> HttpResponse | None:
        if not isinstance(exc, OperationalError):
            return None
        return busy_response(request.path, exc)


def busy_response(path: str, exc: Exception) -> HttpResponse:
    log.warning("database unavailable: %s", exc, extra={"event": "database_error"})
    message = "the database is busy or unavailable; retry shortly"
    if path.startswith("/api/"):
        response: HttpResponse = JsonResponse(
            {"error": {"status": 503, "message": message}}, status=503
        )
    else:
        response = HttpResponse(f"503 {message}\n", status=503, content_type="text/plain")
    response["Retry-After"] = str(RETRY_AFTER_S)
    return response


def client_ip(request: HttpRequest) -> str:
    """The peer address, for login throttling: never a header a client could forge."""
    return request.META.get("REMOTE_ADDR") or "unknown"
