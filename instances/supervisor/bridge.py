"""The supervisor's side of the channel layer: wakes and activity in, readiness out.

Proxies (in this process, or daphne/uvicorn workers in scaled mode) send `wake` and
`activity` to the "tenement.supervisor" channel; the supervisor answers a wake the moment
the readiness gate passes (no polling), and tells every proxy when an instance becomes
ready, goes down, or the set of tenants changes. See proxy/state.py for the messages.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from channels.layers import get_channel_layer

from instances.ids import InvalidName, parse_key
from instances.messages import PROXY_GROUP, SUPERVISOR_CHANNEL, receive_forever
from instances.supervisor.runtime import State
from instances.supervisor.wake import InstanceRefused, InstanceUnavailable, WakeTimedOut

if TYPE_CHECKING:
    from instances.supervisor.core import Supervisor
    from instances.supervisor.runtime import Runtime

log = logging.getLogger("tenement.supervisor")

# A proxy re-sends its open-connection counts every 2 s; one silent this long has died,
# and its counts must not keep instances awake forever.
OPEN_REPORT_EXPIRY = 10.0
GOING_AWAY, RESTARTING = 1001, 1012


class Bridge:
    def __init__(self, supervisor: Supervisor, clock: Callable[[], float] = time.monotonic) -> None:
        self.sup = supervisor
        self.clock = clock
        self.layer = get_channel_layer()
        self.outbox: list[tuple[str | None, dict[str, Any]]] = []
        self.has_mail = asyncio.Event()
        self.routes_pending = False
        # proxy channel -> (time of its last report, the keys it reported open)
        self.reports: dict[str, tuple[float, set[Any]]] = {}

    # ---- tasks ------------------------------------------------------------------------

    async def run(self) -> None:
        """Receive and send until cancelled (the supervisor cancels it on shutdown)."""
        if self.layer is None:
            log.warning("no channel layer: proxies cannot wake instances")
            await self.sup.stop_event.wait()
            return
        sender = asyncio.create_task(self.send_loop(), name="tenement-bridge-send")
        try:
            await self.receive_loop()
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)

    async def receive_loop(self) -> None:
        async for message in receive_forever(self.layer, SUPERVISOR_CHANNEL):
            try:
                self.handle(message)
            except (KeyError, TypeError, ValueError, InvalidName) as e:
                log.warning("ignoring a malformed message %r: %s", message.get("type"), e)

    async def send_loop(self) -> None:
        while True:
            await self.has_mail.wait()
            self.has_mail.clear()
            batch, self.outbox, self.routes_pending = self.outbox, [], False
            for channel, message in batch:
                try:
                    await self.deliver(channel, message)
                except Exception as e:  # a full layer or a gone proxy must not stop the rest
                    log.warning("cannot send %s: %s", message["type"], e)

    async def deliver(self, channel: str | None, message: dict[str, Any]) -> None:
        if channel is None:
            await self.layer.group_send(PROXY_GROUP, message)
        else:
            await self.layer.send(channel, message)

    def post(self, channel: str | None, message: dict[str, Any]) -> None:
        """Queue a message; callers never wait on the layer."""
        self.outbox.append((channel, message))
        self.has_mail.set()

    # ---- incoming ---------------------------------------------------------------------

    def handle(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "wake":
            key = parse_key(message["key"])
            suspect = message.get("suspect")
            wake_id = message.get("id")  # echoed, so a late answer settles only its own wake
            self.sup.spawn_helper(self.answer_wake(key, message["reply"], suspect, wake_id))
        elif kind == "activity":
            self.record_activity(message["proxy"], message["touched"], message["open"])
        elif kind == "sync":  # an operator changed desired state (routing/operations.py)
            self.sup.spawn_helper(self.sup.sync_now())
        else:
            log.warning("ignoring a message of unknown type %r", kind)

    async def answer_wake(
        self, key: Any, reply: str, suspect: str | None = None, wake_id: Any = None
    ) -> None:
        try:
            if suspect:
                await self.sup.confirm_unreachable(key, suspect)
            rt = await self.sup.wake(key)
        except InstanceUnavailable as e:
            current = self.sup.runtimes.get(key)
            failed = current is not None and current.state == State.FAILED
            message = {"type": "wake.unavailable", "key": str(key), "reason": str(e), "id": wake_id}
            refused = isinstance(e, InstanceRefused)  # failed already: nothing was tried
            timeout = isinstance(e, WakeTimedOut)  # still starting: it may be asked again
            self.post(reply, {**message, "failed": failed, "refused": refused, "timeout": timeout})
            return
        ready = {
            "type": "wake.ready",
            "key": str(key),
            "socket": socket_of(rt),
            "release": rt.release,
            "id": wake_id,
        }
        self.post(reply, ready)

    def record_activity(self, proxy: str, touched: list[str], open_counts: dict[str, int]) -> None:
        now = self.clock()
        for raw in touched:
            self.sup.touch(parse_key(raw))
        keys = {parse_key(raw) for raw in open_counts}
        _, before = self.reports.get(proxy, (now, set()))
        for key in before - keys:
            self.set_open(key, proxy, 0)
        for raw, count in open_counts.items():
            self.set_open(parse_key(raw), proxy, int(count))
        self.reports[proxy] = (now, keys)

    def set_open(self, key: Any, proxy: str, count: int) -> None:
        rt = self.sup.runtimes.get(key)
        if rt is None:
            return
        if count > 0:
            rt.proxy_open[proxy] = count
        elif rt.proxy_open.pop(proxy, None) is not None:
            rt.last_activity = self.clock()  # the idle timer counts from the last close

    def prune(self) -> bool:
        """Forget counts from proxies that stopped reporting. Returns whether any went."""
        now = self.clock()
        dead = [p for p, (at, _) in self.reports.items() if now - at > OPEN_REPORT_EXPIRY]
        for proxy in dead:
            _, keys = self.reports.pop(proxy)
            for key in keys:
                self.set_open(key, proxy, 0)
            log.info("proxy %s stopped reporting; dropping its open connections", proxy)
        return bool(dead)

    # ---- outgoing ---------------------------------------------------------------------

    def ready(self, rt: Runtime) -> None:
        message = {"type": "instance.ready", "key": str(rt.key), "socket": socket_of(rt)}
        self.post(None, {**message, "release": rt.release})

    def down(self, rt: Runtime, *, code: int = GOING_AWAY, failed: bool = False) -> None:
        self.post(
            None, {"type": "instance.down", "key": str(rt.key), "code": code, "failed": failed}
        )

    def routes_changed(self) -> None:
        if not self.routes_pending:
            self.routes_pending = True
            self.post(None, {"type": "routes.changed"})


def socket_of(rt: Runtime) -> str:
    return rt.upstream
