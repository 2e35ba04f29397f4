"""What every proxied request or WebSocket starts from."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from instances.ids import InstanceKey
from proxy.state import ProxyState
from routing.table import Target

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Session:
    """One client exchange bound for one instance (an HTTP request or a WebSocket)."""

    def __init__(
        self,
        state: ProxyState,
        target: Target,
        scope: dict[str, Any],
        receive: Receive,
        send: Send,
        host: bytes,
    ) -> None:
        self.state = state
        self.target = target
        self.key: InstanceKey = target.key
        self.scope = scope
        self.receive = receive
        self.send = send
        self.host = host
