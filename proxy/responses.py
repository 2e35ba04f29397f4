"""Short plain-text answers the proxy gives itself: never a traceback."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

Send = Callable[[dict[str, Any]], Awaitable[None]]

REASONS = {
    400: "bad request",
    308: "permanent redirect",
    404: "not found",
    405: "method not allowed",
    413: "request body too large",
    502: "bad gateway",
    503: "service unavailable",
    504: "gateway timeout",
}


async def plain(
    send: Send,
    status: int,
    detail: str = "",
    *,
    retry_after: int | None = None,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = f"{status} {REASONS.get(status, 'error')}{': ' + detail if detail else ''}\n".encode()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    headers += extra or []
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
