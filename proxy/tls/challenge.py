"""The plain-HTTP listener with TLS on: ACME HTTP-01 answers for every host, and (with
redirect_http) a permanent redirect to HTTPS for everything else."""

from __future__ import annotations

from typing import Any

from proxy.app import host_of
from proxy.responses import plain
from proxy.tls.manager import CertManager
from routing.hosts import MalformedHost, normalize

CHALLENGE_PREFIX = "/.well-known/acme-challenge/"


def https_location(host: str, port: int, scope: dict[str, Any]) -> str:
    authority = host if port == 443 else f"{host}:{port}"
    query = scope.get("query_string") or b""
    target = scope.get("raw_path") or scope["path"].encode()
    if query:
        target += b"?" + query
    return f"https://{authority}{target.decode('latin-1')}"


def http_side(app: Any, manager: CertManager) -> Any:
    """Wraps the tenant-facing app of the plain-HTTP listener."""
    redirect, port = manager.config.redirect_http, manager.config.https_port

    async def serve(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith(CHALLENGE_PREFIX):
            token = scope["path"][len(CHALLENGE_PREFIX) :]
            answer = manager.tokens.get(token)
            if answer is None:
                await plain(send, 404, "no such ACME challenge")
            else:
                await send_text(send, answer)
            return
        if not redirect or scope["type"] not in ("http", "websocket"):
            await app(scope, receive, send)
            return
        try:
            host = normalize((host_of(scope) or b"").decode("latin-1"))
        except MalformedHost:
            host = ""
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # wss:// is the way in
        elif not host:
            await plain(send, 400, "malformed Host header", extra=[(b"connection", b"close")])
        else:
            location = https_location(host, port, scope).encode()
            await plain(send, 308, "use HTTPS", extra=[(b"location", location)])

    return serve


async def send_text(send: Any, text: str) -> None:
    body = text.encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/octet-stream"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
