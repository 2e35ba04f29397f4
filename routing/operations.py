"""Operator actions on releases and weights, shared by the API, the CLI and the dashboard.

Each writes the database in one transaction together with its audit record (who, from,
to), counts tenement_release_changes_total, then pokes the supervisor, which moves
tenants within one loop pass (or within its 1 s sync when it runs in another process).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import IntegrityError, transaction
from pydantic import AfterValidator, Field, ValidationError

from instances import metrics
from instances.config import (
    Template,
    _describe,
    _env_name,
    _health_path,
    _non_empty,
    _Table,
)
from instances.ids import InstanceKey, InvalidName, check_label
from instances.messages import PROXY_GROUP, SUPERVISOR_CHANNEL
from instances.models import Instance, Release, ReleaseChange, Service
from instances.supervisor.store import release_info
from routing.releases import (
    ACTIVE,
    DRAINING,
    FAILED,
    RETIRED,
    RUNNABLE,
    ReleaseInfo,
    base_name,
    bucket,
    effective,
    shares,
)

log = logging.getLogger("tenement.releases")

# The service's own definition, as the first release, when a second is created.
BASE_RELEASE = "v1"
SMOKE_POLL = 0.05


class ReleaseError(Exception):
    """Bad input or a refused change, with a message fit for the operator (400)."""


class NotFoundError(ReleaseError):
    """No such service, release or instance (404)."""


class ConflictError(ReleaseError):
    """The change conflicts with the current state (409)."""


class ReleaseBody(_Table):
    """POST /api/services/NAME/releases: the overrides, as [service.NAME] keys."""

    name: Annotated[str, Field(min_length=1, max_length=63)]
    command: Annotated[Template, AfterValidator(_non_empty)] | None = None
    args: list[Template] | None = None
    env: dict[Annotated[str, AfterValidator(_env_name)], Template] = Field(default_factory=dict)
    health: Annotated[str, AfterValidator(_health_path)] = ""
    weight: Annotated[int, Field(ge=0, le=100)] = 0


# ---- plumbing --------------------------------------------------------------------------


def announce() -> None:
    """Tell the supervisor and the proxies now, rather than at the supervisor's next sync:
    a weight change answered by the API is in force for the next request."""
    if get_channel_layer() is None:
        return
    # Best effort: without it the supervisor still notices within a second.
    try:
        async_to_sync(_announce)()
    except Exception as e:
        log.warning("cannot announce a release change (applied within a second): %s", e)


async def _announce() -> None:
    from instances.supervisor.core import running_here
    from proxy import state as proxy_state
    from routing import table

    layer = get_channel_layer()
    supervisor = running_here()
    if supervisor is not None:
        # Embedded mode: the supervisor has the change before the API answers, so the
        # next wake starts the tenant on its new release.
        await supervisor.sync_now()
    else:
        await layer.send(SUPERVISOR_CHANNEL, {"type": "sync"})
    await layer.group_send(PROXY_GROUP, {"type": "routes.changed"})
    # The proxy in this process (embedded mode) takes the new table before we answer.
    local = proxy_state.existing()
    if local is not None and local.started:
        local.table = await table.load()


def audit(service: str, kind: str, actor: str, **fields: str) -> ReleaseChange:
    change = ReleaseChange.objects.create(service=service, kind=kind, actor=actor, **fields)
    transaction.on_commit(lambda: metrics.release_changed(service, kind))
    return change


def get_service(name: str) -> Service:
    service = Service.objects.filter(name=name).first()
    if service is None:
        raise NotFoundError(f"no service named {name!r}")
    return service


def get_release(service: Service, name: str) -> Release:
    release = Release.objects.filter(service=service, name=name).first()
    if release is None:
        known = ", ".join(service.releases.values_list("name", flat=True)) or "none"
        raise NotFoundError(f"{service.name} has no release {name!r} (releases: {known})")
    return release


def get_instance(key: InstanceKey) -> Instance:
    instance = (
        Instance.objects.select_related("service")
        .filter(service__name=key.service, instance_id=key.instance_id)
        .first()
    )
    if instance is None:
        raise NotFoundError(f"{key} is not registered")
    return instance


def infos(service: Service) -> list[ReleaseInfo]:
    return [release_info(r) for r in service.releases.order_by("created_at", "id")]


def check_placeable(found: Iterable[ReleaseInfo]) -> None:
    """Some active release must keep a weight, or no tenant could be placed."""
    if not any(r.state == ACTIVE and r.weight > 0 for r in found):
        raise ConflictError(
            "that would leave no active release with a weight above 0: tenants would have "
            "nowhere to run; give another release a weight first (or use switch)"
        )


# ---- changes ------------------------------------------------------------------------------


def create(service_name: str, data: Any, actor: str) -> Release:
    """A new release (weight 0 unless given). The first one also records the service's
    own definition as release v1, serving every tenant, so nothing moves yet."""
    try:
        body = ReleaseBody.model_validate(data)
        check_label(body.name, "release name")
    except ValidationError as e:
        raise ReleaseError("; ".join(_describe(err) for err in e.errors())) from None
    except InvalidName as e:
        raise ReleaseError(str(e)) from None
    try:
        with transaction.atomic():
            service = get_service(service_name)
            if not service.releases.exists():
                make_base(service, body.name, actor)
            if service.releases.filter(name=body.name).exists():
                raise ConflictError(f"{service.name} already has a release {body.name!r}")
            release = Release.objects.create(
                service=service,
                name=body.name,
                command=body.command or "",
                args=body.args,
                env=body.env,
                health=body.health,
                weight=0,
                created_by=actor,
            )
            audit(service.name, "create", actor, release=body.name, to_value=body.name)
            if body.weight:
                set_weight_locked(service, release, body.weight, actor)
    except IntegrityError:
        raise ConflictError(f"{service_name} already has a release {body.name!r}") from None
    announce()
    return release


def make_base(service: Service, new_name: str, actor: str) -> Release:
    if new_name == BASE_RELEASE:
        raise ConflictError(
            f"{BASE_RELEASE!r} is the name of the service's own definition (its first "
            "release, made now); give the new release another name, e.g. 'v2'"
        )
    base = Release.objects.create(service=service, name=BASE_RELEASE, weight=100, created_by=actor)
    audit(
        service.name,
        "create",
        actor,
        release=BASE_RELEASE,
        to_value=BASE_RELEASE,
        message="the service's own definition, as its first release",
    )
    return base


def set_weight(service_name: str, name: str, weight: int, actor: str) -> Release:
    if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= 100:
        raise ReleaseError(f"weight must be a whole number from 0 to 100 (got {weight!r})")
    with transaction.atomic():
        service = get_service(service_name)
        release = get_release(service, name)
        set_weight_locked(service, release, weight, actor)
    announce()
    return release


def set_weight_locked(service: Service, release: Release, weight: int, actor: str) -> None:
    if release.state == RETIRED:
        raise ConflictError(f"release {release.name} is retired; create a new one")
    before = (release.weight, release.state)
    release.weight = weight
    if weight > 0:
        release.state = ACTIVE  # a failed or draining release given traffic again
    found = [release_info(release) if r.name == release.name else r for r in infos(service)]
    check_placeable(found)
    release.save()
    audit(
        service.name,
        "weight",
        actor,
        release=release.name,
        from_value=str(before[0]),
        to_value=str(weight),
        message=f"state {before[1]} -> {release.state}" if before[1] != release.state else "",
    )


def switch(service_name: str, name: str, actor: str, kind: str = "switch") -> Release:
    """Blue-green: this release gets 100, every other active one 0 (and drains)."""
    with transaction.atomic():
        service = get_service(service_name)
        release = get_release(service, name)
        if release.state == RETIRED:
            raise ConflictError(f"release {name} is retired; create a new one")
        found = infos(service)
        main = max(shares(found).items(), key=lambda item: item[1], default=("", 0))[0]
        for other in service.releases.exclude(pk=release.pk).filter(state=ACTIVE):
            other.weight, other.state = 0, DRAINING
            other.save()
        release.weight, release.state = 100, ACTIVE
        release.save()
        audit(service.name, kind, actor, release=name, from_value=main, to_value=name)
    announce()
    return release


def rollback(service_name: str, actor: str) -> Release:
    """Switch back to the release the last switch moved away from."""
    last = (
        ReleaseChange.objects.filter(service=service_name, kind__in=("switch", "rollback"))
        .exclude(from_value="")
        .first()
    )
    if last is None:
        raise ConflictError(f"{service_name} has had no switch to roll back")
    return switch(service_name, last.from_value, actor, kind="rollback")


def retire(service_name: str, name: str, actor: str) -> Release:
    with transaction.atomic():
        service = get_service(service_name)
        release = get_release(service, name)
        if release.weight > 0:
            raise ConflictError(f"release {name} still has weight {release.weight}; set it to 0")
        pinned = list(
            service.instances.filter(release=name).values_list("instance_id", flat=True)[:5]
        )
        if pinned:
            raise ConflictError(f"tenants are pinned to {name}: {', '.join(pinned)}; unpin them")
        before = release.state
        release.state = RETIRED
        release.save()
        audit(service.name, "retire", actor, release=name, from_value=before, to_value=RETIRED)
    announce()
    return release


def mark_failed(service: Service, release: Release, actor: str, why: str) -> None:
    before = f"{release.state} weight {release.weight}"
    release.state, release.weight = FAILED, 0
    release.save()
    audit(
        service.name,
        "failed",
        actor,
        release=release.name,
        from_value=before,
        to_value=f"{FAILED} weight 0",
        message=why,
    )


def pin(key: InstanceKey, name: str, actor: str) -> Instance:
    """Pin a tenant to a release ("" unpins: it follows the weights again)."""
    with transaction.atomic():
        instance = get_instance(key)
        if name:
            release = get_release(instance.service, name)
            if release.state not in RUNNABLE:
                raise ConflictError(f"release {name} is {release.state}; a tenant cannot run it")
        before = instance.release
        instance.release = name
        instance.save(update_fields=["release", "updated_at"])
        audit(
            key.service,
            "pin",
            actor,
            release=name or before,
            instance=key.instance_id,
            from_value=before,
            to_value=name,
        )
    announce()
    return instance


def set_instance_weight(key: InstanceKey, weight: int, actor: str) -> Instance:
    """Upstream's weight: the instance's share of its service's weighted host."""
    if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= 100:
        raise ReleaseError(f"weight must be a whole number from 0 to 100 (got {weight!r})")
    with transaction.atomic():
        instance = get_instance(key)
        before = instance.weight
        instance.weight = weight
        instance.save(update_fields=["weight", "updated_at"])
        audit(
            key.service,
            "instance-weight",
            actor,
            instance=key.instance_id,
            from_value=str(before),
            to_value=str(weight),
        )
    announce()
    return instance


