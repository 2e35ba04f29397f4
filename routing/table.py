"""The proxy's routing snapshot: which tenants exist and how long to wait for them.

Built from the database off the hot path (at start and when the supervisor announces a
change), then read with plain dict lookups for every request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from asgiref.sync import sync_to_async

from instances.ids import InstanceKey


@dataclass(frozen=True)
class Target:
    key: InstanceKey
    request_timeout: float
    wake_timeout: float


@dataclass(frozen=True)
class RoutingTable:
    services: frozenset[str] = frozenset()
    targets: dict[InstanceKey, Target] = field(default_factory=dict)
    # Instances running and ready when the snapshot was taken: key -> socket path.
    running: dict[InstanceKey, str] = field(default_factory=dict)
    # The weighted host's candidates: service -> ((instance id, weight), ...), weight > 0.
    weighted: dict[str, tuple[tuple[str, int], ...]] = field(default_factory=dict)
    # The release each instance last ran healthy on (until the supervisor says otherwise).
    releases: dict[InstanceKey, str] = field(default_factory=dict)
    # Tenants' own domains (routing.Domain, routed ones only): host -> instance.
    domains: dict[str, InstanceKey] = field(default_factory=dict)

    def lookup(self, key: InstanceKey) -> Target | None:
        return self.targets.get(key)

    def domain_target(self, host: str) -> Target | None:
        key = self.domains.get(host)
        return None if key is None else self.targets.get(key)


Row = tuple[str, str, float, float, str, str, int, str]


def build(
    rows: list[Row],
    services: list[str],
    domains: list[tuple[str, str, str]] = (),  # type: ignore[assignment]
) -> RoutingTable:
    """From (service, id, request_timeout, wake_timeout, state, socket_path, weight,
    last_release) rows and (domain, service, id) rows."""
    targets: dict[InstanceKey, Target] = {}
    running: dict[InstanceKey, str] = {}
    weighted: dict[str, list[tuple[str, int]]] = {}
    releases: dict[InstanceKey, str] = {}
    for service, instance_id, request_timeout, wake_timeout, state, socket, weight, rel in rows:
        key = InstanceKey(service, instance_id)
        targets[key] = Target(key, request_timeout, wake_timeout)
        if state == "running" and socket:
            running[key] = socket
        if weight > 0:
            weighted.setdefault(service, []).append((instance_id, weight))
        if rel:
            releases[key] = rel
    frozen = {service: tuple(found) for service, found in weighted.items()}
    by_domain = {name: InstanceKey(service, instance_id) for name, service, instance_id in domains}
    return RoutingTable(frozenset(services), targets, running, frozen, releases, by_domain)


@sync_to_async
def load() -> RoutingTable:
    from django.db import close_old_connections

    from instances.models import Instance, Service
    from routing.models import ROUTED, Domain

    close_old_connections()
    rows = Instance.objects.values_list(
        "service__name",
        "instance_id",
        "service__request_timeout",
        "service__wake_timeout",
        "state",
        "socket_path",
        "weight",
        "last_release",
    )
    domains = Domain.objects.filter(ROUTED).values_list(
        "name", "instance__service__name", "instance__instance_id"
    )
    return build(list(rows), list(Service.objects.values_list("name", flat=True)), list(domains))
