"""The weighted host `{service}.{domain}`: which instance a request goes to.

Per request, by the instances' weights (routing/releases.py `pick`): weight 0 never, a
failed instance is skipped. With TENEMENT_STICKY_COOKIE set, a browser that has been
sent to an instance keeps going there while it still has a weight and is not failed.
"""

from __future__ import annotations

from http.cookies import CookieError, SimpleCookie
from typing import TYPE_CHECKING, Any

from django.conf import settings

from instances.ids import InstanceKey
from routing.releases import pick

if TYPE_CHECKING:
    from proxy.state import ProxyState


def choose(state: ProxyState, service: str, scope: dict[str, Any]) -> tuple[str | None, str | None]:
    """(instance id or None, the id to put in a new sticky cookie or None)."""
    candidates = [
        (instance_id, weight)
        for instance_id, weight in state.table.weighted.get(service, ())
        if InstanceKey(service, instance_id) not in state.failed
    ]
    cookie = settings.TENEMENT_STICKY_COOKIE
    if not cookie:
        return pick(candidates), None
    held = cookie_value(scope, cookie)
    if held is not None and any(i == held for i, _ in candidates):
        return held, None
    chosen = pick(candidates)
    return chosen, chosen


def cookie_value(scope: dict[str, Any], name: str) -> str | None:
    for header, value in scope["headers"]:
        if header != b"cookie":
            continue
        try:
            jar = SimpleCookie(value.decode("latin-1"))
        except CookieError:
            continue  # a malformed cookie header: as if there were none
        if name in jar:
            return jar[name].value
    return None


def sticky_send(send: Any, instance_id: str) -> Any:
    """`send`, with the sticky cookie added to the response head (HTTP only)."""
    header = (
        b"set-cookie",
        f"{settings.TENEMENT_STICKY_COOKIE}={instance_id}; Path=/; HttpOnly; SameSite=Lax".encode(),
    )

    async def wrapped(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), header]}
        await send(message)

    return wrapped
