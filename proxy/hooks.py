"""Endpoints for a reverse proxy in front of us (nginx, Caddy), on the control host.

- `/_tenement/wake?host=H`: wakes the tenant served at H and answers when it is ready:
  204 (with `X-Tenement-Wake: <ms>` when it had to start), 404 for no such tenant, 503
  with the reason and Retry-After when it failed or did not become ready in its
  `wake_timeout`, 400 for a malformed host. It also counts as activity, so a tenant that
  nginx serves straight from its socket is not stopped for idleness. To a trusted proxy
  (TENEMENT_TRUSTED_PROXIES) the 204 also says where the tenant listens
  (`X-Tenement-Upstream`), for `ten nginx --direct`'s `auth_request`.
- `/_tenement/ask?domain=H`: Caddy's on-demand TLS `ask`: 200 when H is the control host,
  a registered tenant, a service's weighted host or a tenant's routed custom domain, else
  404, so certificates are only issued for our own names.

Both answer from the proxy's in-memory routing snapshot: no database query.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import parse_qs

from django.conf import settings

from instances.addresses import parse_tcp
from proxy import state as proxy_state
from proxy.forwarded import peer_of
from proxy.limits import is_trusted
from proxy.responses import plain
from proxy.state import WakeRejected
from routing.hosts import Control, MalformedHost, Tenant, Unknown, Weighted, resolve

PREFIX = "/_tenement/"


def query_value(scope: dict[str, Any], name: str) -> str:
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get(name)
    return values[-1] if values else ""


async def wake(scope: dict[str, Any], send: Any, domain: str) -> None:
    host = query_value(scope, "host")
    try:
        route = resolve(host, domain)
    except MalformedHost:
        await plain(send, 400, f"malformed host {host!r}; use ?host=ID.SERVICE.{domain}")
        return
    state = await proxy_state.current()
    if isinstance(route, Unknown) and (key := state.table.domains.get(route.host)) is not None:
        route = Tenant(key)  # a tenant's custom domain (routing.Domain)
    if not isinstance(route, Tenant):
        await plain(send, 404, f"no tenant is served at {host}")
        return
    target = state.table.lookup(route.key)
    if target is None:
        await plain(send, 404, f"no such tenant: {route.key}")
        return
    # Served elsewhere (straight from the socket): still activity for the idle timer.
    state.touched.add(route.key)
    extra: list[tuple[bytes, bytes]] = []
    socket = state.running.get(route.key)
    if socket is None:
        began = time.monotonic()
        try:
            socket = await state.wake(route.key, target.wake_timeout)
        except WakeRejected as e:
            await plain(send, 503, str(e), retry_after=e.retry_after)
            return
        extra.append((b"x-tenement-wake", str(round((time.monotonic() - began) * 1000)).encode()))
    if is_trusted(peer_of(scope), settings.TENEMENT_TRUSTED_PROXIES):
        # For `ten nginx --direct`: where nginx connects (never told to anyone else).
        extra.append((b"x-tenement-upstream", nginx_upstream(socket).encode()))
    await empty(send, 204, extra)


def nginx_upstream(address: str) -> str:
    """An app's address as nginx's proxy_pass takes it after `http://`: `unix:PATH:` for a
    Unix socket, `HOST:PORT` for an app on a TCP port (drop-in PORT apps)."""
    tcp = parse_tcp(address)
    if tcp is None:
        return f"unix:{address}:"
    host, port = tcp
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def ask(scope: dict[str, Any], send: Any, domain: str) -> None:
    host = query_value(scope, "domain")
    try:
        route = resolve(host, domain)
    except MalformedHost:
        await plain(send, 400, f"malformed domain {host!r}")
        return
    known = isinstance(route, Control)
    if isinstance(route, Tenant | Weighted | Unknown):
        state = await proxy_state.current()
        if isinstance(route, Tenant):
            known = state.table.lookup(route.key) is not None
        elif isinstance(route, Weighted):  # a service's weighted host
            known = route.service in state.table.services
        else:  # a tenant's custom domain, once routed
            known = state.table.domain_target(route.host) is not None
    if known:
        await empty(send, 200, [])
    else:
        await plain(send, 404, f"{host} is not served here")


async def empty(send: Any, status: int, extra: list[tuple[bytes, bytes]]) -> None:
    headers = [(b"content-length", b"0"), (b"cache-control", b"no-store"), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


HANDLERS = {PREFIX + "wake": wake, PREFIX + "ask": ask}


async def serve(scope: dict[str, Any], receive: Any, send: Any, domain: str) -> bool:
    """Answer a hook request; False when the path is not one (Django takes it)."""
    handler = HANDLERS.get(scope["path"].rstrip("/"))
    if handler is None:
        return False
    if scope["method"] not in ("GET", "HEAD", "POST"):
        await plain(send, 405, "use GET")
        return True
    await handler(scope, send, domain)
    return True