def route(service_name: str, source: str, dest: str, actor: str) -> tuple[Instance, Instance]:
    """Upstream's blue-green swap between two instances: from gets 0, to gets 100."""
    with transaction.atomic():
        old = get_instance(InstanceKey(service_name, source))
        new = get_instance(InstanceKey(service_name, dest))
        before = f"{old.weight}/{new.weight}"
        # save(): updated_at moves, so the supervisor re-reads them and the proxies reload.
        for instance, weight in ((old, 0), (new, 100)):
            instance.weight = weight
            instance.save(update_fields=["weight", "updated_at"])
        audit(
            service_name,
            "route",
            actor,
            instance=dest,
            from_value=f"{source} ({before})",
            to_value=f"{dest} (0/100)",
        )
    announce()
    return old, new


# ---- reading -------------------------------------------------------------------------------


@dataclass
class Placement:
    """Where each tenant of a service runs (assigned) and where its process is (running)."""

    assigned: dict[str, str]
    running: dict[str, str]


def placement(service: Service, found: list[ReleaseInfo] | None = None) -> Placement:
    found = infos(service) if found is None else found
    base = base_name(found)
    assigned: dict[str, str] = {}
    running: dict[str, str] = {}
    rows = service.instances.values_list("instance_id", "release", "last_release", "state")
    for instance_id, pinned, last, state in rows:
        name = effective(found, bucket(service.name, instance_id), pin=pinned, last_good=last)
        assigned[instance_id] = name or base
        if state == Instance.State.RUNNING:
            running[instance_id] = last or base
    return Placement(assigned, running)


