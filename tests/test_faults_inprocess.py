"""Lifecycle faults that need the supervisor in this process (issue 12, defects 9 and 12):
a stop racing the app's own exit, and database work queued behind asgiref's thread."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async
from django.db import OperationalError, connection

from instances.models import Event, Instance
from tests.test_supervisor import KEY, make_service, operator_stop, register, supervising

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]


async def test_defect_09_stop_of_an_app_exiting_at_that_moment(short_tmp: Path) -> None:
    service = await sync_to_async(make_service)(short_tmp)
    await sync_to_async(register)(service, "alice")
    async with supervising(short_tmp) as sup:
        for _ in range(3):
            rt = await sup.wake(KEY)
            # It dies now; the loop notices its exit only on a later turn, while the stop
            # below is already under way.
            os.killpg(rt.proc.pid, signal.SIGKILL)
            await asyncio.wait_for(sup.request_stop(rt, "manual"), 10)  # no AttributeError
        await asyncio.wait_for(operator_stop(sup, KEY), 10)
        assert rt.state == "stopped" and rt.proc is None
    kinds = await sync_to_async(transitions)("alice")
    assert kinds[-1] == "stopped"
    # Never a "stopping" recorded after the "stopped" of the same stop.
    for before, after in itertools.pairwise(kinds):
        assert (before, after) != ("stopped", "stopping"), kinds


def transitions(instance_id: str) -> list[str]:
    rows = Event.objects.filter(instance__instance_id=instance_id).order_by("id")
    return list(rows.values_list("to_state", flat=True))


def read_state(instance_id: str) -> str:
    """The row as another process sees it, read on a thread that is not asgiref's."""
    try:
        return Instance.objects.get(instance_id=instance_id).state
    except OperationalError:  # the in-memory test database locks whole tables: look again
        return ""
    finally:
        connection.close()


async def test_defect_12_lifecycle_writes_do_not_queue_behind_asgiref(short_tmp: Path) -> None:
    service = await sync_to_async(make_service)(short_tmp)
    await sync_to_async(register)(service, "alice")
    async with supervising(short_tmp) as sup:
        # asgiref's single sync thread is busy (a 20 s SQLite busy wait in a dashboard
        # query, say): the supervisor's writes must not wait for it.
        busy = asyncio.create_task(sync_to_async(time.sleep)(5), name="test-busy-asgiref")
        await asyncio.sleep(0.05)
        began = time.monotonic()
        await sup.wake(KEY)
        async with asyncio.timeout(3):
            while await asyncio.to_thread(read_state, "alice") != "running":
                await asyncio.sleep(0.02)
        assert time.monotonic() - began < 3
        await busy
