"""Watching running instances: health checks, idle reaping and activity stamps.

Health failures restart an instance through the restart policy; idle instances are
stopped; activity reaches the database in batches, for display only. Their writes go
to the outbox, so a slow database never delays a check or a reap.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from django.conf import settings as django_settings
from django.utils import timezone

from instances import metrics
from instances.ids import InstanceKey
from instances.supervisor import health, process, storage, store
from instances.supervisor.bridge import RESTARTING
from instances.supervisor.lifecycle import UNHEALTHY
from instances.supervisor.runtime import Desired, Runtime, State

if TYPE_CHECKING:
    from instances.supervisor.core import Supervisor

log = logging.getLogger("tenement.supervisor")

HEALTH_FAILURES_BEFORE_RESTART = 3
MAX_HEALTH_TIMEOUT = 5.0


class Monitor:
    """Supervisor mixin: health, idle and activity."""

    MAX_CONCURRENT_HEALTH_CHECKS = 64

    # ---- health ------------------------------------------------------------------------

    async def health_loop(self: Supervisor) -> None:
        while not self.stop_event.is_set():
            await self.check_health()
            await self.wait_for_wakeup(self.seconds_until_health_due(), wake=False)

    def seconds_until_health_due(self: Supervisor) -> float:
        interval = self.settings.health_check_interval
        now = self.clock()
        due = [rt.next_health - now for rt in self.awake.values() if health_applies(rt)]
        # New instances become due a full interval after they start, so `interval` is a safe cap.
        return max(0.01, min([interval, *due]))

    async def check_health(self: Supervisor) -> bool:
        """Health-check every running instance that is due. Returns whether any ran."""
        now = self.clock()
        due = [rt for rt in self.awake.values() if health_applies(rt) and now >= rt.next_health]
        if due:
            await asyncio.gather(*(self.check_one(rt) for rt in due))
        return bool(due)

    async def check_one(self: Supervisor, rt: Runtime) -> None:
        interval = self.settings.health_check_interval
        rt.next_health = self.clock() + interval
        async with self._health_gate:
            result = await self.probe(rt, min(interval, MAX_HEALTH_TIMEOUT))
        if rt.state != State.RUNNING or rt.stopping:
            return  # it was stopped while we were checking
        if result.inconclusive:
            return  # we could not check (out of file descriptors): no verdict on the app
        if result.ok:
            self.health_passed(rt)
        else:
            self.health_failed(rt, result.detail)

    @staticmethod
    async def probe(rt: Runtime, timeout: float) -> health.HealthResult:
        """One health check against the spec the process was started with."""
        spec = rt.run_spec
        try:
            return await health.check(rt.upstream, spec.health, timeout)
        except Exception as e:  # a bad path or template must fail the check, not the loop
            return health.HealthResult(False, f"cannot run the health check: {e}")

    def health_passed(self: Supervisor, rt: Runtime) -> None:
        rt.health_failures = 0
        rt.health_ok = True
        # Every check, not only changes: "checked at" must say when it was last looked at.
        fields = {"health_ok": True, "health_checked_at": timezone.now()}
        self.outbox.put("health", store.update, rt.pk, **fields)

    def health_failed(self: Supervisor, rt: Runtime, detail: str) -> None:
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
        fields = {"health_ok": False, "health_checked_at": timezone.now()}
        self.outbox.put("health", store.update, rt.pk, **fields)
        message = f"health check failed ({n}/{HEALTH_FAILURES_BEFORE_RESTART}): {detail}"
        self.outbox.put("health", store.record_event, rt.pk, "health_failed", message)
        if n >= HEALTH_FAILURES_BEFORE_RESTART and rt.proc is not None:
            rt.failure = f"{UNHEALTHY}{n} consecutive health checks failed ({detail})"
            rt.ready.clear()
            self.bridge.down(rt, code=RESTARTING)
            # Not an expected stop: the exit goes through the restart policy. In the
            # background, so a slow stop does not hold up other instances' checks.
            self.spawn_helper(process.terminate(rt.proc, rt.run_spec.stop_timeout))

    # ---- storage ---------------------------------------------------------------------------

    async def storage_loop(self: Supervisor) -> None:
        while not self.stop_event.is_set():
            await self.check_storage()
            interval = float(getattr(django_settings, "TENEMENT_STORAGE_CHECK_SECONDS", 60))
            await self.wait_for_wakeup(interval, wake=False)

    async def check_storage(self: Supervisor) -> bool:
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
                self.storage_crossed(rt, mark, used, complete)
        return changed

    def storage_crossed(
        self: Supervisor, rt: Runtime, mark: int, used: int, complete: bool
    ) -> None:
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
        self.outbox.put("storage", store.record_event, rt.pk, kind, message)

    # ---- idle ----------------------------------------------------------------------------

    def reap_idle(self: Supervisor) -> bool:
        """Stop instances idle past idle_timeout with no open connection."""
        now = self.clock()
        reaped = False
        for rt in list(self.awake.values()):
            if not self.is_idle(rt, now):
                continue
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
            self.outbox.put(
                "idle stop",
                store.update_if_unchanged,
                rt.pk,
                rt.seen_version,
                desired_state=Desired.STOPPED,
            )
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

    def is_idle(self: Supervisor, rt: Runtime, now: float) -> bool:
        return self.may_idle(rt) and rt.idle_for(now) >= rt.spec.idle_timeout

    # ---- activity ------------------------------------------------------------------------

    def touch(self: Supervisor, key: InstanceKey) -> None:
        """Record a request for `key`: it is not idle."""
        if rt := self.runtimes.get(key):
            rt.last_activity = self.clock()

    def queue_activity(self: Supervisor, force: bool = False) -> bool:
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
            self.outbox.put("activity", store.save_activity, stamps)
        return bool(stamps)


def health_applies(rt: Runtime) -> bool:
    return rt.state == State.RUNNING and rt.stopping is None and rt.failure is None
