"""Desired state: what the database says should run, read into memory.

The database is the desired state; other processes (the API, the CLI, the dashboard)
change it and the supervisor picks the change up within SYNC_INTERVAL. The reads run in
a loop of their own on the supervisor's reader thread, so a locked database delays
picking up changes, never the reconcile loop's starts, stops and restarts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, TypeVar

from django.db import DatabaseError, OperationalError
from django.utils import timezone

from instances.ids import InstanceKey
from instances.models import Instance, SupervisorSettings
from instances.spec import ServiceSpec
from instances.supervisor import store
from instances.supervisor.backoff import RestartPolicy
from instances.supervisor.runtime import Desired, Runtime, State

if TYPE_CHECKING:
    from instances.supervisor.core import Supervisor

log = logging.getLogger("tenement.supervisor")
T = TypeVar("T")

SYNC_INTERVAL = 1.0  # other processes' changes take effect within this
# A full read even when the fingerprint says nothing changed: a safety net for a change
# the fingerprint cannot see (a commit stamped more than WATERMARK_GRACE before it landed).
FULL_SYNC_INTERVAL = 60.0
# updated_at is stamped before the writer commits; look back this far so a slow commit is
# not missed (seen_version drops the rows we already applied).
WATERMARK_GRACE = timedelta(seconds=5)
SETTINGS_FIELDS = (
    "health_check_interval",
    "max_restarts",
    "restart_window",
    "backoff_base_ms",
    "backoff_max_ms",
    "uid_range",
    "port_range",
)


class StartupAborted(Exception):
    """A stop signal arrived while start-up waited for the database."""


class DesiredState:
    """Supervisor mixin: load and follow desired state."""

    async def load(self: Supervisor) -> None:
        self.settings = await self.read(store.load_settings)
        self.watermark = timezone.now()
        self.apply_releases(await self.read(store.load_releases))
        for row in await self.read(store.load_instances):
            self.add_runtime(row)

    async def read(self: Supervisor, query: Callable[[], T]) -> T:
        """A start-up read: without desired state there is nothing to do, so a locked or
        unreachable database is waited out (a signal still stops us meanwhile)."""
        delay = 0.1
        while True:
            try:
                return await self.reader.call(query)
            except OperationalError as e:
                log.warning(
                    "database unavailable at start-up (%s); retrying",
                    e,
                    extra={"event": "database_error", "during": "start-up"},
                )
            await self.wait_for_wakeup(delay, wake=False)
            if self.stop_event.is_set():
                raise StartupAborted("stopped while waiting for the database")
            delay = min(delay * 2, 2.0)

    async def desired_loop(self: Supervisor) -> None:
        while not self.stop_event.is_set():
            try:
                async with self._sync_lock:
                    changed = await self.sync_if_changed()
            except DatabaseError as e:
                log.warning(
                    "cannot read desired state (retrying in %gs): %s",
                    SYNC_INTERVAL,
                    e,
                    extra={"event": "database_error", "during": "sync"},
                )
                changed = False
            if changed:
                self.poke()
            await self.wait_for_wakeup(SYNC_INTERVAL, wake=False)

    async def sync_now(self: Supervisor) -> None:
        """A poke from another process: read desired state now, not at the next pass."""
        try:
            async with self._sync_lock:
                changed = await self.sync_desired()
        except DatabaseError as e:  # the regular pass retries
            log.warning("cannot read desired state on a poke: %s", e)
            return
        if changed:
            self.poke()

    async def sync_if_changed(self: Supervisor) -> bool:
        """sync_desired, when the database's fingerprint moved (or the safety net is due)."""
        now = self.clock()
        current = await self.reader.call(store.fingerprint, timezone.now() - WATERMARK_GRACE)
        if current == self.desired_fingerprint and now < self.next_full_sync:
            return False
        changed = await self.sync_desired()
        # Only after the sync landed: a failed one is tried again on the next pass.
        self.desired_fingerprint, self.next_full_sync = current, now + FULL_SYNC_INTERVAL
        return changed

    def add_runtime(self: Supervisor, row: Instance) -> Runtime:
        key = InstanceKey(row.service.name, row.instance_id)
        if (old := self.runtimes.get(key)) is not None and old.pk != row.pk:
            self.forget(old)  # deleted and registered again under the same key
        rt = Runtime(
            pk=row.pk,
            key=key,
            spec=ServiceSpec.from_model(row.service),
            policy=self.new_policy(),
            desired=row.desired_state,
            # No process of ours runs for a runtime we are only now adding (recovery
            # stopped the leftovers); whatever the row says is a stale mirror.
            state=State.FAILED if row.state == State.FAILED else State.STOPPED,
            always_on=row.always_on,
            seen_version=row.updated_at,
        )
        rt.restart_pending = row.restart_requested
        rt.uid = row.uid
        rt.pin, rt.last_good, rt.weight = row.release, row.last_release, row.weight
        self.reserve_record(rt)
        self.runtimes[key] = rt
        self.by_pk[rt.pk] = rt
        self.bridge.routes_changed()
        return rt

    def reserve_record(self: Supervisor, rt: Runtime) -> None:
        """Room for its pid record now, while there is disk: a disk that fills up later
        then still lets it start (the record is rewritten in place)."""
        try:
            self.pidfiles.reserve(rt.pk)
        except OSError as e:
            log.warning("%s: cannot reserve its pid file yet: %s", rt.key, e)

    def new_policy(self: Supervisor) -> RestartPolicy:
        s = self.settings
        return RestartPolicy(s.max_restarts, s.restart_window, s.backoff_base_ms, s.backoff_max_ms)

    async def sync_desired(self: Supervisor) -> bool:
        """Pick up changes other processes made to the database since the last look."""
        started = timezone.now()
        changes = await self.reader.call(store.changes_since, self.watermark)
        # From here on no await: the changes apply in one step of the loop.
        did = self.apply_settings(changes.settings)
        did |= self.apply_releases(changes.releases)
        specs = {s.name: ServiceSpec.from_model(s) for s in changes.services}
        # Only when a service changed: a walk over 1,000 tenants every second is idle CPU.
        for rt in self.runtimes.values() if specs else ():
            if rt.key.service in specs and rt.spec != specs[rt.key.service]:
                rt.spec = specs[rt.key.service]
                self.bridge.routes_changed()  # the proxy's timeouts may have changed
                did = True
        for row in changes.instances:
            did |= self.apply_row(row)
        if changes.instance_count != len(self.by_pk):
            did |= self.apply_present(await self.reader.call(store.load_instances))
        # Only now: a failure above retries the same window on the next pass.
        self.watermark = started - WATERMARK_GRACE
        return did

    def apply_settings(self: Supervisor, current: SupervisorSettings) -> bool:
        if all(getattr(current, f) == getattr(self.settings, f) for f in SETTINGS_FIELDS):
            return False
        self.settings = current
        for rt in self.runtimes.values():
            history = rt.policy.history
            rt.policy = self.new_policy()
            rt.policy.history = history
        return True

    def apply_row(self: Supervisor, row: Instance) -> bool:
        rt = self.by_pk.get(row.pk)
        if rt is None:
            self.add_runtime(row)
            return True
        if row.updated_at == rt.seen_version:
            return False
        rt.desired = row.desired_state
        rt.always_on = row.always_on
        rt.pin = row.release
        if rt.weight != row.weight:
            rt.weight = row.weight
            self.bridge.routes_changed()  # the weighted host's split
        rt.spec = ServiceSpec.from_model(row.service)
        if row.restart_requested:
            rt.restart_pending = True
            self.outbox.put("clear restart request", store.clear_restart_request, rt.pk)
        if rt.state == State.FAILED and rt.desired == Desired.RUNNING:
            self.clear_failed(rt, "manual start")
        if rt.desired == Desired.STOPPED:
            self.cancel_wakes(rt, "stopped by the operator")
        rt.seen_version = row.updated_at
        return True

    def clear_failed(self: Supervisor, rt: Runtime, why: str) -> None:
        rt.policy.reset()
        self.bridge.down(rt)  # proxies stop refusing it at once
        self.set_state(rt, State.STOPPED, "reset", f"failed state cleared by {why}")

    def apply_present(self: Supervisor, rows: list[Instance]) -> bool:
        """Given every registered row: drop the deregistered, add the ones we missed."""
        present = {row.pk for row in rows}
        gone = [rt for rt in self.by_pk.values() if rt.pk not in present]
        for rt in gone:
            self.forget(rt)
        # A row committed late (older updated_at than our watermark) shows up here too.
        added = [self.add_runtime(row) for row in rows if row.pk not in self.by_pk]
        return bool(gone or added)

    def forget(self: Supervisor, rt: Runtime) -> None:
        """Drop a deregistered instance, stopping its process if it has one."""
        log.info(
            "%s was deregistered; stopping it",
            rt.key,
            extra={"event": "deregistered", "instance": rt.key},
        )
        self.cancel_wakes(rt, "deregistered")
        if self.request_stop(rt, "removed") is None and not rt.busy:
            self.pidfiles.remove(rt.pk)  # else the lifecycle removes it after the exit
        self.by_pk.pop(rt.pk, None)
        self.awake.pop(rt.pk, None)
        if self.runtimes.get(rt.key) is rt:
            del self.runtimes[rt.key]
        self.bridge.routes_changed()
        rt.notify()
