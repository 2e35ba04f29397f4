"""Running out of file descriptors in the supervisor (a real EMFILE: the process's own
limit lowered below what it has open) is never counted against a tenant."""

from __future__ import annotations

import asyncio
import os
import resource
from collections.abc import Iterator
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async

from instances.ids import InstanceKey
from instances.models import Event, Instance
from instances.supervisor import fds, health
from tests.test_supervisor import make_service, register, supervising, wait_state

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]


# A name of this module's own: instance cgroups are named {service}-{id}, and another
# suite running at the same time must not share (and clean up) ours.
NAME = "fdedge"
KEY = InstanceKey(NAME, "alice")


@pytest.fixture(autouse=True)
def fresh_pressure(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(fds, "pressure", fds.Pressure())
    yield


class Starved:
    """While inside, this process may open no new descriptor (EMFILE)."""

    def __enter__(self) -> None:
        self.limits = resource.getrlimit(resource.RLIMIT_NOFILE)
        # The limit caps descriptor numbers: the lowest free number as the limit leaves
        # no number to hand out.
        lowest_free = os.dup(0)
        os.close(lowest_free)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, self.limits[1]))

    def __exit__(self, *exc: object) -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, self.limits)


async def test_a_health_check_without_descriptors_is_inconclusive(short_tmp: Path) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        writer.close()

    path = str(short_tmp / "h.sock")
    server = await asyncio.start_unix_server(answer, path)
    try:
        assert (await health.check(path, "/health", 2)).ok
        with Starved():
            result = await health.check(path, "/health", 2)
    finally:
        server.close()
    assert not result.ok and result.inconclusive, result
    assert "Too many open files" in result.detail
    assert fds.pressure.recent() and fds.pressure.events == 1


async def test_a_running_tenant_survives_the_supervisor_starving(short_tmp: Path) -> None:
    service = await sync_to_async(make_service)(short_tmp, NAME)
    await sync_to_async(register)(service, "alice")
    # Checks every 0.5 s (each with a 0.5 s timeout: shorter ones fail on a busy machine).
    async with supervising(short_tmp, health_check_interval=0.5) as sup:
        rt = await sup.wake(KEY)
        with Starved():
            await asyncio.sleep(2.5)  # five checks that cannot even open a socket
        assert fds.pressure.events >= 3, fds.pressure
        await asyncio.sleep(1)  # and checks that pass again
        assert rt.state == "running" and rt.health_failures == 0
        failed = await sync_to_async(Event.objects.filter(kind="health_failed").count)()
        assert failed == 0


async def test_crashes_while_out_of_descriptors_are_not_counted(short_tmp: Path) -> None:
    service = await sync_to_async(make_service)(short_tmp, NAME, env={"TESTAPP_EXIT_AFTER": "0"})
    await sync_to_async(register)(service, "alice", desired="running")
    fds.pressure.record("test", OSError(24, "Too many open files"))
    async with supervising(short_tmp, max_restarts=1, backoff_base_ms=50) as sup:
        rt = sup.runtimes[KEY]
        await asyncio.sleep(2.5)  # two retries, each a crash: would be `failed` if counted
        assert rt.state != "failed"
        row = await sync_to_async(Instance.objects.get)(instance_id="alice")
        assert row.restart_count == 0
        deferred = await sync_to_async(
            Event.objects.filter(kind="backoff", message__contains="not counted").count
        )()
        assert deferred >= 2
        fds.pressure = fds.Pressure()  # the shortage ends: crashes count again
        await wait_state(rt, "failed", timeout=10)
