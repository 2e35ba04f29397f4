"""Noticing a client that leaves while nobody reads from it.

While a request is held for a wake, or waits for its response head, the proxy is not
reading the client: its disconnect would go unnoticed until the timeout, and it would
keep counting as an open connection and against the held-request cap. The reader here
reads ahead in those moments (a little: at most READ_AHEAD bytes of body are buffered)
and hands what it read to the real consumer later, in order.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from typing import Any

READ_AHEAD = 64 * 1024  # body bytes buffered while watching; then watching stops


class ClientGone(Exception):
    """The client disconnected; drop the upstream exchange."""


async def hold(client: ClientReader, wake: Callable[[], Awaitable[str]], name: str) -> str:
    """Await `wake()` (the socket of a woken instance), but raise ClientGone as soon as
    the client leaves: it is dropped from the hold (and the held-request count) at once."""
    waking = asyncio.create_task(wake(), name=name)
    client.watch(waking.cancel)
    try:
        return await waking
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if client.gone and task is not None and not task.cancelling():
            raise ClientGone from None  # the wake was cancelled for the client, not us
        raise


class ClientReader:
    def __init__(self, receive: Callable[[], Awaitable[dict[str, Any]]], name: str) -> None:
        self.raw = receive
        self.name = name
        self.ahead: collections.deque[dict[str, Any]] = collections.deque()
        self.watcher: asyncio.Task[None] | None = None
        self.gone = False
        self.on_gone: Callable[[], None] = _nothing

    async def receive(self) -> dict[str, Any]:
        """The next message from the client: read ahead ones first."""
        await self.stop_watching()
        if self.ahead:
            return self.ahead.popleft()
        return await self.raw()

    def watch(self, on_gone: Callable[[], None]) -> None:
        """Call `on_gone` as soon as the client disconnects (until receive() is called)."""
        self.on_gone = on_gone
        if self.gone:
            on_gone()
        elif self.watcher is None:
            self.watcher = asyncio.create_task(self.read_ahead(), name=f"client {self.name}")

    async def stop_watching(self) -> None:
        watcher, self.watcher = self.watcher, None
        self.on_gone = _nothing
        if watcher is not None and not watcher.done():
            watcher.cancel()
            # A cancelled receive() consumes nothing: uvicorn keeps the body it had.
            await asyncio.gather(watcher, return_exceptions=True)

    async def read_ahead(self) -> None:
        buffered = sum(len(m.get("body", b"")) for m in self.ahead)
        while buffered < READ_AHEAD:
            if self.ahead and _is_disconnect(self.ahead[-1]):
                return
            message = await self.raw()
            self.ahead.append(message)
            if _is_disconnect(message):
                self.gone = True
                self.on_gone()
                return
            buffered += len(message.get("body", b""))


def _is_disconnect(message: dict[str, Any]) -> bool:
    return message["type"] in ("http.disconnect", "websocket.disconnect")


def _nothing() -> None:
    pass
