"""Starting and stopping instances: the reconcile rule and the life of one process.

States: stopped -> starting -> running -> stopping -> stopped, plus backoff and failed.
Every transition is in LEGAL below. A transition changes memory at once and queues its
database write in the outbox: no step here ever waits on the database, so a locked or
full database cannot kill, wedge or orphan an instance.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING, Any

from django.db.models import F
from django.utils import timezone

from instances import metrics
from instances.addresses import tcp_address
from instances.config import parse_port_range, parse_uid_range
from instances.supervisor import fds, isolation, process, store
from instances.supervisor.bridge import GOING_AWAY, RESTARTING
from instances.supervisor.health import HealthResult
from instances.supervisor.ports import PortsExhausted
from instances.supervisor.recovery import ChildRecord
from instances.supervisor.runtime import EXPECTED_STOPS, Desired, Runtime, State

if TYPE_CHECKING:
    from instances.supervisor.core import Supervisor

log = logging.getLogger("tenement.supervisor")

# old state -> the states it may move to. Anything else is a bug, logged loudly.
LEGAL: dict[str, frozenset[str]] = {
    State.STOPPED: frozenset({State.STARTING}),
    # A failed spawn goes starting -> backoff/failed; a stop during the start, -> stopped.
    State.STARTING: frozenset(
        {State.RUNNING, State.STOPPING, State.STOPPED, State.BACKOFF, State.FAILED}
    ),
    State.RUNNING: frozenset({State.STOPPING, State.STOPPED, State.BACKOFF, State.FAILED}),
    State.STOPPING: frozenset({State.STOPPED, State.BACKOFF, State.FAILED}),
    State.BACKOFF: frozenset({State.STARTING, State.STOPPED}),
    State.FAILED: frozenset({State.STOPPED, State.STARTING}),
}

FAST_PROBE, FAST_PROBE_FOR, SLOW_PROBE = 0.005, 2.0, 0.05
PROXY_DRAIN_GRACE = 0.25  # seconds between "down" to the proxies and SIGTERM, on a move
MAX_HEALTH_TIMEOUT = 5.0
UNHEALTHY = "unhealthy: "  # how a health-check failure's reason starts
OOM = "oom: "  # how an out-of-memory kill's reason starts


class Lifecycle:
    """Supervisor mixin: reconcile toward desired state; own each process until it exits."""

    # ---- reconcile ------------------------------------------------------------------

    def reconcile(self: Supervisor) -> bool:
        """Start or stop whatever differs from desired state. Returns whether it acted."""
        now = self.clock()
        acted = False
        for rt in list(self.runtimes.values()):
            if rt.stop_in_flight:
                continue
            action = decide(rt, now)
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
                self.set_state(rt, State.STOPPED, "stopped", "desired stopped")
            acted |= action is not None
        return acted

    # ---- one process ------------------------------------------------------------------

    def start(self: Supervisor, rt: Runtime) -> asyncio.Task[None]:
        """Begin a start attempt; the task owns the process until it exits."""
        rt.stopping = rt.failure = None
        rt.restart_pending = False
        # A config change applies from the next start; this process keeps its own spec,
        # with the overrides of the release the tenant runs now.
        rt.release = self.target_release(rt)
        rt.proc_spec = self.release_spec(rt, rt.release)
        rt.task = asyncio.create_task(self.lifecycle(rt), name=f"instance {rt.key}")
        return rt.task

    async def lifecycle(self: Supervisor, rt: Runtime) -> None:
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
            self.handle_failure(rt, f"internal error: {e!r}")
        finally:
            if rt.cgroup is not None:  # an internal error skipped after_exit's clean-up
                await asyncio.to_thread(rt.cgroup.remove)
                rt.cgroup = None
            if rt.proc is not None and rt.proc.returncode is not None:
                self.pidfiles.clear(rt.pk)
            if self.by_pk.get(rt.pk) is not rt:  # deregistered: its record goes with it
                self.pidfiles.remove(rt.pk)
            rt.proc = None
            self.ports.release(rt.port)
            rt.port, rt.address = None, ""
            rt.ready.clear()
            rt.notify()
            self.poke()

    async def run_process(self: Supervisor, rt: Runtime) -> None:
        """Spawn, gate on readiness, wait for the exit, then record what happened."""
        proc = await self.spawn_process(rt)
        if proc is None:
            return
        if await self.await_ready(rt, proc):
            self.mark_running(rt)
            await proc.wait()
        elif rt.stopping is None and proc.returncode is None:
            # (If it already exited, after_exit reports how: that is the real reason.)
            rt.failure = f"not healthy within startup_timeout ({rt.run_spec.startup_timeout:g}s)"
            await process.terminate(proc, rt.run_spec.stop_timeout)
        code = await proc.wait()
        self.pidfiles.clear(rt.pk)
        await self.after_exit(rt, code)

    async def spawn_process(self: Supervisor, rt: Runtime) -> asyncio.subprocess.Process | None:
        try:
            # Room for the pid record first: a child we could not record must not run.
            self.pidfiles.reserve(rt.pk)
            rt.port = self.ports.allocate(parse_port_range(self.settings.port_range))
            launch = await process.spawn(rt.run_spec, rt.key.instance_id, self.uid_for(rt), rt.port)
        except (process.SpawnError, ValueError, OSError, PortsExhausted) as e:
            self.set_state(rt, State.STARTING, "starting", f"starting {rt.key}")
            self.handle_failure(rt, _spawn_error(e))
            return None
        proc = launch.proc
        ticks = process.start_ticks(proc.pid)
        try:
            self.record_child(rt, proc.pid, ticks)
        except OSError as e:
            # Unrecorded, it could outlive a crash of ours unseen: it goes at once.
            await process.terminate(proc, 0)
            await asyncio.to_thread(process.cleanup, rt.run_spec, rt.key.instance_id, launch.cgroup)
            self.set_state(rt, State.STARTING, "starting", f"starting {rt.key}")
            self.handle_failure(rt, f"cannot record the process: {e}")
            return None
        rt.proc = proc
        rt.cgroup = launch.cgroup
        rt.started_at = self.clock()
        self.attach_logs(rt, proc)
        self.set_state(
            rt,
            State.STARTING,
            "starting",
            f"starting {rt.key} (pid {proc.pid})",
            pid=proc.pid,
            pid_create_time=ticks,
            socket_path=rt.run_spec.socket_path(rt.key.instance_id),
            port=rt.port,
            started_at=timezone.now(),
            uid=rt.uid,
            isolation=launch.isolation,
        )
        if rt.stopping:  # a stop arrived while we were spawning
            await process.terminate(proc, rt.run_spec.stop_timeout)
        return proc

    def record_child(self: Supervisor, rt: Runtime, pid: int, ticks: float | None) -> None:
        """The durable record of a child, written before anything else about it."""
        child = ChildRecord(rt.pk, str(rt.key), pid, ticks or 0.0, rt.run_spec.stop_timeout)
        self.pidfiles.record(child)

    def attach_logs(self: Supervisor, rt: Runtime, proc: asyncio.subprocess.Process) -> None:
        self.logs.retention[rt.pk] = rt.run_spec.log_retention_lines
        for name, pipe in (("stdout", proc.stdout), ("stderr", proc.stderr)):
            if pipe is not None:
                counted = metrics.log_line_counter(rt.key, name)
                self.spawn_helper(self.logs.capture(rt.pk, name, pipe, counted))

    async def await_ready(self: Supervisor, rt: Runtime, proc: asyncio.subprocess.Process) -> bool:
        """Probe until the first healthy answer, the process exits, a stop, or the deadline."""
        deadline = self.clock() + rt.run_spec.startup_timeout
        delay = 0.002
        exited = asyncio.create_task(proc.wait(), name=f"exit-watch {rt.key}")
        try:
            while not exited.done() and not rt.stopping:
                left = deadline - self.clock()
                if left <= 0:
                    return False
                result = await self.probe_listener(rt, min(left, MAX_HEALTH_TIMEOUT))
                if result.ok:
                    return not rt.stopping  # a stop that arrived during the probe wins
                # Wait for the process to exit or the next probe, whichever comes first.
                await asyncio.wait([exited], timeout=min(delay, max(0.0, left)))
                delay = min(delay * 1.5, self.probe_cap(rt))
            return False
        finally:
            exited.cancel()

    async def probe_listener(self: Supervisor, rt: Runtime, timeout: float) -> HealthResult:
        """The readiness probe: `listen` says where. With auto, the Unix socket once it
        exists (an app that opened both is reached over it), else the TCP port."""
        spec, instance_id = rt.run_spec, rt.key.instance_id
        unix = spec.socket_path(instance_id)
        tcp = tcp_address(rt.port) if rt.port is not None and spec.tcp_allowed else ""
        # A stat of the socket (a local file) per probe: cheaper than a thread hop, and the
        # probes run every 5 ms while a request may be held.
        if spec.listen == "tcp" or (spec.listen == "auto" and tcp and not os.path.exists(unix)):
            rt.address = tcp
        else:
            rt.address = unix
        return await self.probe(rt, timeout)

    def probe_cap(self: Supervisor, rt: Runtime) -> float:
        """Probe every 5 ms for the first 2 s: a request may be held on this wake, and
        most apps are up within that; then every 50 ms, so a slow start costs little."""
        return FAST_PROBE if self.clock() - rt.started_at < FAST_PROBE_FOR else SLOW_PROBE

    def mark_running(self: Supervisor, rt: Runtime) -> None:
        rt.last_activity = rt.activity_reported = self.clock()
        rt.health_failures = 0
        rt.health_ok = True
        rt.next_health = self.clock() + self.settings.health_check_interval
        took = (self.clock() - rt.started_at) * 1000
        rt.ready.set()
        self.healthy_on_release(rt)
        self.bridge.ready(rt)
        self.set_state(
            rt,
            State.RUNNING,
            "ready",
            f"ready in {took:.0f} ms (pid {rt.proc.pid if rt.proc else '?'})",
            health_ok=True,
            health_checked_at=timezone.now(),
            last_activity=timezone.now(),
            socket_path=rt.upstream,
            last_error="",
        )

    def uid_for(self: Supervisor, rt: Runtime) -> int | None:
        """The tenant's own uid (as root): stored with the row, else a stable new one."""
        if rt.uid is None and isolation.host().root and not rt.run_spec.user:
            taken = {r.uid for r in self.runtimes.values() if r.uid is not None}
            uids = parse_uid_range(self.settings.uid_range)
            rt.uid = isolation.allocate_uid(rt.pk, uids, taken)
        return rt.uid

    async def after_exit(self: Supervisor, rt: Runtime, code: int) -> None:
        self.bridge.down(rt)
        spec, group, rt.cgroup = rt.run_spec, rt.cgroup, None
        # Off the loop: removing a cgroup waits for its killed leftovers to be reaped.
        # (Not the database: nothing here waits on it.)
        oom = await asyncio.to_thread(process.cleanup, spec, rt.key.instance_id, group)
        code = isolation.exit_code(code, spec)
        how = process.describe_exit(code)
        if oom and rt.stopping not in EXPECTED_STOPS:
            rt.failure = f"{OOM}killed by the kernel at memory_limit_mb = {spec.memory_limit_mb}"
        if rt.stopping in EXPECTED_STOPS:
            if not spec.storage_persist:
                await asyncio.to_thread(process.wipe_data, spec, rt.key.instance_id)
            self.set_state(
                rt,
                State.STOPPED,
                "stopped",
                f"stopped ({rt.stopping}): {how}",
                pid=None,
                pid_create_time=None,
                port=None,
                last_exit_code=code,
            )
            return
        if code == 0 and not rt.failure and spec.restart == "on-failure":
            if not spec.storage_persist:  # a stop like any other
                await asyncio.to_thread(process.wipe_data, spec, rt.key.instance_id)
            self.exited_cleanly(rt, how)
            return
        self.handle_failure(rt, rt.failure or f"crashed: {how}", last_exit_code=code)

    def exited_cleanly(self: Supervisor, rt: Runtime, how: str) -> None:
        """restart = "on-failure": an exit with status 0 nobody asked for is a stop, not a
        crash. It sleeps as after an idle stop: the next request wakes it."""
        rt.desired = Desired.STOPPED
        self.outbox.put(
            "clean exit",
            store.update_if_unchanged,
            rt.pk,
            rt.seen_version,
            desired_state=Desired.STOPPED,
        )
        self.set_state(
            rt,
            State.STOPPED,
            "stopped",
            f"exited on its own ({how}); not restarted (restart = on-failure)",
            pid=None,
            pid_create_time=None,
            port=None,
            last_exit_code=0,
        )

    def give_up(self: Supervisor, rt: Runtime, message: str, **fields: Any) -> None:
        """`failed`: no restart until a manual start."""
        log.error(
            "%s failed: %s",
            rt.key,
            message,
            extra={"event": "failed", "instance": rt.key, "reason": rt.failure},
        )
        self.bridge.down(rt, failed=True)
        self.set_state(rt, State.FAILED, "failed", message, **fields)

    def handle_failure(self: Supervisor, rt: Runtime, reason: str, **fields: Any) -> None:
        """A crash or failed start: back off and retry, or give up as failed."""
        rt.failure = reason
        if self.fall_back(rt, reason):
            return
        fields.update(pid=None, pid_create_time=None, port=None, last_error=reason)
        if fds.pressure.recent():
            self.defer_restart(rt, reason, **fields)
            return
        delay = rt.policy.next_delay(self.clock())
        if rt.run_spec.restart == "never":
            self.give_up(rt, f"{reason}; not restarted (restart = never)", **fields)
            return
        if delay is None:
            self.give_up(
                rt,
                f"{reason}; more than {self.settings.max_restarts} restarts in "
                f"{self.settings.restart_window:g}s: giving up until a manual start",
                **fields,
            )
            return
        rt.backoff_until = self.clock() + delay
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
        self.set_state(
            rt,
            State.BACKOFF,
            "backoff",
            f"{reason}; restarting in {delay:.2f}s",
            restart_count=F("restart_count") + 1,
            **fields,
        )

    def defer_restart(self: Supervisor, rt: Runtime, reason: str, **fields: Any) -> None:
        """The supervisor ran out of file descriptors: retry soon, not counted toward
        max_restarts (instances/supervisor/fds.py)."""
        rt.backoff_until = self.clock() + fds.RETRY_S
        self.set_state(
            rt,
            State.BACKOFF,
            "backoff",
            f"{reason}; the supervisor is out of file descriptors: retrying in "
            f"{fds.RETRY_S:g}s, not counted toward max_restarts",
            **fields,
        )

    # ---- stopping -----------------------------------------------------------------------

    def request_stop(self: Supervisor, rt: Runtime, reason: str) -> asyncio.Task[None] | None:
        """Stop an instance for `reason`; returns the task, or None if nothing to stop."""
        if rt.stop_task is not None and not rt.stop_task.done():
            return rt.stop_task
        rt.stopping = reason
        rt.ready.clear()
        # Before the SIGTERM, so proxies close WebSockets cleanly rather than see a reset.
        code = RESTARTING if reason in ("restart", "release") else GOING_AWAY
        self.bridge.down(rt, code=code)
        if rt.task is None or rt.task.done():
            if rt.state == State.BACKOFF:
                self.set_state(rt, State.STOPPED, "stopped", reason)
            return None
        rt.stop_task = asyncio.create_task(self.stop(rt, reason), name=f"stop {rt.key}")
        return rt.stop_task

    async def stop(self: Supervisor, rt: Runtime, reason: str) -> None:
        # Take the process once: it may exit (and rt.proc be cleared) while we wait.
        # With no process yet, spawn_process sees rt.stopping and stops what it starts.
        proc = rt.proc
        if proc is not None and proc.returncode is None:
            if rt.state in (State.STARTING, State.RUNNING):
                self.set_state(rt, State.STOPPING, "stopping", f"stopping ({reason})")
            if reason == "release" and rt.state == State.STOPPING:
                # A move under load: let every proxy hear "down" and stop handing out
                # this socket before the app stops accepting (requests then wait for
                # the new release instead of meeting a closing connection).
                await self.wait_for_wakeup(PROXY_DRAIN_GRACE, wake=False)
            await process.terminate(proc, rt.run_spec.stop_timeout)
        if rt.task is not None:
            await rt.task
        rt.notify()  # wakers waiting on a stop-in-flight re-check now

    # ---- transitions ------------------------------------------------------------------

    def set_state(
        self: Supervisor, rt: Runtime, new: str, kind: str, message: str, **fields: Any
    ) -> None:
        """Move to `new` now, and queue the database's copy of it (never awaited)."""
        if new == State.STOPPED:
            # No process, no verdict: a stopped instance is neither healthy nor failing.
            rt.health_ok = None
            fields.setdefault("health_ok", None)
        old = self.enter_state(rt, new, message)
        what = f"{rt.key} -> {new}"
        self.outbox.put(what, store.transition, rt.pk, old, new, kind, message, **fields)

    def enter_state(self: Supervisor, rt: Runtime, new: str, message: str) -> str:
        """The in-memory half of a transition; returns the old state."""
        old = rt.state
        if old != new and new not in LEGAL[old]:
            log.error(
                "%s: illegal transition %s -> %s (%s)",
                rt.key,
                old,
                new,
                message,
                extra={"event": "illegal_transition", "instance": rt.key, "from": old, "to": new},
            )
        rt.state = new
        if new in (State.STOPPED, State.FAILED):
            self.awake.pop(rt.pk, None)
        else:
            self.awake[rt.pk] = rt
        rt.notify()
        self.poke()  # a new state may bring a deadline (backoff, idle) the loop must see
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


def restart_reason(reason: str) -> str:
    """The `reason` label of tenement_restarts_total for a failure's message."""
    if reason.startswith(UNHEALTHY):
        return "health"
    return "oom" if reason.startswith(OOM) else "crash"


def _spawn_error(e: Exception) -> str:
    if isinstance(e, OSError) and not isinstance(e, process.SpawnError):
        return f"cannot record the process: {e}"
    return str(e)
