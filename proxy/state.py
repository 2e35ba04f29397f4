"""Per-process proxy state, kept in step with the supervisor over the channel layer.

The proxy never reads the database per request. It keeps:
- the routing snapshot (registered tenants), reloaded when the supervisor says so;
- which instances are ready, and on which socket (pushed by the supervisor);
- coalesced wake requests: N requests for one sleeping tenant send one message;
- activity counters, sent to the supervisor in batches.

Messages (channel layer; the in-memory layer in one process, Redis when scaled):
  to "tenement.supervisor":  wake {key, reply, id}, activity {proxy, touched, open}
  to group "tenement.proxy": instance.ready {key, socket, release}, instance.down {key,
                             code, failed}, routes.changed
  to one proxy's channel:    wake.ready {key, socket, release, id}, wake.unavailable {key, reason,
                             failed, refused, timeout, id}

A wake's replies carry its id, so a late reply to an old wake settles nothing newer. The
requests held on a wake share one future; when the supervisor's wake runs out of time
while some of them still have time left, the proxy asks again under a new id and they
stay held (a rollover), rather than be failed by a wake they did not start.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from channels.layers import get_channel_layer
from django.conf import settings

from instances import metrics, timeline
from instances.ids import InstanceKey, parse_key
from instances.messages import PROXY_GROUP, SUPERVISOR_CHANNEL, receive_forever
from proxy.upstream import Pools
from routing import table
from routing.table import RoutingTable

log = logging.getLogger("tenement.proxy")

ACTIVITY_INTERVAL = 0.25  # a request's activity reaches the supervisor within this
OPEN_REPORT_INTERVAL = 2.0  # open-connection counts are re-sent this often (they expire)
# Channel layers expire group membership (by default after a day): join again well before.
MAX_REJOIN_INTERVAL = 3600.0
_wake_ids = itertools.count(1)


class WakeRejected(Exception):
    """The request cannot be held for a wake; the answer is 503 with Retry-After."""

    def __init__(self, reason: str, retry_after: int = 5, refused: bool = False) -> None:
        super().__init__(reason)
        self.retry_after = retry_after
        # The supervisor knew the instance was failed and did not try: for the metrics,
        # a rejection, not a failed wake.
        self.refused = refused


@dataclass
class PendingWake:
    future: asyncio.Future[str]
    deadline: float  # when the supervisor's side of the current wake id gives up
    id: str = ""
    needed_until: float = 0.0  # the latest deadline of a request held on it
    held: int = 0
    began: float = 0.0
    counted: bool = False  # its outcome is in tenement_wakes_total (once per wake)
    suspect: str | None = None


class ProxyState:
    """Everything one proxy process knows; one per event loop."""

    def __init__(self) -> None:
        self.layer = get_channel_layer()
        self.channel = ""
        self.table = RoutingTable()
        self.running: dict[InstanceKey, str] = {}
        # The release each instance's process runs, for tenement_release_requests_total.
        self.release_of: dict[InstanceKey, str] = {}
        self.failed: set[InstanceKey] = set()
        self.pools = Pools()
        self.wakes: dict[InstanceKey, PendingWake] = {}
        self.touched: set[InstanceKey] = set()
        self.open: collections.Counter[InstanceKey] = collections.Counter()
        self.open_dirty = False
        self.websockets: collections.Counter[InstanceKey] = collections.Counter()
        self.open_gauge = metrics.open_connections()  # None with TENEMENT_METRICS off
        self.closers: dict[InstanceKey, set[Callable[[int], None]]] = {}
        self.max_held = settings.TENEMENT_MAX_HELD_REQUESTS
        self._tasks: list[asyncio.Task[None]] = []
        self._resends: set[asyncio.Task[None]] = set()
        self._reload = asyncio.Event()
        self._started: asyncio.Future[None] | None = None

    # ---- start-up ------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._started is not None and self._started.done()

    async def ready(self) -> ProxyState:
        """Start on first use (ASGI servers give no start-up hook that daphne shares)."""
        if self._started is None:
            self._started = asyncio.get_running_loop().create_future()
            try:
                await self.start()
                self._started.set_result(None)
            except BaseException as e:
                self._started.set_exception(e)
                self._started = None
                raise
        elif not self._started.done():
            await asyncio.shield(self._started)
        return self

    async def start(self) -> None:
        if self.layer is None:
            raise RuntimeError("no channel layer configured (CHANNEL_LAYERS)")
        self.channel = await self.layer.new_channel("tenement.proxy.")
        # Join before loading, so no change between the two is missed.
        await self.layer.group_add(PROXY_GROUP, self.channel)
        self.apply_table(await table.load())
        for name, work in (
            ("tenement-proxy-listen", self.listen),
            ("tenement-proxy-activity", self.report_activity),
            ("tenement-proxy-routes", self.reload_routes),
            ("tenement-proxy-rejoin", self.rejoin_group),
        ):
            self._tasks.append(asyncio.create_task(work(), name=name))

    def apply_table(self, snapshot: RoutingTable) -> None:
        self.table = snapshot
        self.running = dict(snapshot.running)
        self.release_of = dict(snapshot.releases)

    async def rejoin_group(self) -> None:
        """Join the broadcast group again and again, well inside the layer's expiry, so
        routes.changed and instance.down keep arriving after a day (or a Redis restart)."""
        expiry = float(getattr(self.layer, "group_expiry", 86400) or 86400)
        interval = max(0.5, min(MAX_REJOIN_INTERVAL, expiry / 4))
        while True:
            await asyncio.sleep(interval)  # a fixed period, not a poll
            try:
                await self.layer.group_add(PROXY_GROUP, self.channel)
            except Exception as e:  # an unreachable layer: the next period tries again
                log.warning("cannot re-join the proxy group: %s", e)
                continue
            # Anything sent while we were out of the group is lost: reload to be sure.
            self._reload.set()

    async def close(self) -> None:
        for task in [*self._tasks, *self._resends]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._resends, return_exceptions=True)
        if self.layer is not None and self.channel:
            await self.layer.group_discard(PROXY_GROUP, self.channel)
        self.pools.close()

    # ---- messages from the supervisor ---------------------------------------------------

    async def listen(self) -> None:
        async for message in receive_forever(self.layer, self.channel):
            try:
                self.handle(message)
            except Exception:  # one bad message must not stop routing updates
                log.exception("bad message from the supervisor: %r", message)

    def handle(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "routes.changed":
            self._reload.set()
            return
        key = parse_key(message["key"])
        if kind.startswith("wake.") and not self.is_current(key, message.get("id")):
            return  # a late reply to a wake that has been settled or asked again since
        if kind in ("instance.ready", "wake.ready"):
            if release := message.get("release"):
                self.release_of[key] = release
            self.mark_ready(key, message["socket"])
        elif kind == "instance.down":
            self.mark_down(key, int(message.get("code", 1001)), bool(message.get("failed")))
        elif kind == "wake.unavailable" and message.get("timeout") and self.roll_over(key):
            return
        elif kind == "wake.unavailable":
            reason = message.get("reason", "unavailable")
            self.wake_failed(key, reason, message.get("failed"), bool(message.get("refused")))

    def is_current(self, key: InstanceKey, wake_id: Any) -> bool:
        pending = self.wakes.get(key)
        return pending is not None and (wake_id is None or wake_id == pending.id)

    def roll_over(self, key: InstanceKey) -> bool:
        """The supervisor's wake ran out of time, but requests held on it have time left:
        ask again under a new id, keeping them held. False if nobody needs it any more."""
        pending = self.wakes[key]
        now = time.monotonic()
        if pending.held == 0 or pending.needed_until <= now:
            return False
        resend = asyncio.create_task(
            self.resend_wake(key, pending, pending.needed_until - now),
            name=f"tenement-proxy-rewake {key}",
        )
        self._resends.add(resend)
        resend.add_done_callback(self._resends.discard)
        return True

    def mark_ready(self, key: InstanceKey, socket: str) -> None:
        old = self.running.get(key)
        if old is not None and old != socket:
            self.pools.drop(old)
        self.running[key] = socket
        self.failed.discard(key)
        if (pending := self.wakes.pop(key, None)) and not pending.future.done():
            pending.future.set_result(socket)

    def mark_down(self, key: InstanceKey, code: int, failed: bool) -> None:
        if (socket := self.running.pop(key, None)) is not None:
            self.pools.drop(socket)
        if failed:
            self.wake_failed(key, "crash loop: start it manually", True)  # marks it failed
        else:
            self.failed.discard(key)  # e.g. an operator cleared `failed`
        for close in list(self.closers.get(key, ())):
            close(code)

    def wake_failed(
        self, key: InstanceKey, reason: str, failed: bool | None, refused: bool = False
    ) -> None:
        if failed:
            self.failed.add(key)
        pending = self.wakes.pop(key, None)
        if pending and not pending.future.done():
            retry_after = 30 if failed else 5
            pending.future.set_exception(WakeRejected(reason, retry_after, refused))
            pending.future.exception()  # retrieved: nobody may be waiting any more

    async def reload_routes(self) -> None:
        while True:
            await self._reload.wait()
            self._reload.clear()
            try:
                snapshot = await table.load()
            except Exception:
                log.exception("cannot reload the routing table; keeping the old one")
                continue
            # Readiness comes from messages, which are newer than any snapshot.
            self.table = snapshot

    # ---- waking -----------------------------------------------------------------------

    async def wake(self, key: InstanceKey, timeout: float, suspect: str | None = None) -> str:
        """Hold until `key` is ready and return its socket; raise WakeRejected if not.

        `suspect` is a socket that just refused us: the supervisor checks it is really
        gone before answering, rather than hand it back."""
        if key in self.failed:
            metrics.wake_finished(key, "rejected")
            raise WakeRejected(f"{key} is failed (crash loop); start it manually", 30)
        pending = self.wakes.get(key)
        now = time.monotonic()
        if pending is None or pending.future.done():
            pending = PendingWake(asyncio.get_running_loop().create_future(), now + timeout)
            pending.began = now
            pending.suspect = suspect
            pending.future.add_done_callback(functools.partial(self.wake_settled, key, pending))
            self.wakes[key] = pending
            await self.send_wake(key, pending, timeout)
        elif now > pending.deadline:
            # Its answer is overdue (a lost message): ask again; the held requests stay.
            await self.send_wake(key, pending, timeout)
        if pending.held >= self.max_held:
            metrics.wake_finished(key, "rejected")
            raise WakeRejected(f"too many requests waiting for {key} to wake")
        pending.held += 1
        pending.needed_until = max(pending.needed_until, now + timeout)
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(pending.future)
        except TimeoutError:
            if not pending.counted:
                pending.counted = True
                metrics.wake_finished(key, "timeout")
            raise WakeRejected(f"{key} did not become ready within {timeout:g}s") from None
        finally:
            pending.held -= 1

    async def send_wake(self, key: InstanceKey, pending: PendingWake, timeout: float) -> None:
        """Send (or send again) the wake under a new id; the old id's replies are stale."""
        pending.id = f"{self.channel}#{next(_wake_ids)}"
        pending.deadline = time.monotonic() + timeout
        message = {"type": "wake", "key": str(key), "reply": self.channel, "id": pending.id}
        if pending.suspect:
            message["suspect"] = pending.suspect
        try:
            await self.layer.send(SUPERVISOR_CHANNEL, message)
        except Exception as e:  # a full or unreachable layer: fail this wake cleanly
            log.warning("cannot ask the supervisor to wake %s: %s", key, e)
            self.wake_failed(key, "the supervisor cannot be reached", False)
            raise WakeRejected(f"cannot reach the supervisor to wake {key}") from None

    async def resend_wake(self, key: InstanceKey, pending: PendingWake, timeout: float) -> None:
        with contextlib.suppress(WakeRejected):  # send_wake has failed the held requests
            await self.send_wake(key, pending, timeout)

    @staticmethod
    def wake_settled(key: InstanceKey, pending: PendingWake, future: asyncio.Future[str]) -> None:
        """Count a wake once, when the supervisor answers (unless it already timed out)."""
        if pending.counted or future.cancelled():
            return
        pending.counted = True
        error = future.exception()
        if error is None:
            took = time.monotonic() - pending.began
            metrics.wake_finished(key, "ok", took)
            timeline.current().wake(key, took)
        elif isinstance(error, WakeRejected) and error.refused:
            # A proxy that started after the instance failed learns it only now: each
            # request it held was refused, as those refused up front are.
            metrics.wake_finished(key, "rejected", count=max(1, pending.held))
        else:
            metrics.wake_finished(key, "failed")

    def forget_socket(self, key: InstanceKey, socket: str) -> None:
        """The app refused a connection: it has exited, whatever we were told."""
        if self.running.get(key) == socket:
            del self.running[key]
        self.pools.drop(socket)

    # ---- activity -----------------------------------------------------------------------

    def opened(self, key: InstanceKey, websocket: bool = False) -> None:
        self.open[key] += 1
        if websocket:
            self.websockets[key] += 1
        self.touched.add(key)
        self.open_dirty = True

    def closed(self, key: InstanceKey, websocket: bool = False) -> None:
        self.open[key] -= 1
        if self.open[key] <= 0:
            del self.open[key]
        if websocket:
            self.websockets[key] -= 1
            if self.websockets[key] <= 0:
                del self.websockets[key]
        self.touched.add(key)
        self.open_dirty = True

    async def report_activity(self) -> None:
        """Send touched keys and open counts in one message per interval, never per request."""
        last_open_report = 0.0
        while True:
            await asyncio.sleep(ACTIVITY_INTERVAL)  # a fixed batching period, not a poll
            now = time.monotonic()
            stale = self.open and now - last_open_report > OPEN_REPORT_INTERVAL
            if self.open_dirty and self.open_gauge is not None:
                # The gauge follows the same batches: no metrics work per request.
                self.open_gauge.publish(self.open.items(), self.websockets)
            if not (self.touched or self.open_dirty or stale):
                continue
            message = {
                "type": "activity",
                "proxy": self.channel,
                "touched": [str(k) for k in self.touched],
                "open": {str(k): n for k, n in self.open.items()},
            }
            self.touched, self.open_dirty, last_open_report = set(), False, now
            try:
                await self.layer.send(SUPERVISOR_CHANNEL, message)
            except Exception as e:  # e.g. a full or unreachable layer: the next batch retries
                log.warning("cannot report activity to the supervisor: %s", e)

    def on_close(self, key: InstanceKey, close: Callable[[int], None]) -> Callable[[], None]:
        """Register a WebSocket's closer for supervisor stops; returns the unregister."""
        self.closers.setdefault(key, set()).add(close)

        def unregister() -> None:
            closers = self.closers.get(key)
            if closers is not None:
                closers.discard(close)
                if not closers:
                    del self.closers[key]

        return unregister


_states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ProxyState] = (
    weakref.WeakKeyDictionary()
)


async def current() -> ProxyState:
    """This event loop's proxy state, started on first use."""
    loop = asyncio.get_running_loop()
    state = _states.get(loop)
    if state is None:
        state = _states[loop] = ProxyState()
    elif state.started:
        return state
    return await state.ready()


def existing() -> ProxyState | None:
    """This event loop's proxy state if a tenant request has started it (for /status)."""
    return _states.get(asyncio.get_running_loop())


async def close_current() -> None:
    loop = asyncio.get_running_loop()
    if (state := _states.pop(loop, None)) is not None:
        await state.close()
