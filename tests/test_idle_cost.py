"""What keeps an idle supervisor cheap, and that it still sees every change.

The desired-state loop polls a one-statement fingerprint instead of the ORM reads, and
the health/idle/backoff timers walk only the runtimes that are awake. These check that
the shortcuts never hide a change an operator made.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from instances import operations as ops
from instances.ids import InstanceKey
from instances.models import Instance, Service
from instances.supervisor import store
from instances.supervisor.desired import WATERMARK_GRACE
from instances.supervisor.runtime import State
from tests.test_supervisor import make_service, register, supervising, wait_state

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]


def _fingerprint() -> tuple[object, ...]:
    return store.fingerprint(timezone.now() - WATERMARK_GRACE)


def test_the_fingerprint_moves_for_every_change_an_operator_makes(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    register(service, "alice")
    seen = _fingerprint()

    def changed() -> bool:
        nonlocal seen
        now = _fingerprint()
        moved, seen = now != seen, now
        return moved

    assert not changed()  # nothing happened: the same answer
    register(service, "bob")
    assert changed()  # a new row
    ops.request_start("app:bob")
    assert changed()  # desired state
    Instance.objects.filter(instance_id="bob").delete()
    assert changed()  # a removed row
    service.idle_timeout = 7
    service.save()
    assert changed()  # a service's definition


def test_the_supervisors_own_mirror_writes_do_not_move_it(tmp_path: Path) -> None:
    register(make_service(tmp_path), "alice")
    before = _fingerprint()
    row = Instance.objects.get(instance_id="alice")
    store.update(row.pk, state=State.RUNNING, pid=4242)  # what the outbox writes
    assert _fingerprint() == before


def test_a_change_committed_late_with_an_older_stamp_still_moves_it(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    register(service, "alice", "bob")
    Instance.objects.filter(instance_id="bob").update(updated_at=timezone.now())
    seen = _fingerprint()
    # alice's writer stamped its change before bob's, but committed after it: the newest
    # stamp does not move, the count of recent changes does.
    stamp = Instance.objects.get(instance_id="bob").updated_at - timedelta(seconds=1)
    Instance.objects.filter(instance_id="alice").update(desired_state="running", updated_at=stamp)
    assert _fingerprint() != seen


async def test_changes_reach_the_supervisor_and_only_awake_runtimes_are_walked(
    tmp_path: Path,
) -> None:
    service = await sync_to_async(make_service)(tmp_path)
    await sync_to_async(register)(service, *[f"t{i}" for i in range(30)])
    async with supervising(tmp_path) as sup:
        assert len(sup.runtimes) == 30 and sup.awake == {}
        await sync_to_async(ops.request_start)("app:t3")
        rt = sup.runtimes[InstanceKey("app", "t3")]
        await wait_state(rt, State.RUNNING, timeout=30)
        assert list(sup.awake) == [rt.pk]
        await sync_to_async(ops.request_stop)("app:t3")
        await wait_state(rt, State.STOPPED, timeout=30)
        assert sup.awake == {}
        # A service edited in the database reaches every runtime of it.
        await sync_to_async(Service.objects.filter(pk=service.pk).update)(
            idle_timeout=9, updated_at=timezone.now()
        )
        async with asyncio.timeout(10):
            while {r.spec.idle_timeout for r in sup.runtimes.values()} != {9}:
                await asyncio.sleep(0.05)