def summary(service: Service) -> list[dict[str, Any]]:
    """The releases of a service with their split share and tenant counts."""
    found = infos(service)
    split = shares(found)
    where = placement(service, found)
    rows = []
    for r in service.releases.order_by("created_at", "id"):
        rows.append(
            {
                "name": r.name,
                "weight": r.weight,
                "share": split.get(r.name, 0),
                "state": r.state,
                "command": r.command,
                "args": r.args,
                "env": r.env,
                "health": r.health,
                "tenants": sum(1 for n in where.assigned.values() if n == r.name),
                "running": sum(1 for n in where.running.values() if n == r.name),
                "pinned": service.instances.filter(release=r.name).count(),
                "created_by": r.created_by,
                "created_at": r.created_at.isoformat(),
            }
        )
    return rows


def preview(service_name: str, name: str, weight: int) -> dict[str, int]:
    """How many tenants would change release if `name` got `weight` (nothing is saved)."""
    service = get_service(service_name)
    get_release(service, name)
    found = infos(service)
    now = placement(service, found).assigned
    changed = [
        ReleaseInfo(**{**r.__dict__, "weight": weight, "state": ACTIVE if weight else r.state})
        if r.name == name
        else r
        for r in found
    ]
    then = placement(service, changed).assigned
    moving = sum(1 for i in now if now[i] != then.get(i))
    onto = sum(1 for v in then.values() if v == name)
    return {"moving": moving, "tenants": len(now), "onto": onto}


