"""Who the client is, when a trusted reverse proxy (nginx, Caddy, a TLS terminator) is the
TCP peer.

The middleware runs before routing, so everything after it (the API's auth-failure
limiter, django-axes, the access log, Django's `is_secure()`, the headers tenants receive)
sees one account of the request:

- from a peer in TENEMENT_TRUSTED_PROXIES, `X-Forwarded-For` gives the client address
  (the rightmost entry that is not itself a trusted proxy) and `X-Forwarded-Proto` the
  scheme; the peer is kept under `PEER` so the chain can be extended;
- from anyone else every such claim is removed from the request, so no later reader can
  be fooled by it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from typing import Any

from proxy.limits import Network, is_trusted

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]

# The scope key holding the TCP peer's (host, port) when `client` was taken from a header.
PEER = "tenement.peer"
# What a client may claim about where a request came from and how.
CLAIMS = frozenset(
    {b"forwarded", b"x-forwarded-for", b"x-real-ip", b"x-forwarded-proto", b"x-forwarded-host"}
)
SCHEMES = {"http": {"http": "http", "https": "https"}, "websocket": {"http": "ws", "https": "wss"}}


def joined(headers: list[tuple[bytes, bytes]], name: bytes) -> str:
    """Every value of a repeated header, in order, as one comma-separated list."""
    return ",".join(v.decode("latin-1") for n, v in headers if n == name)


def real_client(chain: str, networks: tuple[Network, ...]) -> str | None:
    """The rightmost address of an X-Forwarded-For chain that is not a trusted proxy.

    Entries left of it were written by the client itself and prove nothing. An entry that
    is not an IP address ends the walk: nothing left of it can be believed either.
    """
    last_trusted = None
    for entry in reversed([e.strip() for e in chain.split(",") if e.strip()]):
        try:
            address = str(ipaddress.ip_address(entry))
        except ValueError:
            return last_trusted
        if not is_trusted(address, networks):
            return address
        last_trusted = address
    return last_trusted


def last_value(headers: list[tuple[bytes, bytes]], name: bytes) -> str:
    """The value the nearest proxy wrote: the last item of the (joined) header."""
    items = [item.strip().lower() for item in joined(headers, name).split(",")]
    return items[-1] if items else ""


def resolve(scope: dict[str, Any], networks: tuple[Network, ...]) -> dict[str, Any]:
    """The scope with `client` and `scheme` as the trusted proxy reports them, or without
    any forwarding claims when the peer is not trusted."""
    client = scope.get("client")
    headers = scope["headers"]
    if not is_trusted(client[0] if client else None, networks):
        if any(name in CLAIMS for name, _ in headers):
            return {**scope, "headers": [(n, v) for n, v in headers if n not in CLAIMS]}
        return scope
    resolved = {**scope, PEER: client}
    if (address := real_client(joined(headers, b"x-forwarded-for"), networks)) is not None:
        resolved["client"] = (address, 0)
    proto = last_value(headers, b"x-forwarded-proto")
    scheme = SCHEMES[scope["type"]].get(proto)
    if scheme is not None:
        resolved["scheme"] = scheme
        # One value, the one taken here: Django's SECURE_PROXY_SSL_HEADER reads the first
        # of a list, and must not disagree with the scope.
        rest = [(n, v) for n, v in headers if n != b"x-forwarded-proto"]
        resolved["headers"] = [*rest, (b"x-forwarded-proto", proto.encode())]
    return resolved


def peer_of(scope: dict[str, Any]) -> str | None:
    """The TCP peer's address (the proxy's, when one is trusted)."""
    peer = scope.get(PEER) or scope.get("client")
    return peer[0] if peer else None


class ClientAddress:
    """ASGI middleware applying `resolve` to HTTP and WebSocket scopes."""

    def __init__(self, app: ASGIApp, networks: tuple[Network, ...]) -> None:
        self.app = app
        self.networks = networks

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in SCHEMES:
            scope = resolve(scope, self.networks)
        await self.app(scope, receive, send)
