"""How the dashboard pages show figures and addresses."""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest
from django.http.request import split_domain_port

from instances.models import Instance

# What the dashboard calls a state: `stopped` is "sleeping" everywhere on it (the next
# request wakes it), the value in forms and data attributes stays the state's own.
STATE_LABELS = {"stopped": "sleeping"}
# The actions that do something in each state, in button order.
ACTIONS_BY_STATE = {
    "stopped": ("start", "deregister"),
    "starting": ("stop", "deregister"),
    "running": ("restart", "stop", "deregister"),
    "stopping": ("deregister",),
    "backoff": ("start", "stop", "deregister"),
    "failed": ("start", "deregister"),
}


def state_label(state: str) -> str:
    return STATE_LABELS.get(state, state)


def actions_for(state: str) -> tuple[str, ...]:
    return ACTIONS_BY_STATE.get(state, ("deregister",))


def human_seconds(seconds: float | None) -> str:
    """'2d 3h', '4m 10s', '12s'; an em dash when not running."""
    if seconds is None:
        return "—"
    left = int(seconds)
    parts = []
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)):
        if left >= size or (unit == "s" and not parts):
            parts.append(f"{left // size}{unit}")
            left %= size
    return " ".join(parts[:2])


def tenant_url(request: HttpRequest, instance: Instance) -> str:
    """The tenant's address, on the port this page was reached on (if the Host names one)."""
    _, port = split_domain_port(request.get_host())
    host = f"{instance.instance_id}.{instance.service.name}.{settings.TENEMENT_DOMAIN}"
    scheme = "https" if request.is_secure() else "http"
    return f"{scheme}://{host}{f':{port}' if port else ''}/"
