"""The host router: the control host goes to Django, tenant hosts to their instance.

Plain ASGI rather than a Channels consumer: measured, a consumer per request costs
about a third of the throughput (bench/proxy_candidates.py), and this is the hot path.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings

from instances import metrics, timeline
from instances.ids import InstanceKey
from proxy import hooks
from proxy import state as proxy_state
from proxy.http import Exchange
from proxy.responses import plain
from proxy.websocket import Tunnel
from proxy.weighted import choose, sticky_send
from routing.hosts import Control, MalformedHost, Route, Tenant, Weighted, resolve
from routing.table import Target

log = logging.getLogger("tenement.proxy")
access_log = logging.getLogger("tenement.access")

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


class Malformed:
    """A Host header that is not a host name (cached like a route)."""


@functools.lru_cache(maxsize=8192)
@sync_to_async
def register_on_request(key: InstanceKey) -> Target | None:
    """TENEMENT_REGISTER_ON_REQUEST: upstream wakes any id of a defined service; register
    it (the wake that follows makes the supervisor read it). Off the hot path: only for
    hosts the routing snapshot does not know."""
    from django.db import close_old_connections

    from instances import operations as ops

    close_old_connections()
    try:
        instance, _ = ops.register(key, start=True)
    except ops.OperationError:
        return None  # the service went away meanwhile
    service = instance.service
    return Target(key, service.request_timeout, service.wake_timeout)


def route_for(raw: bytes, domain: str) -> Route | Malformed:
    try:
        return resolve(raw.decode("latin-1"), domain)
    except MalformedHost:
        return Malformed()


def host_of(scope: dict[str, Any]) -> bytes | None:
    """The Host header, or None when there are several (RFC 9112 §3.2: a 400)."""
    found = None
    for name, value in scope["headers"]:
        if name == b"host":
            if found is not None:
                return None
            found = value
    return found or b""


def log_access(exchange: Exchange, scope: dict[str, Any], took: float) -> None:
    """One line per tenant request (TENEMENT_ACCESS_LOG=1), with fields for log shippers.
    Status 499: the client left before any response (nginx's convention)."""
    client = scope.get("client")
    fields = {
        "event": "access",
        "instance": str(exchange.key),
        "method": scope["method"],
        "path": scope["path"],
        "status": exchange.status or 499,
        "duration_ms": round(took * 1000, 2),
        "bytes": exchange.sent_bytes,
        "request_id": exchange.rid.decode("latin-1"),
        "wake_ms": exchange.woke_ms,
        "client": client[0] if client else None,
    }
    access_log.info(
        "%s %s %s %d %dB %.1fms",
        fields["instance"],
        fields["method"],
        fields["path"],
        fields["status"],
        fields["bytes"],
        fields["duration_ms"],
        extra=fields,
    )


class HostRouter:
    """ASGI app for one protocol ("http" or "websocket")."""

    def __init__(self, control: ASGIApp, protocol: str) -> None:
        self.control = control
        self.protocol = protocol
        self.domain = settings.TENEMENT_DOMAIN
        self.observe = metrics.request_recorder()  # None with TENEMENT_METRICS off
        self.observe_release = metrics.release_request_recorder()
        self.access_log = settings.TENEMENT_ACCESS_LOG
        self.timeline = timeline.current()  # the dashboard's charts

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        host = host_of(scope)
        if host is None:
            await self.refuse(send, 400, "more than one Host header")
            return
        route = route_for(host, self.domain)
        if isinstance(route, Control):
            # The reverse-proxy hooks (wake, Caddy's ask) answer from memory, not Django.
            if not (
                self.protocol == "http"
                and scope["path"].startswith(hooks.PREFIX)
                and await hooks.serve(scope, receive, send, self.domain)
            ):
                await self.control(scope, receive, send)
        elif isinstance(route, Tenant):
            await self.tenant(route, host, scope, receive, send)
        elif isinstance(route, Weighted):
            await self.weighted(route, host, scope, receive, send)
        elif isinstance(route, Malformed):
            await self.refuse(send, 400, "malformed Host header")
        else:
            await self.custom_domain(route.host, host, scope, receive, send)

    async def tenant(
        self, route: Tenant, host: bytes, scope: dict[str, Any], receive: Any, send: Any
    ) -> None:
        state = await proxy_state.current()
        target = state.table.lookup(route.key)
        known_service = route.key.service in state.table.services
        if target is None and known_service and settings.TENEMENT_REGISTER_ON_REQUEST:
            target = await register_on_request(route.key)
        if target is None:
            what = "tenant" if known_service else "service"
            await self.refuse(send, 404, f"no such {what}: {route.key}")
            return
        await self.forward(state, target, None, host, scope, receive, send)

    async def weighted(
        self, route: Weighted, host: bytes, scope: dict[str, Any], receive: Any, send: Any
    ) -> None:
        """`{service}.{domain}`: one instance by weight (0 never, failed skipped); the
        chosen one is woken like any tenant. An optional cookie keeps a browser on it."""
        state = await proxy_state.current()
        if route.service not in state.table.services:
            await self.refuse(send, 404, f"no such service: {route.service}")
            return
        chosen, set_cookie = choose(state, route.service, scope)
        if chosen is None:
            await self.refuse(
                send, 503, f"no instance of {route.service} takes traffic (weight 0 or failed)"
            )
            return
        key = InstanceKey(route.service, chosen)
        target = state.table.lookup(key)
        if target is None:  # the snapshot lists only registered instances; a race at most
            await self.refuse(send, 503, f"{key} was just removed; try again")
            return
        if set_cookie is not None:
            send = sticky_send(send, set_cookie)
        await self.forward(state, target, chosen, host, scope, receive, send)

    async def forward(
        self,
        state: proxy_state.ProxyState,
        target: Target,
        release: str | None,
        host: bytes,
        scope: dict[str, Any],
        receive: Any,
        send: Any,
    ) -> None:
        key = target.key
        if self.protocol == "websocket":
            await Tunnel(state, target, scope, receive, send, host).run()
            return
        # A request in flight is an open connection: a long poll or a download keeps the
        # instance awake until it ends.
        state.opened(key)
        began = time.perf_counter()
        exchange = Exchange(state, target, scope, receive, send, host)
        try:
            await exchange.run()
        finally:
            state.closed(key)
            took = time.perf_counter() - began
            if self.observe is not None:
                self.observe(key, exchange.status, took)
            if self.observe_release is not None:
                # After the exchange: a wake may have started it on a new release.
                if name := release or state.release_of.get(key):
                    self.observe_release(key.service, name, exchange.status)
            self.timeline.request(key, took)
            if self.access_log:
                log_access(exchange, scope, took)

    async def custom_domain(
        self, name: str, host: bytes, scope: dict[str, Any], receive: Any, send: Any
    ) -> None:
        """A tenant's own domain (routing.Domain) goes where its own host goes."""
        state = await proxy_state.current()
        key = state.table.domains.get(name)
        if key is None:
            await self.refuse(send, 404, f"no tenant is served at {name}")
            return
        await self.tenant(Tenant(key), host, scope, receive, send)

    async def refuse(self, send: Any, status: int, detail: str) -> None:
        if self.protocol == "http":
            # After a malformed request nothing that follows on the connection is trusted.
            extra = [(b"connection", b"close")] if status == 400 else None
            await plain(send, status, detail, extra=extra)
        else:
            # Before accept, a close makes the server answer the handshake with 403.
            await send({"type": "websocket.close", "code": 1008})
