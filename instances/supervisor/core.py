"""The supervisor: one asyncio loop that owns every instance's lifecycle.

States: stopped -> starting -> running -> stopping -> stopped, plus backoff and
failed. Each tick method does one unit of work and says whether it did anything,
so tests can drive single ticks without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings as django_settings
from django.db import DatabaseError
from django.utils import timezone

from instances import metrics
from instances.config import parse_uid_range
from instances.ids import InstanceKey
from instances.models import Instance, SupervisorSettings
from instances.spec import ServiceSpec
from instances.supervisor import fds, health, isolation, process, storage, store
from instances.supervisor.backoff import RestartPolicy
from instances.supervisor.bridge import GOING_AWAY, RESTARTING, Bridge
from instances.supervisor.logs import LogCollector
from instances.supervisor.runtime import EXPECTED_STOPS, Desired, Runtime, State
from instances.supervisor.signals import stop_on_signals

log = logging.getLogger("tenement.supervisor")

# The supervisor running on each event loop of this process: /health asks it directly.
_running: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Supervisor] = (
    weakref.WeakKeyDictionary()
)

SYNC_INTERVAL = 1.0  # other processes' changes take effect within this
# updated_at is stamped before the writer commits; look back this far so a slow commit is
# not missed (seen_version drops the rows we already applied).
WATERMARK_GRACE = timedelta(seconds=5)
ACTIVITY_FLUSH_INTERVAL = 5.0
HEARTBEAT_INTERVAL = 5.0
HEALTH_FAILURES_BEFORE_RESTART = 3
MAX_HEALTH_TIMEOUT = 5.0
MAX_CONCURRENT_HEALTH_CHECKS = 64
SHUTDOWN_SLACK = 5.0
FAST_PROBE, FAST_PROBE_FOR, SLOW_PROBE = 0.005, 2.0, 0.05
SUSPECT_PROBE_TIMEOUT = 1.0
UNHEALTHY = "unhealthy: "  # how a health-check failure's reason starts
OOM = "oom: "  # how an out-of-memory kill's reason starts
EXIT_NOTICE_TIMEOUT = 2.0


def running_here() -> Supervisor | None:
    """The supervisor serving on the current event loop, if this process runs one."""
    return _running.get(asyncio.get_running_loop())


class InstanceUnavailable(Exception):
    """A wake could not produce a running instance (unknown, failed, or timed out)."""


class InstanceRefused(InstanceUnavailable):
    """The instance was already failed: the wake did not try to start it."""


class Supervisor:
    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        extra_tasks: dict[str, Callable[[Supervisor], Awaitable[None]]] | None = None,
    ) -> None:
        self.clock = clock
        self.extra_tasks = extra_tasks or {}
        self.runtimes: dict[InstanceKey, Runtime] = {}
        self.by_pk: dict[int, Runtime] = {}
        self.settings = SupervisorSettings()
        self.logs = LogCollector()
        self.stop_event = asyncio.Event()
        self.wakeup = asyncio.Event()
        self.watermark: datetime = timezone.now()
        self.started_at = timezone.now()
        self._next_sync = 0.0
        self._next_activity_flush = 0.0
        self._next_beat = 0.0
        self._health_gate = asyncio.Semaphore(MAX_CONCURRENT_HEALTH_CHECKS)
        self._helpers: set[asyncio.Task[Any]] = set()
        self._sync_lock = asyncio.Lock()  # the loop's sync and a wake's early one
        # For /health: the named tasks of serve(), and when the reconcile loop last ran.
        self.tasks: list[asyncio.Task[Any]] = []
        self.last_tick = clock()
        self.bridge = Bridge(self, clock)

    # ---- top level -------------------------------------------------------------------

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT or stop_event; stop every instance before returning."""
        loop = asyncio.get_running_loop()
        with stop_on_signals(loop, self.stop_event):
            await self.startup()
            try:
                return await self.serve()
            finally:
                await self.shutdown()

    async def startup(self) -> None:
        _running[asyncio.get_running_loop()] = self
        await self.recover()
        await self.load()
        await store.beat(self.started_at)
        log.info(
            "supervisor started: %d instances registered",
            len(self.runtimes),
            extra={"event": "supervisor_started", "instances": len(self.runtimes)},
        )

    async def serve(self) -> int:
        """Run the named background tasks; if one dies, stop everything (exit code 1)."""
        factories: dict[str, Callable[[], Awaitable[None]]] = {
            "tenement-reconcile": self.reconcile_loop,
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
        finally:
            for task in [*tasks, stopper]:
                task.cancel()
            await asyncio.gather(*tasks, stopper, return_exceptions=True)
        if self.stop_event.is_set():
            return 0  # loops return on their own once stop is set
        for task in done:
            exc = task.exception() if not task.cancelled() else None
            log.error(
                "task %s stopped unexpectedly: %r",
                task.get_name(),
                exc,
                extra={"event": "task_died", "task": task.get_name()},
            )
        return 1

    async def shutdown(self) -> None:
        """Stop every instance, bounded by the longest stop_timeout plus slack."""
        live = [rt for rt in self.runtimes.values() if rt.proc is not None or rt.busy]
        if live:
            log.info("stopping %d instances", len(live), extra={"event": "shutdown"})
        deadline = max((rt.run_spec.stop_timeout for rt in live), default=0) + SHUTDOWN_SLACK
        for rt in live:
            self.request_stop(rt, "shutdown")
        pending = [t for rt in live for t in (rt.task, rt.stop_task) if t is not None]
        pending += list(self._helpers)
        if pending:
            _done, late = await asyncio.wait(pending, timeout=deadline)
            for task in late:
                log.warning("shutdown deadline passed; cancelling %s", task.get_name())
                task.cancel()
        await self.logs.flush()
        await self.flush_activity(force=True)
        await store.clear_heartbeat()
        _running.pop(asyncio.get_running_loop(), None)
        log.info("supervisor stopped", extra={"event": "supervisor_stopped"})

    # ---- loops ---------------------------------------------------------------------

    async def reconcile_loop(self) -> None:
        while not self.stop_event.is_set():
            # Clear before the tick, so a poke that arrives during it is not lost.
            self.wakeup.clear()
            await survive_database_errors("reconcile", self.tick())
            self.last_tick = self.clock()
            await self.wait_for_wakeup(self.seconds_until_next_deadline())

    async def health_loop(self) -> None:
        while not self.stop_event.is_set():
            await survive_database_errors("health check", self.check_health())
            await self.wait_for_wakeup(self.seconds_until_health_due(), wake=False)

    def seconds_until_health_due(self) -> float:
        interval = self.settings.health_check_interval
        now = self.clock()
        due = [rt.next_health - now for rt in self.runtimes.values() if self.health_applies(rt)]
        # New instances become due a full interval after they start, so `interval` is a safe cap.
        return max(0.01, min([interval, *due]))

    async def storage_loop(self) -> None:
        while not self.stop_event.is_set():
            await survive_database_errors("storage check", self.check_storage())
            interval = float(getattr(django_settings, "TENEMENT_STORAGE_CHECK_SECONDS", 60))
            await self.wait_for_wakeup(interval, wake=False)

    async def check_storage(self) -> bool:
        """Measure the data dir of every running instance with a quota; record crossings
        of 80% and 100%. Returns whether any level changed."""
        changed = False
        for rt in list(self.runtimes.values()):
            quota = rt.run_spec.storage_quota_mb
            if not quota or rt.state != State.RUNNING:
                continue
            folder = rt.run_spec.instance_dir(rt.key.instance_id)
            used, complete = await asyncio.to_thread(storage.measure, folder)
            mark = storage.level(used, quota)
            if mark != rt.storage_level:
                changed = True
                rt.storage_level = mark
                await self.storage_crossed(rt, mark, used, complete)
        return changed

    async def storage_crossed(self, rt: Runtime, mark: int, used: int, complete: bool) -> None:
        quota = rt.run_spec.storage_quota_mb
        size = f"{'at least ' if not complete else ''}{used / 2**20:.1f} MiB"
        message = f"data dir uses {size} of storage_quota_mb = {quota} ({mark or 'below 80'}%)"
        kind = {100: "storage_full", 80: "storage_high"}.get(mark, "storage_ok")
        log.log(
            logging.WARNING if mark else logging.INFO,
            "%s: %s",
            rt.key,
            message,
            extra={"event": kind, "instance": rt.key, "used_bytes": used},
        )
        await store.record_event(rt.pk, kind, message)

    async def log_loop(self) -> None:
        while not self.stop_event.is_set():
            await survive_database_errors("log flush", self.logs.flush())
            full = asyncio.create_task(self.logs.full.wait(), name="tenement-log-full")
            stop = asyncio.create_task(self.stop_event.wait(), name="tenement-log-stop")
            _, pending = await asyncio.wait(
                [full, stop], timeout=0.25, return_when=asyncio.FIRST_COMPLETED
            )
            for task in pending:
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
        due = [self._next_sync, self._next_activity_flush, self._next_beat]
        for rt in self.runtimes.values():
            if rt.state == State.BACKOFF:
                due.append(rt.backoff_until)
            elif self.may_idle(rt):
                due.append(rt.last_activity + rt.spec.idle_timeout)
        return min(d - now for d in due)

    async def tick(self) -> bool:
        """One pass of everything that is due; returns whether anything happened."""
        now = self.clock()
        did = False
        if now >= self._next_sync:
            self._next_sync = now + SYNC_INTERVAL
            async with self._sync_lock:
                did |= await self.sync_desired()
        did |= self.reconcile()
        did |= self.bridge.prune()
        did |= await self.reap_idle()
        if now >= self._next_activity_flush:
            self._next_activity_flush = now + ACTIVITY_FLUSH_INTERVAL
            did |= await self.flush_activity()
        if now >= self._next_beat:
            self._next_beat = now + HEARTBEAT_INTERVAL
            await store.beat(self.started_at)
        return did

    # ---- desired state ------------------------------------------------------------

    async def load(self) -> None:
        self.settings = await store.load_settings()
        self.watermark = timezone.now()
        for row in await store.load_instances():
            self.add_runtime(row)

    def add_runtime(self, row: Instance) -> Runtime:
        key = InstanceKey(row.service.name, row.instance_id)
        if (old := self.runtimes.get(key)) is not None and old.pk != row.pk:
            self.forget(old)  # deleted and registered again under the same key
        rt = Runtime(
            pk=row.pk,
            key=key,
            spec=ServiceSpec.from_model(row.service),
            policy=self.new_policy(),
            desired=row.desired_state,
            state=row.state,
            always_on=row.always_on,
            seen_version=row.updated_at,
        )
        rt.restart_pending = row.restart_requested
        rt.uid = row.uid
        self.runtimes[key] = rt
        self.by_pk[rt.pk] = rt
        self.bridge.routes_changed()
        return rt

    def new_policy(self) -> RestartPolicy:
        s = self.settings
        return RestartPolicy(s.max_restarts, s.restart_window, s.backoff_base_ms, s.backoff_max_ms)

    async def sync_desired(self) -> bool:
        """Pick up changes other processes made to the database since the last look."""
        started = timezone.now()
        changes = await store.changes_since(self.watermark)
        did = self.apply_settings(changes.settings)
        specs = {s.name: ServiceSpec.from_model(s) for s in changes.services}
        for rt in self.runtimes.values():
            if rt.key.service in specs and rt.spec != specs[rt.key.service]:
                rt.spec = specs[rt.key.service]
                self.bridge.routes_changed()  # the proxy's timeouts may have changed
                did = True
        for row in changes.instances:
            did |= await self.apply_row(row)
        if changes.instance_count != len(self.by_pk):
            did |= await self.drop_deleted()
        # Only now: a failure above retries the same window on the next pass.
        self.watermark = started - WATERMARK_GRACE
        return did

    def apply_settings(self, current: SupervisorSettings) -> bool:
        fields = (
            "health_check_interval",
            "max_restarts",
            "restart_window",
            "backoff_base_ms",
            "backoff_max_ms",
            "uid_range",
        )
        if all(getattr(current, f) == getattr(self.settings, f) for f in fields):
            return False
        self.settings = current
        for rt in self.runtimes.values():
            history = rt.policy.history
            rt.policy = self.new_policy()
            rt.policy.history = history
        return True

    async def apply_row(self, row: Instance) -> bool:
        rt = self.by_pk.get(row.pk)
        if rt is None:
            self.add_runtime(row)
            return True
        if row.updated_at == rt.seen_version:
            return False
        rt.desired = row.desired_state
        rt.always_on = row.always_on
        rt.spec = ServiceSpec.from_model(row.service)
        if row.restart_requested:
            rt.restart_pending = True
            await store.clear_restart_request(rt.pk)
        if rt.state == State.FAILED and rt.desired == Desired.RUNNING:
            await self.clear_failed(rt, "manual start")
        rt.seen_version = row.updated_at
        return True

    async def clear_failed(self, rt: Runtime, why: str) -> None:
        rt.policy.reset()
        self.bridge.down(rt)  # proxies stop refusing it at once
        await self.set_state(rt, State.STOPPED, "reset", f"failed state cleared by {why}")

    async def drop_deleted(self) -> bool:
        rows = await store.load_instances()
        present = {row.pk for row in rows}
        gone = [rt for rt in self.by_pk.values() if rt.pk not in present]
        for rt in gone:
            self.forget(rt)
        # A row committed late (older updated_at than our watermark) shows up here too.
        added = [self.add_runtime(row) for row in rows if row.pk not in self.by_pk]
        return bool(gone or added)

    def forget(self, rt: Runtime) -> None:
        """Drop a deregistered instance, stopping its process if it has one."""
        log.info(
            "%s was deregistered; stopping it",
            rt.key,
            extra={"event": "deregistered", "instance": rt.key},
        )
        self.request_stop(rt, "removed")
        self.by_pk.pop(rt.pk, None)
        if self.runtimes.get(rt.key) is rt:
            del self.runtimes[rt.key]
        self.bridge.routes_changed()
        rt.notify()

    # ---- reconcile ------------------------------------------------------------------

    def reconcile(self) -> bool:
        """Start or stop whatever differs from desired state. Returns whether it acted."""
        now = self.clock()
        acted = False
        for rt in list(self.runtimes.values()):
            if rt.stop_in_flight:
                continue
            action = self.decide(rt, now)
            if action == "start" and rt.has_process:
                continue  # already starting or running, or its last exit is being recorded
            if action == "start":
                self.start(rt)
            elif action == "stop":
                self.request_stop(rt, "manual")
            elif action == "restart":
                rt.restart_pending = False
                metrics.restarted(rt.key, "manual")
                self.request_stop(rt, "restart")
            elif action == "settle":
                self.spawn_helper(self.set_state(rt, State.STOPPED, "stopped", "desired stopped"))
            acted |= action is not None
        return acted

    @staticmethod
    def decide(rt: Runtime, now: float) -> str | None:
        """The reconcile rule for one instance with no stop in flight, as a pure function."""
        if rt.state == State.FAILED:
            return None
        if rt.desired == Desired.STOPPED:
            if rt.state in (State.RUNNING, State.STARTING):
                return "stop"
            return "settle" if rt.state == State.BACKOFF else None
        if rt.state == State.RUNNING:
            return "restart" if rt.restart_pending else None
        if rt.state == State.BACKOFF and now < rt.backoff_until:
            return None
        return "start"

    def spawn_helper(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._helpers.add(task)
        task.add_done_callback(self._helpers.discard)

    # ---- lifecycle of one process -----------------------------------------------------

    def start(self, rt: Runtime) -> asyncio.Task[None]:
        """Begin a start attempt; the task owns the process until it exits."""
        rt.stopping = rt.failure = None
        rt.restart_pending = False
        # A config change applies from the next start; this process keeps its own spec.
        rt.proc_spec = rt.spec
        rt.task = asyncio.create_task(self.lifecycle(rt), name=f"instance {rt.key}")
        return rt.task

    async def lifecycle(self, rt: Runtime) -> None:
        try:
            await self.run_process(rt)
        except Exception as e:
            # A bug here must not become a tight restart loop: treat it as a failed start.
            log.exception(
                "%s: internal error in its lifecycle",
                rt.key,
                extra={"event": "internal_error", "instance": rt.key},
            )
            if rt.proc is not None:
                await process.terminate(rt.proc, rt.run_spec.stop_timeout)
            await self.handle_failure(rt, f"internal error: {e!r}")
        finally:
            if rt.cgroup is not None:  # an internal error skipped after_exit's clean-up
                await asyncio.to_thread(rt.cgroup.remove)
                rt.cgroup = None
            rt.proc = None
            rt.ready.clear()
            rt.notify()
            self.poke()

    async def run_process(self, rt: Runtime) -> None:
        """Spawn, gate on readiness, wait for the exit, then record what happened."""
        proc = await self.spawn_process(rt)
        if proc is None:
            return
        if await self.await_ready(rt, proc):
            await self.mark_running(rt)
            await proc.wait()
        elif rt.stopping is None and proc.returncode is None:
            # (If it already exited, after_exit reports how: that is the real reason.)
            rt.failure = f"not healthy within startup_timeout ({rt.run_spec.startup_timeout:g}s)"
            await process.terminate(proc, rt.run_spec.stop_timeout)
        code = await proc.wait()
        await self.after_exit(rt, code)

    async def spawn_process(self, rt: Runtime) -> asyncio.subprocess.Process | None:
        # Spawn before writing anything: a request may be held on this start, and the app
        # boots while the database records it.
        try:
            launch = await process.spawn(rt.run_spec, rt.key.instance_id, self.uid_for(rt))
        except (process.SpawnError, ValueError, OSError) as e:
            await self.set_state(rt, State.STARTING, "starting", f"starting {rt.key}")
            await self.handle_failure(rt, str(e))
            return None
        rt.proc = proc = launch.proc
        rt.cgroup = launch.cgroup
        rt.started_at = self.clock()
        self.attach_logs(rt, proc)
        message = f"starting {rt.key} (pid {proc.pid})"
        old = self.enter_state(rt, State.STARTING, message)
        record = store.transition(
            rt.pk,
            old,
            State.STARTING,
            "starting",
            message,
            pid=proc.pid,
            pid_create_time=process.start_ticks(proc.pid),
            socket_path=rt.run_spec.socket_path(rt.key.instance_id),
            started_at=timezone.now(),
            uid=rt.uid,
            isolation=launch.isolation,
        )
        # Not awaited: the readiness probes start now, not after a busy database (a log
        # flush can hold it for tens of ms) has taken the record. Writes reach the
        # database thread in the order they are made, so this one lands first.
        self.spawn_helper(survive_database_errors("record a start", record))
        if rt.stopping:  # a stop arrived while we were spawning
            await process.terminate(proc, rt.run_spec.stop_timeout)
        return proc

    def attach_logs(self, rt: Runtime, proc: asyncio.subprocess.Process) -> None:
        self.logs.retention[rt.pk] = rt.run_spec.log_retention_lines
        for name, pipe in (("stdout", proc.stdout), ("stderr", proc.stderr)):
            if pipe is not None:
                counted = metrics.log_line_counter(rt.key, name)
                self.spawn_helper(self.logs.capture(rt.pk, name, pipe, counted))

    async def await_ready(self, rt: Runtime, proc: asyncio.subprocess.Process) -> bool:
        """Probe until the first healthy answer, the process exits, a stop, or the deadline."""
        deadline = self.clock() + rt.run_spec.startup_timeout
        delay = 0.002
        exited = asyncio.create_task(proc.wait(), name=f"exit-watch {rt.key}")
        try:
            while not exited.done() and not rt.stopping:
                left = deadline - self.clock()
                if left <= 0:
                    return False
                result = await self.probe(rt, min(left, MAX_HEALTH_TIMEOUT))
                if result.ok:
                    return not rt.stopping  # a stop that arrived during the probe wins
                # Wait for the process to exit or the next probe, whichever comes first.
                await asyncio.wait([exited], timeout=min(delay, max(0.0, left)))
                delay = min(delay * 1.5, self.probe_cap(rt))
            return False
        finally:
            exited.cancel()

    def probe_cap(self, rt: Runtime) -> float:
        """Probe every 5 ms for the first 2 s: a request may be held on this wake, and
        most apps are up within that; then every 50 ms, so a slow start costs little."""
        return FAST_PROBE if self.clock() - rt.started_at < FAST_PROBE_FOR else SLOW_PROBE

    async def mark_running(self, rt: Runtime) -> None:
        rt.last_activity = rt.activity_reported = self.clock()
        rt.health_failures = 0
        rt.health_ok = True
        rt.next_health = self.clock() + self.settings.health_check_interval
        took = (self.clock() - rt.started_at) * 1000
        # Release waiting requests first; the database write can follow.
        rt.ready.set()
        self.bridge.ready(rt)
        await self.set_state(
            rt,
            State.RUNNING,
            "ready",
            f"ready in {took:.0f} ms (pid {rt.proc.pid if rt.proc else '?'})",
            health_ok=True,
            health_checked_at=timezone.now(),
            last_activity=timezone.now(),
            last_error="",
        )

    def uid_for(self, rt: Runtime) -> int | None:
        """The tenant's own uid (as root): stored with the row, else a stable new one."""
        if rt.uid is None and isolation.host().root and not rt.run_spec.user:
            taken = {r.uid for r in self.runtimes.values() if r.uid is not None}
            uids = parse_uid_range(self.settings.uid_range)
            rt.uid = isolation.allocate_uid(rt.pk, uids, taken)
        return rt.uid

    async def after_exit(self, rt: Runtime, code: int) -> None:
        self.bridge.down(rt)
        spec, group, rt.cgroup = rt.run_spec, rt.cgroup, None
        # Off the loop: removing a cgroup waits for its killed leftovers to be reaped.
        oom = await asyncio.to_thread(process.cleanup, spec, rt.key.instance_id, group)
        code = isolation.exit_code(code, spec)
        how = process.describe_exit(code)
        if oom and rt.stopping not in EXPECTED_STOPS:
            rt.failure = f"{OOM}killed by the kernel at memory_limit_mb = {spec.memory_limit_mb}"
        if rt.stopping in EXPECTED_STOPS:
            if not spec.storage_persist:
                await asyncio.to_thread(process.wipe_data, spec, rt.key.instance_id)
            await self.set_state(
                rt,
                State.STOPPED,
                "stopped",
                f"stopped ({rt.stopping}): {how}",
                pid=None,
                last_exit_code=code,
            )
            return
        reason = rt.failure or f"crashed: {how}"
        await store.update(rt.pk, last_exit_code=code)
        await self.handle_failure(rt, reason)

    async def handle_failure(self, rt: Runtime, reason: str) -> None:
        """A crash or failed start: back off and retry, or give up as failed."""
        rt.failure = reason
        if fds.pressure.recent():
            await self.defer_restart(rt, reason)
            return
        delay = rt.policy.next_delay(self.clock())
        if delay is None:
            log.error(
                "%s failed: %s; restarted too often, giving up",
                rt.key,
                reason,
                extra={"event": "failed", "instance": rt.key, "reason": reason},
            )
            self.bridge.down(rt, failed=True)
            await self.set_state(
                rt,
                State.FAILED,
                "failed",
                f"{reason}; more than {self.settings.max_restarts} restarts in "
                f"{self.settings.restart_window:g}s: giving up until a manual start",
                pid=None,
                last_error=reason,
            )
            return
        rt.backoff_until = self.clock() + delay
        # health_failed's failures start with UNHEALTHY; every other one is a crash.
        metrics.restarted(rt.key, restart_reason(reason))
        log.warning(
            "%s: %s; restarting in %.2fs",
            rt.key,
            reason,
            delay,
            extra={
                "event": "backoff",
                "instance": rt.key,
                "reason": reason,
                "delay_s": round(delay, 3),
            },
        )
        await self.set_state(
            rt,
            State.BACKOFF,
            "backoff",
            f"{reason}; restarting in {delay:.2f}s",
            pid=None,
            last_error=reason,
            restart_count=_plus_one(),
        )

    async def defer_restart(self, rt: Runtime, reason: str) -> None:
        """The supervisor ran out of file descriptors: retry soon, not counted toward
        max_restarts (instances/supervisor/fds.py)."""
        rt.backoff_until = self.clock() + fds.RETRY_S
        await self.set_state(
            rt,
            State.BACKOFF,
            "backoff",
            f"{reason}; the supervisor is out of file descriptors: retrying in "
            f"{fds.RETRY_S:g}s, not counted toward max_restarts",
            pid=None,
            last_error=reason,
        )

    def request_stop(self, rt: Runtime, reason: str) -> asyncio.Task[None] | None:
        """Stop an instance for `reason`; returns the task, or None if nothing to stop."""
        if rt.stop_task is not None and not rt.stop_task.done():
            return rt.stop_task
        rt.stopping = reason
        rt.ready.clear()
        # Before the SIGTERM, so proxies close WebSockets cleanly rather than see a reset.
        self.bridge.down(rt, code=RESTARTING if reason == "restart" else GOING_AWAY)
        if rt.task is None or rt.task.done():
            if rt.state == State.BACKOFF:
                self.spawn_helper(self.set_state(rt, State.STOPPED, "stopped", reason))
            return None
        rt.stop_task = asyncio.create_task(self.stop(rt, reason), name=f"stop {rt.key}")
        return rt.stop_task

    async def stop(self, rt: Runtime, reason: str) -> None:
        # With no process yet, spawn_process sees rt.stopping and stops what it starts.
        if rt.proc is not None:
            await self.set_state(rt, State.STOPPING, "stopping", f"stopping ({reason})")
            await process.terminate(rt.proc, rt.run_spec.stop_timeout)
        if rt.task is not None:
            await rt.task
        rt.notify()  # wakers waiting on a stop-in-flight re-check now

    # ---- periodic duties --------------------------------------------------------------

    async def check_health(self) -> bool:
        """Health-check every running instance that is due. Returns whether any ran."""
        now = self.clock()
        due = [
            rt for rt in self.runtimes.values() if self.health_applies(rt) and now >= rt.next_health
        ]
        if due:
            await asyncio.gather(*(self.check_one(rt) for rt in due))
        return bool(due)

    @staticmethod
    def health_applies(rt: Runtime) -> bool:
        return rt.state == State.RUNNING and rt.stopping is None and rt.failure is None

    async def check_one(self, rt: Runtime) -> None:
        interval = self.settings.health_check_interval
        rt.next_health = self.clock() + interval
        async with self._health_gate:
            result = await self.probe(rt, min(interval, MAX_HEALTH_TIMEOUT))
        if rt.state != State.RUNNING or rt.stopping:
            return  # it was stopped while we were checking
        if result.inconclusive:
            return  # we could not check (out of file descriptors): no verdict on the app
        if result.ok:
            await self.health_passed(rt)
        else:
            await self.health_failed(rt, result.detail)

    @staticmethod
    async def probe(rt: Runtime, timeout: float) -> health.HealthResult:
        """One health check against the spec the process was started with."""
        spec = rt.run_spec
        try:
            return await health.check(spec.socket_path(rt.key.instance_id), spec.health, timeout)
        except Exception as e:  # a bad path or template must fail the check, not the loop
            return health.HealthResult(False, f"cannot run the health check: {e}")

    async def health_passed(self, rt: Runtime) -> None:
        rt.health_failures = 0
        if rt.health_ok is not True:
            rt.health_ok = True
            await store.update(rt.pk, health_ok=True, health_checked_at=timezone.now())

    async def health_failed(self, rt: Runtime, detail: str) -> None:
        rt.health_failures += 1
        rt.health_ok = False
        metrics.health_check_failed(rt.key)
        n = rt.health_failures
        log.warning(
            "%s: health check failed (%d/%d): %s",
            rt.key,
            n,
            HEALTH_FAILURES_BEFORE_RESTART,
            detail,
            extra={"event": "health_failed", "instance": rt.key, "failures": n},
        )
        await store.update(rt.pk, health_ok=False, health_checked_at=timezone.now())
        await store.record_event(
            rt.pk,
            "health_failed",
            f"health check failed ({n}/{HEALTH_FAILURES_BEFORE_RESTART}): {detail}",
        )
        if n >= HEALTH_FAILURES_BEFORE_RESTART and rt.proc is not None:
            rt.failure = f"{UNHEALTHY}{n} consecutive health checks failed ({detail})"
            rt.ready.clear()
            self.bridge.down(rt, code=RESTARTING)
            # Not an expected stop: the exit goes through the restart policy. In the
            # background, so a slow stop does not hold up other instances' checks.
            self.spawn_helper(process.terminate(rt.proc, rt.run_spec.stop_timeout))

    async def reap_idle(self) -> bool:
        """Stop instances idle past idle_timeout with no open connection."""
        now = self.clock()
        reaped = False
        for rt in list(self.runtimes.values()):
            if not self.is_idle(rt, now):
                continue
            # Decide and start stopping with no await in between, so a request cannot slip
            # in unnoticed; one that arrives later simply wakes it again.
            idle = rt.idle_for(now)
            log.info(
                "%s idle for %.0fs; stopping",
                rt.key,
                idle,
                extra={"event": "idle_stop", "instance": rt.key, "idle_s": round(idle, 3)},
            )
            rt.desired = Desired.STOPPED
            self.request_stop(rt, "idle")
            metrics.idle_stopped(rt.key)
            # If an operator changed the row meanwhile, this loses and the sync applies theirs.
            await store.update_if_unchanged(rt.pk, rt.seen_version, desired_state=Desired.STOPPED)
            reaped = True
        return reaped

    @staticmethod
    def may_idle(rt: Runtime) -> bool:
        """Running, reapable and with no open connection: its idle clock is ticking."""
        return (
            rt.state == State.RUNNING
            and rt.stopping is None
            and not rt.always_on
            and rt.spec.idle_timeout > 0
            and rt.connections == 0
        )

    def is_idle(self, rt: Runtime, now: float) -> bool:
        return self.may_idle(rt) and rt.idle_for(now) >= rt.spec.idle_timeout

    async def flush_activity(self, force: bool = False) -> bool:
        """Copy last-activity stamps to the database in one batch, for display only."""
        now_mono, now_wall = self.clock(), time.time()
        stamps = {
            rt.pk: now_wall - (now_mono - rt.last_activity)
            for rt in self.runtimes.values()
            if rt.last_activity > rt.activity_reported or (force and rt.last_activity)
        }
        for rt in self.runtimes.values():
            rt.activity_reported = max(rt.activity_reported, rt.last_activity)
        if stamps:
            await store.save_activity(stamps)
        return bool(stamps)

    # ---- what the proxy calls ----------------------------------------------------------

    def touch(self, key: InstanceKey) -> None:
        """Record a request for `key`: it is not idle."""
        if rt := self.runtimes.get(key):
            rt.last_activity = self.clock()

    def connection_opened(self, key: InstanceKey) -> None:
        if rt := self.runtimes.get(key):
            rt.open_connections += 1
            rt.last_activity = self.clock()

    def connection_closed(self, key: InstanceKey) -> None:
        if rt := self.runtimes.get(key):
            rt.open_connections = max(0, rt.open_connections - 1)
            # The idle timer counts from when the last connection closed.
            rt.last_activity = self.clock()

    async def wake(self, key: InstanceKey, timeout: float | None = None) -> Runtime:
        """Make sure `key` is running and ready; raise InstanceUnavailable if it cannot be."""
        rt = self.runtimes.get(key) or await self.sync_and_get(key)
        if rt.state == State.FAILED:
            raise InstanceRefused(f"{key} is failed (crash loop); start it manually")
        rt.last_activity = self.clock()
        if rt.ready.is_set():
            return rt
        self.want_running(rt)
        limit = rt.spec.wake_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                while not rt.ready.is_set():
                    changed = rt.changed
                    if self.stop_event.is_set() or self.runtimes.get(key) is not rt:
                        raise InstanceUnavailable(f"{key} is shutting down or was deregistered")
                    if rt.state == State.FAILED and not rt.has_process:
                        raise InstanceUnavailable(f"{key} failed: {rt.failure or 'crash loop'}")
                    if rt.state == State.STOPPED and not rt.busy:
                        # Start now rather than on the next tick: the request is waiting.
                        self.start(rt)
                    # A backoff is respected; the reconcile loop restarts it when due.
                    await changed.wait()
        except TimeoutError:
            raise InstanceUnavailable(f"{key} not ready within {limit:g}s") from None
        return rt

    async def sync_and_get(self, key: InstanceKey) -> Runtime:
        """A key the proxy routes but we have not loaded: registered a moment ago by another
        process (the dashboard, the API). Look now rather than refuse its first request."""
        async with self._sync_lock:
            await self.sync_desired()
        if (rt := self.runtimes.get(key)) is None:
            raise InstanceUnavailable(f"{key} is not registered")
        return rt

    async def confirm_unreachable(self, key: InstanceKey, socket: str) -> None:
        """A proxy could not reach `socket`. If the app has died but its exit is not yet
        noticed, wait for it (briefly), so the wake that follows starts a fresh copy
        instead of answering "ready" with the dead one."""
        rt = self.runtimes.get(key)
        if rt is None or not rt.ready.is_set() or rt.run_spec.socket_path(key[1]) != socket:
            return
        if (await health.check(socket, "", SUSPECT_PROBE_TIMEOUT)).ok:
            return  # it answers now: the proxy's failure was a passing one
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(EXIT_NOTICE_TIMEOUT):
                while rt.ready.is_set():
                    await rt.changed.wait()

    async def halt(self, key: InstanceKey) -> None:
        """Operator stop from inside this process: desired stopped, then stop and wait."""
        rt = self.runtimes[key]
        rt.desired = Desired.STOPPED
        await store.update(rt.pk, desired_state=Desired.STOPPED)
        if task := self.request_stop(rt, "manual"):
            await task

    def want_running(self, rt: Runtime) -> None:
        if rt.desired == Desired.RUNNING:
            return
        rt.desired = Desired.RUNNING
        # Recorded in the background: the start must not wait on a database write.
        write = store.update_if_unchanged(rt.pk, rt.seen_version, desired_state=Desired.RUNNING)
        self.spawn_helper(survive_database_errors("record a wake", write))

    # ---- persistence ------------------------------------------------------------------

    async def set_state(
        self, rt: Runtime, new: str, kind: str, message: str, **fields: Any
    ) -> None:
        old = self.enter_state(rt, new, message)
        await store.transition(rt.pk, old, new, kind, message, **fields)

    def enter_state(self, rt: Runtime, new: str, message: str) -> str:
        """The in-memory half of a transition; returns the old state."""
        old, rt.state = rt.state, new
        rt.notify()
        pid = rt.proc.pid if rt.proc is not None else None
        log.info(
            "%s %s -> %s: %s",
            rt.key,
            old,
            new,
            message,
            extra={"event": "state", "instance": rt.key, "from": old, "to": new, "pid": pid},
        )
        return old

    async def recover(self) -> int:
        """After a supervisor crash: kill processes we started that are still alive.

        The pid alone is not proof (it may have been reused), so pid and start
        time must both match. Returns how many processes were killed.
        """
        rows = await store.leftovers()
        killed = await asyncio.gather(*(self.recover_one(row) for row in rows))
        return sum(killed)

    async def recover_one(self, row: Instance) -> int:
        state = Instance.State.FAILED if row.state == Instance.State.FAILED else State.STOPPED
        killed = 0
        if row.pid and process.is_our_orphan(row.pid, row.pid_create_time):
            log.warning(
                "%s: killing pid %s left by a previous supervisor",
                row,
                row.pid,
                extra={"event": "orphan_killed", "instance": row.key, "pid": row.pid},
            )
            await process.kill_orphan(row.pid, row.service.stop_timeout)
            await store.record_event(row.pk, "recovered", f"killed leftover pid {row.pid}")
            killed = 1
        await store.update(row.pk, state=state, pid=None, pid_create_time=None)
        return killed


def restart_reason(reason: str) -> str:
    """The `reason` label of tenement_restarts_total for a failure's message."""
    if reason.startswith(UNHEALTHY):
        return "health"
    return "oom" if reason.startswith(OOM) else "crash"


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


def _plus_one() -> Any:
    from django.db.models import F

    return F("restart_count") + 1
