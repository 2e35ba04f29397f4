"""Host header -> where the request goes. Pure functions: no database, no I/O.

`{id}.{service}.{domain}` is tenant `service:id`; `{service}.{domain}` is the service's
weighted host (upstream's shape: each request goes to one of its instances, by weight);
the bare domain (and `localhost` and IP literals) is the control host (Django). Anything
else under no known name is "unknown" (404). A Host that is not a valid host name at all
is malformed (400).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from instances.ids import LABEL_RE, InstanceKey

# Printable ASCII host characters; '%', '/', '@', '\\', spaces and controls are never valid.
_HOST_CHARS = re.compile(r"[a-z0-9.\-\[\]:]+")


class MalformedHost(ValueError):
    """The Host header is not a host name: the answer is 400."""


@dataclass(frozen=True)
class Control:
    """The control plane: dashboard, admin, API."""


@dataclass(frozen=True)
class Tenant:
    key: InstanceKey


@dataclass(frozen=True)
class Weighted:
    """`{service}.{domain}`: one of the service's instances, chosen per request by weight."""

    service: str


@dataclass(frozen=True)
class Unknown:
    host: str


Route = Control | Tenant | Weighted | Unknown


def normalize(raw: str) -> str:
    """Lowercase, drop the port and one trailing dot; raise MalformedHost if it is not a host."""
    host = raw.strip().lower()
    if not host or not _HOST_CHARS.fullmatch(host):
        raise MalformedHost(f"malformed host {raw!r}")
    if host.startswith("["):
        return _ipv6_literal(host, raw)
    name, sep, port = host.partition(":")
    if sep:
        _check_port(port, raw)
    name = name[:-1] if name.endswith(".") else name
    # Every label a host-name label (RFC 1123), which is also our rule for ids and services.
    if not name or len(name) > 253 or not all(map(LABEL_RE.fullmatch, name.split("."))):
        raise MalformedHost(f"malformed host {raw!r}")
    return name


def _ipv6_literal(host: str, raw: str) -> str:
    addr, sep, rest = host[1:].partition("]")
    if not sep or (rest and not rest.startswith(":")):
        raise MalformedHost(f"malformed host {raw!r}")
    if rest:
        _check_port(rest[1:], raw)
    try:
        ipaddress.IPv6Address(addr)
    except ValueError:
        raise MalformedHost(f"malformed host {raw!r}") from None
    return f"[{addr}]"


def _check_port(port: str, raw: str) -> None:
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise MalformedHost(f"malformed port in host {raw!r}")


def resolve(raw_host: str, domain: str) -> Route:
    """Where a request for `raw_host` goes, given the control domain."""
    host = normalize(raw_host)
    # localhost too, whatever the domain: on-host health checks and the CLI always work.
    if host == domain or host == "localhost" or _is_ip_literal(host):
        return Control()
    suffix = "." + domain
    if not host.endswith(suffix):
        return Unknown(host)
    labels = host[: -len(suffix)].split(".")
    if len(labels) == 1:
        return Weighted(labels[0])
    if len(labels) != 2:  # normalize() has checked each label already
        return Unknown(host)
    instance_id, service = labels
    return Tenant(InstanceKey(service, instance_id))


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True
