"""The supervisor: one asyncio loop that owns every instance's lifecycle.

This module is the frame: start-up, the named background tasks, and bounded shutdown.
What each part owns lives in its own module, mixed into one class so that one loop
owns each runtime with no await between deciding and acting:

- desired.py: desired state, synced from the database;
- lifecycle.py: start and stop, and the table of legal transitions;
- monitor.py: health checks, idle reaping, activity;
- wake.py: what the proxy asks for;
- recovery.py: the pid files, and the clean-up after a crash;
- persist.py: the supervisor's own database threads and the write-behind outbox.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from django.conf import settings as django_settings
from django.db import DatabaseError
from django.utils import timezone

from instances.ids import InstanceKey
from instances.models import SupervisorSettings
from instances.supervisor import store
from instances.supervisor.bridge import Bridge
from instances.supervisor.desired import DesiredState, StartupAborted
from instances.supervisor.lifecycle import Lifecycle
from instances.supervisor.logs import FLUSH_INTERVAL, LogCollector
from instances.supervisor.monitor import Monitor
from instances.supervisor.persist import DbThread, Outbox
from instances.supervisor.ports import PortPool
from instances.supervisor.recovery import PidFiles, Recovery
from instances.supervisor.releases import Releases
from instances.supervisor.runtime import Runtime, State
from instances.supervisor.signals import stop_on_signals
from instances.supervisor.wake import InstanceRefused, InstanceUnavailable, Waker
from routing.releases import ReleaseInfo

log = logging.getLogger("tenement.supervisor")

__all__ = ["InstanceRefused", "InstanceUnavailable", "Supervisor", "running_here"]

# The supervisor running on each event loop of this process: /health asks it directly.
_running: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Supervisor] = (
    weakref.WeakKeyDictionary()
)

ACTIVITY_FLUSH_INTERVAL = 5.0
HEARTBEAT_INTERVAL = 5.0
SHUTDOWN_SLACK = 1.0  # on top of the longest stop_timeout, for the exits to be reaped
# At exit the mirror may lag (the pid files do not): wait this long for a write to land,
# and this long in all for a long queue that keeps moving.
MIRROR_FLUSH_TIMEOUT, MIRROR_FLUSH_CAP = 0.5, 1.0


def running_here() -> Supervisor | None:
    """The supervisor serving on the current event loop, if this process runs one."""
    return _running.get(asyncio.get_running_loop())


class Supervisor(DesiredState, Lifecycle, Monitor, Waker, Recovery, Releases):
    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        extra_tasks: dict[str, Callable[[Supervisor], Awaitable[None]]] | None = None,
        drain_tasks: frozenset[str] = frozenset(),
        run_dir: Path | None = None,
    ) -> None:
        self.clock = clock
        self.extra_tasks = extra_tasks or {}
        # Extra tasks given time to finish on their own at shutdown (the HTTP server's
        # drain) while instances still run; they bound that time themselves.
        self.drain_tasks = drain_tasks
        self.runtimes: dict[InstanceKey, Runtime] = {}
        self.by_pk: dict[int, Runtime] = {}
        # service -> its releases, oldest first (routing/releases.py)
        self.releases: dict[str, tuple[ReleaseInfo, ...]] = {}
        # Runtimes not stopped or failed (starting, running, backing off, stopping): the
        # health, idle and backoff timers only ever concern these, so an idle supervisor
        # with 1,000 registered tenants walks the 20 that run, not all 1,000.
        self.awake: dict[int, Runtime] = {}
        self.settings = SupervisorSettings()
        self.reader = DbThread("tenement-db-read")
        self.outbox = Outbox()
        self.logs = LogCollector(DbThread("tenement-db-logs"))
        run_dir = run_dir or Path(django_settings.TENEMENT_DATA_DIR) / "run"
        self.pidfiles = PidFiles(run_dir / "pids")
        self.ports = PortPool()
        self.stop_event = asyncio.Event()
        self.force_event = asyncio.Event()  # a second signal: skip the drain
        self.wakeup = asyncio.Event()
        self.watermark: datetime = timezone.now()
        # The last database fingerprint a sync covered (desired.py): None syncs at once.
        self.desired_fingerprint: tuple[Any, ...] | None = None
        self.next_full_sync = 0.0
        self.started_at = timezone.now()
        self._next_activity_flush = 0.0
        self._next_beat = 0.0
        self._beat_queued = False
        self._health_gate = asyncio.Semaphore(self.MAX_CONCURRENT_HEALTH_CHECKS)
        self._helpers: set[asyncio.Task[Any]] = set()
        self._sync_lock = asyncio.Lock()  # the sync loop's pass and a wake's early one
        # For /health: the named tasks of serve(), and when the reconcile loop last ran.
        self.tasks: list[asyncio.Task[Any]] = []
        self.last_tick = clock()
        self.bridge = Bridge(self, clock)

    # ---- top level -------------------------------------------------------------------

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT or stop_event; stop every instance before returning."""
        loop = asyncio.get_running_loop()
        with stop_on_signals(loop, self.stop_event, self.force_event):
            try:
                await self.startup()
                return await self.serve()
            except StartupAborted:
                return 0  # nothing was started: there is nothing to stop
            finally:
                await self.shutdown()

    async def startup(self) -> None:
        _running[asyncio.get_running_loop()] = self
        # Before anything can start a child: the old ones go first.
        await self.recover()
        await self.load()
        self.beat()
        log.info(
            "supervisor started: %d instances registered",
            len(self.runtimes),
            extra={"event": "supervisor_started", "instances": len(self.runtimes)},
        )

    async def serve(self) -> int:
        """Run the named background tasks; if one dies, stop everything (exit code 1)."""
        factories: dict[str, Callable[[], Awaitable[None]]] = {
            "tenement-reconcile": self.reconcile_loop,
            "tenement-desired": self.desired_loop,
            "tenement-health": self.health_loop,
            "tenement-log-flush": self.log_loop,
            "tenement-storage": self.storage_loop,
            "tenement-bridge": self.bridge.run,
        }
        for name, make in self.extra_tasks.items():
            factories[name] = lambda make=make: make(self)
        self.tasks = tasks = [
            asyncio.create_task(make(), name=name) for name, make in factories.items()
        ]
        stopper = asyncio.create_task(self.stop_event.wait(), name="tenement-stop-wait")
        try:
            done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
            if self.stop_event.is_set():
                self.end_wakes()
                await self.drain(tasks)
        finally:
            for task in [*tasks, stopper]:
                task.cancel()
            await asyncio.gather(*tasks, stopper, return_exceptions=True)
        if self.stop_event.is_set():
            return 0
        for task in done:
            exc = task.exception() if not task.cancelled() else None
            log.error(
                "task %s stopped unexpectedly: %r",
                task.get_name(),
                exc,
                extra={"event": "task_died", "task": task.get_name()},
            )
        return 1

    def end_wakes(self) -> None:
        """Wakes in flight answer now ("shutting down"), not at their timeout: their
        requests are among those the drain is waiting for."""
        for rt in self.runtimes.values():
            rt.notify()

    async def drain(self, tasks: list[asyncio.Task[Any]]) -> None:
        """Let the drain tasks (the HTTP server) finish in-flight work while instances
        still run; they bound it by the drain deadline and cut on a second signal."""
        draining = [t for t in tasks if t.get_name() in self.drain_tasks and not t.done()]
        if draining:
            await asyncio.wait(draining)

    async def shutdown(self) -> None:
        """Stop every instance, bounded by the longest stop_timeout plus slack, whatever
        the database does: nothing here waits on it for more than a moment."""
        live = [rt for rt in self.runtimes.values() if rt.proc is not None or rt.busy]
        if live:
            log.info("stopping %d instances", len(live), extra={"event": "shutdown"})
        deadline = max((rt.run_spec.stop_timeout for rt in live), default=0) + SHUTDOWN_SLACK
        for rt in live:
            self.request_stop(rt, "shutdown")
        pending = [t for rt in live for t in (rt.task, rt.stop_task) if t is not None]
        if pending:
            _done, late = await asyncio.wait(pending, timeout=deadline)
            for task in late:
                log.warning("shutdown deadline passed; cancelling %s", task.get_name())
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await self.cancel_helpers()
        self.queue_activity(force=True)
        self.outbox.put("clear heartbeat", store.clear_heartbeat)
        await self.flush_mirror()
        for thread in (self.reader, self.outbox, self.logs.db):
            thread.close()  # their connections too: nothing of ours outlives the run
        _running.pop(asyncio.get_running_loop(), None)
        log.info("supervisor stopped", extra={"event": "supervisor_stopped"})

    async def cancel_helpers(self) -> None:
        # Log readers end with their pipes; what is left waits on nothing we still need.
        helpers = list(self._helpers)
        if helpers:
            _done, late = await asyncio.wait(helpers, timeout=0.5)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    async def flush_mirror(self) -> None:
        """The last log lines and queued writes, together, for at most MIRROR_FLUSH_CAP."""
        lines = asyncio.create_task(self.logs.flush(), name="tenement-log-final-flush")
        writes = asyncio.create_task(
            self.outbox.flush(MIRROR_FLUSH_TIMEOUT, cap=MIRROR_FLUSH_CAP),
            name="tenement-outbox-final-flush",
        )
        _done, late = await asyncio.wait([lines, writes], timeout=MIRROR_FLUSH_CAP)
        for task in late:
            task.cancel()
        await asyncio.gather(lines, writes, return_exceptions=True)
        if not (writes.done() and not writes.cancelled() and writes.result() is True):
            log.warning(
                "exiting with %d database writes not mirrored (the database is unavailable); "
                "the next start corrects the mirror",
                len(self.outbox),
                extra={"event": "mirror_unflushed", "queued": len(self.outbox)},
            )

    # ---- loops ---------------------------------------------------------------------

    async def reconcile_loop(self) -> None:
        while not self.stop_event.is_set():
            # Clear before the tick, so a poke that arrives during it is not lost.
            self.wakeup.clear()
            self.tick()
            self.last_tick = self.clock()
            await self.wait_for_wakeup(self.seconds_until_next_deadline())

    async def log_loop(self) -> None:
        while not self.stop_event.is_set():
            await survive_database_errors("log flush", self.logs.flush())
            # Sleep until a line arrives (or lines were dropped), then gather a batch for
            # up to FLUSH_INTERVAL: one insert per batch, and no wake-ups while idle.
            await self.wait_for_any("tenement-log", (self.logs.has_lines, self.logs.full))
            await self.wait_for_any("tenement-log", (self.logs.full,), FLUSH_INTERVAL)

    async def wait_for_any(
        self, name: str, events: tuple[asyncio.Event, ...], timeout: float | None = None
    ) -> None:
        """Wait until stop, one of `events`, or the timeout (None: no timeout)."""
        waiters = [asyncio.create_task(self.stop_event.wait(), name=f"{name}-stop")]
        waiters += [asyncio.create_task(e.wait(), name=f"{name}-event") for e in events]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waiters:
                task.cancel()

    async def wait_for_wakeup(self, timeout: float, *, wake: bool = True) -> None:
        """Wait for stop, a poke (if `wake`), or the timeout; never a bare sleep."""
        waiters = [asyncio.create_task(self.stop_event.wait(), name="tenement-wait-stop")]
        if wake:
            waiters.append(asyncio.create_task(self.wakeup.wait(), name="tenement-wait-poke"))
        try:
            await asyncio.wait(waiters, timeout=max(0.0, timeout), return_when="FIRST_COMPLETED")
        finally:
            for task in waiters:
                task.cancel()

    def poke(self) -> None:
        """Ask the reconcile loop to run now (a change, a finished start or stop)."""
        self.wakeup.set()

    def seconds_until_next_deadline(self) -> float:
        now = self.clock()
        due = [self._next_activity_flush, self._next_beat]
        for rt in self.awake.values():
            if rt.state == State.BACKOFF:
                due.append(rt.backoff_until)
            elif self.may_idle(rt):
                due.append(rt.last_activity + rt.spec.idle_timeout)
        return min(d - now for d in due)

    def tick(self) -> bool:
        """One pass of everything that is due; returns whether anything happened.

        Nothing here awaits: writes go to the outbox, reads to the desired-state loop."""
        now = self.clock()
        did = self.move_releases()
        did |= self.reconcile()
        did |= self.bridge.prune()
        did |= self.reap_idle()
        if now >= self._next_activity_flush:
            self._next_activity_flush = now + ACTIVITY_FLUSH_INTERVAL
            did |= self.queue_activity()
        if now >= self._next_beat:
            self._next_beat = now + HEARTBEAT_INTERVAL
            self.beat()
        return did

    def beat(self) -> None:
        """Queue a heartbeat, unless the last one has not landed yet (an outage must not
        fill the outbox with beats)."""
        if self._beat_queued:
            return
        self._beat_queued = True

        def write() -> None:
            self._beat_queued = False
            store.beat(self.started_at)

        self.outbox.put("heartbeat", write)

    def spawn_helper(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._helpers.add(task)
        task.add_done_callback(self._helpers.discard)


async def survive_database_errors(what: str, work: Awaitable[Any]) -> None:
    """A locked or briefly unreachable database must not take every instance down."""
    try:
        await work
    except DatabaseError as e:
        log.warning(
            "%s: database error, retrying on the next pass: %s",
            what,
            e,
            extra={"event": "database_error", "during": what},
        )
