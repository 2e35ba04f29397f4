"""Custom domains: the rules a name must meet, and adding or removing one.

A custom domain is routed exactly like the tenant's own host (wakes, WebSockets) and,
with TLS on_demand, gets its certificate on its first handshake.
"""

from __future__ import annotations

import ipaddress
import secrets

import dns.exception
import dns.resolver
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import IntegrityError, transaction
from django.utils import timezone

from instances.ids import InstanceKey
from instances.messages import PROXY_GROUP
from routing.hosts import MalformedHost, normalize
from routing.models import Domain

DNS_TIMEOUT = 5.0  # seconds for a verification lookup, retries included


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


def add(
    raw: str,
    instance: object,
    key: InstanceKey,
    control_domain: str,
    verification: str = Domain.Verification.NONE,
) -> Domain:
    """Store a custom domain; routed at once, or (verification "txt") once verified."""
    name = check_name(raw, key, control_domain)
    if verification not in Domain.Verification.values:
        raise DomainError(f"verification must be one of {', '.join(Domain.Verification.values)}")
    token = secrets.token_urlsafe(24) if verification == Domain.Verification.TXT else ""
    try:
        with transaction.atomic():
            domain = Domain.objects.create(
                name=name, instance=instance, verification=verification, token=token
            )
    except IntegrityError:
        owner = Domain.objects.filter(name=name).select_related("instance__service").first()
        who = f" by {owner.instance.service.name}:{owner.instance.instance_id}" if owner else ""
        raise DomainTaken(f"{name!r} is already in use{who}") from None
    if domain.routed:
        routes_changed()
    return domain


def verify(domain: Domain) -> None:
    """Look for the token in DNS; mark the domain verified (and route it), or DomainError
    saying what was found instead."""
    if domain.routed:
        return
    found = txt_records(domain.txt_name)
    if domain.txt_value not in found:
        seen = ", ".join(repr(v) for v in found[:5]) or "no TXT record"
        raise DomainError(
            f"{domain.txt_name} must have the TXT record {domain.txt_value!r}; found {seen}"
        )
    domain.verified_at = timezone.now()
    domain.save(update_fields=["verified_at"])
    routes_changed()


def txt_records(name: str) -> list[str]:
    """The TXT values at `name` (strings of one record joined, as RFC 7208 reads them)."""
    try:
        answer = resolver().resolve(name, "TXT", lifetime=DNS_TIMEOUT)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except dns.exception.DNSException as e:
        raise DomainError(f"cannot look up {name}: {e}") from None
    return [b"".join(record.strings).decode("utf-8", "replace") for record in answer]


def resolver() -> dns.resolver.Resolver:
    """The system's resolver, or TENEMENT_DNS_RESOLVER (HOST:PORT)."""
    from django.conf import settings

    if not settings.TENEMENT_DNS_RESOLVER:
        return dns.resolver.Resolver()
    host, _, port = settings.TENEMENT_DNS_RESOLVER.rpartition(":")
    custom = dns.resolver.Resolver(configure=False)
    custom.nameservers = [host.strip("[]")]
    custom.port = int(port)
    return custom


def remove(domain: Domain) -> None:
    domain.delete()
    routes_changed()


def routes_changed() -> None:
    """Tell the proxies to reload their routing snapshot (as the supervisor does)."""
    layer = get_channel_layer()
    if layer is not None:
        async_to_sync(layer.group_send)(PROXY_GROUP, {"type": "routes.changed"})
