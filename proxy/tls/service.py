"""Wiring: the manager, the HTTPS listener and the renewal loop as supervisor tasks."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from django.conf import settings

from proxy import state as proxy_state
from proxy.limits import EdgeLimits
from proxy.server import http_task
from proxy.tls import manager as tls_manager
from proxy.tls.challenge import http_side
from proxy.tls.config import TlsConfig
from proxy.tls.listener import TlsServer
from proxy.tls.manager import CertManager
from routing.hosts import MalformedHost, Tenant, Weighted, resolve

if TYPE_CHECKING:
    from instances.supervisor import Supervisor

Task = Callable[["Supervisor"], Awaitable[None]]


def names_resolver(config: TlsConfig) -> Callable[[str], Awaitable[tuple[str, ...] | None]]:
    """Which names to order for a handshake's name: only names we serve, never any SNI."""

    async def names_for(name: str) -> tuple[str, ...] | None:
        if name == config.domain:
            return (name,)
        if not config.on_demand:
            return None
        try:
            route = resolve(name, config.domain)
        except MalformedHost:
            return None
        state = await proxy_state.current()
        if isinstance(route, Tenant) and state.table.lookup(route.key) is not None:
            if config.wildcard:
                return (f"*.{route.key.service}.{config.domain}",)
            return (name,)
        if isinstance(route, Weighted) and route.service in state.table.services:
            return (name,)  # a service's weighted host, {service}.{domain}
        if state.table.domain_target(name) is not None:
            return (name,)
        return None

    return names_for


def still_wanted(config: TlsConfig) -> Callable[[tuple[str, ...]], Awaitable[bool]]:
    """Whether a certificate's names are all still ours: renewal skips the others."""
    names_for = names_resolver(config)
    suffix = "." + config.domain

    async def wanted(names: tuple[str, ...]) -> bool:
        state = await proxy_state.current()
        for name in names:
            if name.startswith("*.") and name.endswith(suffix):
                if name[2 : -len(suffix)] not in state.table.services:
                    return False
            elif await names_for(name) is None:
                return False
        return True

    return wanted


def secure_cookies(config: TlsConfig) -> None:
    """With redirect_http the control host is HTTPS only: its session and CSRF cookies
    are marked Secure, so a browser never sends them over plain HTTP (the redirect's own
    request included)."""
    if config.redirect_http:
        settings.SESSION_COOKIE_SECURE = True
        settings.CSRF_COOKIE_SECURE = True


def start_manager(config: TlsConfig) -> CertManager:
    """Load the cache (blocking; before the loop runs) and make the manager current."""
    secure_cookies(config)
    manager = CertManager(config, names_resolver(config), wanted=still_wanted(config))
    manager.load()
    tls_manager.set_current(manager)
    return manager


def tasks(manager: CertManager, https_sock: socket.socket) -> dict[str, Task]:
    def make_server(config: Any) -> TlsServer:
        return TlsServer(config, manager, EdgeLimits.from_settings())

    async def renewals(supervisor: Supervisor) -> None:
        await manager.run(supervisor.stop_event)

    return {
        "tenement-https": http_task(https_sock, make_server=make_server, name="https"),
        "tenement-acme": renewals,
    }


def http_wrapper(manager: CertManager) -> Callable[[Any], Any]:
    return lambda app: http_side(app, manager)
