"""Operator actions on desired state, shared by management commands, the API and the dashboard.

They only write the database (save() bumps updated_at); a running supervisor
notices within a second and reconciles.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from django.db import transaction
from django.utils import timezone

from instances.ids import InstanceKey, parse_key
from instances.models import Instance, Service, SupervisorHeartbeat

HEARTBEAT_STALE_AFTER = 15.0
SETTLED_STATES = {Instance.State.RUNNING, Instance.State.STOPPED, Instance.State.FAILED}


class OperationError(Exception):
    """A request that cannot be carried out, with a message fit for the operator."""


def get_instance(key: str | InstanceKey) -> Instance:
    parsed = parse_key(key) if isinstance(key, str) else key
    try:
        return Instance.objects.select_related("service").get(
            service__name=parsed.service, instance_id=parsed.instance_id
        )
    except Instance.DoesNotExist:
        if not Service.objects.filter(name=parsed.service).exists():
            raise OperationError(f"no service named {parsed.service!r}") from None
        raise OperationError(f"{parsed} is not registered") from None


@transaction.atomic
def register(key: str | InstanceKey, *, start: bool = True) -> tuple[Instance, bool]:
    """Register a tenant of an existing service. Returns (instance, created)."""
    parsed = parse_key(key) if isinstance(key, str) else key
    service = Service.objects.filter(name=parsed.service).first()
    if service is None:
        raise OperationError(f"no service named {parsed.service!r}")
    desired = Instance.Desired.RUNNING if start else Instance.Desired.STOPPED
    return Instance.objects.get_or_create(
        service=service, instance_id=parsed.instance_id, defaults={"desired_state": desired}
    )


def request_start(key: str | InstanceKey) -> Instance:
    """Desired running; also the manual start that clears a `failed` instance."""
    return _set_desired(get_instance(key), Instance.Desired.RUNNING)


def request_stop(key: str | InstanceKey) -> Instance:
    return _set_desired(get_instance(key), Instance.Desired.STOPPED)


def request_restart(key: str | InstanceKey) -> Instance:
    instance = get_instance(key)
    instance.restart_requested = instance.state == Instance.State.RUNNING
    return _set_desired(instance, Instance.Desired.RUNNING)


def deregister(key: str | InstanceKey) -> Instance:
    """Forget a tenant; its data directory stays. The supervisor stops its process."""
    instance = get_instance(key)
    with transaction.atomic():
        instance.delete()
    return instance


def _set_desired(instance: Instance, desired: str) -> Instance:
    instance.desired_state = desired
    instance.save(update_fields=["desired_state", "restart_requested", "updated_at"])
    return instance


def supervisor_alive(now: float | None = None) -> bool:
    beat = SupervisorHeartbeat.objects.filter(pk=1).first()
    if beat is None:
        return False
    return (now or time.time()) - beat.beat_at.timestamp() < HEARTBEAT_STALE_AFTER


def wait_for_states(pk: int, wanted: Iterable[str], timeout: float, poll: float = 0.1) -> Instance:
    """Poll one row until its state is in `wanted` (the CLI's view from another process)."""
    wanted = set(wanted)
    deadline = time.monotonic() + timeout
    while True:
        instance = Instance.objects.select_related("service").get(pk=pk)
        if instance.state in wanted or time.monotonic() >= deadline:
            return instance
        # A separate process has no event to wait on; a short poll is the honest option.
        time.sleep(poll)


def now_iso() -> str:
    return timezone.now().isoformat(timespec="seconds")
