"""Closes a step of the dashboard's charts (instances/timeline.py) every step: how many
instances run and how much memory each holds."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

import psutil

from instances import timeline
from instances.ids import InstanceKey
from instances.supervisor.runtime import State

if TYPE_CHECKING:
    from instances.supervisor import Supervisor


def rss_of(pids: dict[InstanceKey, int]) -> dict[InstanceKey, int]:
    """Resident memory of each process and its descendants (as the API's `rss`)."""
    out = {}
    for key, pid in pids.items():
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            out[key] = sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
    return out


async def sample_loop(supervisor: Supervisor) -> None:
    """A supervisor task: one point per step until the supervisor stops."""
    line = timeline.current()
    while not supervisor.stop_event.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(supervisor.stop_event.wait(), line.step)
        if supervisor.stop_event.is_set():
            return
        running = [rt for rt in supervisor.runtimes.values() if rt.state == State.RUNNING]
        pids = {rt.key: rt.proc.pid for rt in running if rt.proc is not None}
        # /proc reads for every running tenant: off the event loop.
        rss = await asyncio.to_thread(rss_of, pids)
        line.roll(len(running), rss)
