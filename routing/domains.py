"""Custom domains: the rules a name must meet, and adding or removing one.

A custom domain is routed exactly like the tenant's own host (wakes, WebSockets) and,
with TLS on_demand, gets its certificate on its first handshake.
"""

from __future__ import annotations

import ipaddress

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import IntegrityError, transaction

from instances.ids import InstanceKey
from instances.messages import PROXY_GROUP
from routing.hosts import MalformedHost, normalize
from routing.models import Domain


class DomainError(ValueError):
    """A name that cannot be a custom domain; the message says why."""


class DomainTaken(DomainError):
    """The name is another tenant's already (409)."""


def check_name(raw: str, key: InstanceKey, control_domain: str) -> str:
    """The normalized name, or DomainError saying why it cannot be `key`'s domain."""
    try:
        name = normalize(raw)
    except MalformedHost:
        raise DomainError(f"{raw!r} is not a DNS name") from None
    if raw.strip().rstrip(".").lower() != name:
        raise DomainError(f"{raw!r}: give the bare name, without a port")
    if _is_ip(name) or "." not in name:
        raise DomainError(f"{name!r}: a custom domain is a DNS name with a dot, not an address")
    own_host = f"{key.instance_id}.{key.service}.{control_domain}"
    if name == control_domain or name.endswith("." + control_domain):
        # Under our own domain only beneath the tenant's own host: anything else there is
        # the control host's or another tenant's.
        if not name.endswith("." + own_host):
            raise DomainError(
                f"{name!r} is under this server's domain {control_domain!r}; only names "
                f"beneath the tenant's own host ({own_host}) may be added"
            )
    return name


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


def add(raw: str, instance: object, key: InstanceKey, control_domain: str) -> Domain:
    name = check_name(raw, key, control_domain)
    try:
        with transaction.atomic():
            domain = Domain.objects.create(name=name, instance=instance)
    except IntegrityError:
        owner = Domain.objects.filter(name=name).select_related("instance__service").first()
        who = f" by {owner.instance.service.name}:{owner.instance.instance_id}" if owner else ""
        raise DomainTaken(f"{name!r} is already in use{who}") from None
    routes_changed()
    return domain


def remove(domain: Domain) -> None:
    domain.delete()
    routes_changed()


def routes_changed() -> None:
    """Tell the proxies to reload their routing snapshot (as the supervisor does)."""
    layer = get_channel_layer()
    if layer is not None:
        async_to_sync(layer.group_send)(PROXY_GROUP, {"type": "routes.changed"})