def smoke(service_name: str, name: str, tenant: str, timeout: float, actor: str) -> Instance:
    """Start one tenant on a new release and wait for it to be healthy there. On failure
    the release is failed with weight 0. The tenant's own pin is put back either way."""
    key = InstanceKey(service_name, check_label(tenant))
    instance = get_instance(key)
    previous = instance.release
    pin(key, name, actor)
    # save(), not update(): the supervisor notices rows by their updated_at.
    instance.desired_state = Instance.Desired.RUNNING
    instance.save(update_fields=["desired_state", "updated_at"])
    announce()
    try:
        ok, why = wait_healthy_on(instance.pk, key, name, timeout)
    finally:
        pin(key, previous, actor)
    if not ok:
        with transaction.atomic():
            service = get_service(service_name)
            mark_failed(service, get_release(service, name), actor, f"smoke test on {key}: {why}")
        raise ConflictError(f"smoke test of {name} on {key} failed: {why}; release marked failed")
    return get_instance(key)


def wait_healthy_on(pk: int, key: InstanceKey, name: str, timeout: float) -> tuple[bool, str]:
    """Poll (another process owns the instance) until it runs healthy on `name`."""
    deadline = time.monotonic() + timeout
    since = ReleaseChange.objects.order_by("-id").values_list("id", flat=True).first() or 0
    while time.monotonic() < deadline:
        row = Instance.objects.filter(pk=pk).values("state", "last_release", "last_error").first()
        if row is None:
            return False, "the tenant was deregistered"
        if row["state"] == Instance.State.RUNNING and row["last_release"] == name:
            return True, ""
        fell = ReleaseChange.objects.filter(
            id__gt=since, kind="fallback", service=key.service, instance=key.instance_id
        ).first()
        if fell is not None and fell.release == name:
            return False, fell.message
        if row["state"] == Instance.State.FAILED:
            return False, row["last_error"] or "failed"
        time.sleep(SMOKE_POLL)
    return False, f"not healthy on {name} within {timeout:g}s"
