"""What the proxy asks of the supervisor: wake an instance and say when it is ready.

A wake never waits on the database: the desired "running" goes to the outbox, the start
begins at once. An operator stop or a deregistration during a wake cancels it: its
waiters get a definite answer saying why, and nothing starts the instance again.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from django.db import DatabaseError

from instances.ids import InstanceKey
from instances.supervisor import health, store
from instances.supervisor.runtime import Desired, Runtime, State

if TYPE_CHECKING:
    from instances.supervisor.core import Supervisor

SUSPECT_PROBE_TIMEOUT = 1.0
EXIT_NOTICE_TIMEOUT = 2.0


class InstanceUnavailable(Exception):
    """A wake could not produce a running instance (unknown, failed, or timed out)."""


class WakeTimedOut(InstanceUnavailable):
    """Not ready within wake_timeout; the start goes on (a proxy may ask again)."""


class InstanceRefused(InstanceUnavailable):
    """The instance was already failed: the wake did not try to start it."""


class Waker:
    """Supervisor mixin: wakes, and their cancellation."""

    async def wake(self: Supervisor, key: InstanceKey, timeout: float | None = None) -> Runtime:
        """Make sure `key` is running and ready; raise InstanceUnavailable if it cannot be."""
        rt = self.runtimes.get(key) or await self.sync_and_get(key)
        if rt.state == State.FAILED:
            raise InstanceRefused(f"{key} is failed (crash loop); start it manually")
        rt.last_activity = self.clock()
        if rt.ready.is_set():
            return rt
        epoch = rt.wake_epoch
        self.want_running(rt)
        limit = rt.spec.wake_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                while not rt.ready.is_set():
                    changed = rt.changed
                    self.check_wake(rt, key, epoch)
                    if rt.state == State.STOPPED and not rt.busy:
                        # Start now rather than on the next tick: the request is waiting.
                        self.start(rt)
                    # A backoff is respected; the reconcile loop restarts it when due.
                    await changed.wait()
        except TimeoutError:
            raise WakeTimedOut(f"{key} not ready within {limit:g}s") from None
        return rt

    def check_wake(self: Supervisor, rt: Runtime, key: InstanceKey, epoch: int) -> None:
        """Raise if this wake can no longer succeed, saying why."""
        if self.stop_event.is_set():
            raise InstanceUnavailable(f"{key}: the supervisor is shutting down")
        if rt.wake_epoch != epoch or self.runtimes.get(key) is not rt:
            raise InstanceUnavailable(f"{key}: wake cancelled: {rt.wake_cancelled or 'gone'}")
        if rt.state == State.FAILED and not rt.has_process:
            raise InstanceUnavailable(f"{key} failed: {rt.failure or 'crash loop'}")

    def cancel_wakes(self: Supervisor, rt: Runtime, why: str) -> None:
        """End every wake in flight for `rt` (an operator stop, a deregistration)."""
        rt.wake_epoch += 1
        rt.wake_cancelled = why
        rt.notify()

    async def sync_and_get(self: Supervisor, key: InstanceKey) -> Runtime:
        """A key the proxy routes but we have not loaded: registered a moment ago by another
        process (the dashboard, the API). Look now rather than refuse its first request."""
        try:
            async with self._sync_lock:
                await self.sync_desired()
        except DatabaseError as e:
            raise InstanceUnavailable(f"{key} is not known yet and the database is down") from e
        if (rt := self.runtimes.get(key)) is None:
            raise InstanceUnavailable(f"{key} is not registered")
        return rt

    async def confirm_unreachable(self: Supervisor, key: InstanceKey, socket: str) -> None:
        """A proxy could not reach `socket`. If the app has died but its exit is not yet
        noticed, wait for it (briefly), so the wake that follows starts a fresh copy
        instead of answering "ready" with the dead one."""
        rt = self.runtimes.get(key)
        if rt is None or not rt.ready.is_set() or rt.upstream != socket:
            return
        if (await health.check(socket, "", SUSPECT_PROBE_TIMEOUT)).ok:
            return  # it answers now: the proxy's failure was a passing one
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(EXIT_NOTICE_TIMEOUT):
                while rt.ready.is_set():
                    await rt.changed.wait()

    def want_running(self: Supervisor, rt: Runtime) -> None:
        if rt.desired == Desired.RUNNING:
            return
        rt.desired = Desired.RUNNING
        # Conditional: an operator's change made meanwhile wins over this wake's.
        self.outbox.put(
            "wake",
            store.update_if_unchanged,
            rt.pk,
            rt.seen_version,
            desired_state=Desired.RUNNING,
        )
