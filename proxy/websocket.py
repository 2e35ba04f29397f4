"""WebSocket proxying: client <-> instance, both directions, close codes passed through.

Each hop answers its own pings (the ASGI server towards the client, `websockets` towards
the app), as nginx does; data frames, subprotocols and close codes pass end to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from django.conf import settings
from websockets.asyncio.client import ClientConnection, connect, unix_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from instances.addresses import parse_tcp
from proxy import headers as h
from proxy.client import ClientGone, ClientReader, hold
from proxy.session import Session
from proxy.state import WakeRejected
from proxy.upstream import connect_upstream

log = logging.getLogger("tenement.proxy")

# Handshake headers the websockets client writes itself.
HANDSHAKE = frozenset(
    {
        b"host",
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-protocol",
        b"sec-websocket-extensions",
        b"user-agent",
    }
)
# Codes that may not be sent in a close frame (RFC 6455 §7.4.1): what we send instead.
UNSENDABLE = {1005: 1000, 1006: 1011, 1015: 1011}


def sendable(code: int | None, fallback: int = 1000) -> int:
    if code is None:
        return fallback
    return UNSENDABLE.get(code, code)


class Tunnel(Session):
    """One proxied WebSocket session."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.upstream: ClientConnection | None = None
        # Set when the supervisor stops the instance: the code the client gets.
        self.going_away: int | None = None
        self._closing: asyncio.Task[None] | None = None
        self.client = ClientReader(self.receive, str(self.key))
        self.receive = self.client.receive

    async def run(self) -> None:
        if (await self.receive())["type"] != "websocket.connect":
            return
        unregister = self.state.on_close(self.key, self.supervisor_closed)
        self.state.opened(self.key, websocket=True)
        try:
            if await self.open():
                await self.pump()
        finally:
            self.state.closed(self.key, websocket=True)
            unregister()
            if self.upstream is not None:
                await self.upstream.close()

    # ---- handshake ------------------------------------------------------------------

    async def open(self) -> bool:
        """Wake the instance, connect to it, accept the client. False if refused."""
        try:
            self.upstream = await self.connect()
        except ClientGone:
            return False  # it left while held for a wake: nobody to answer
        except WakeRejected as e:
            await self.refuse(503, str(e))
            return False
        except InvalidStatus as e:
            await self.refuse(e.response.status_code, "the app refused the WebSocket")
            return False
        except (OSError, InvalidHandshake, TimeoutError) as e:
            await self.refuse(502, f"cannot open a WebSocket to the app: {e}")
            return False
        set_cookies = [
            (b"set-cookie", v.encode("latin-1"))
            for v in self.upstream.response.headers.get_all("Set-Cookie")
        ]
        await self.send(
            {
                "type": "websocket.accept",
                "subprotocol": self.upstream.subprotocol,
                "headers": set_cookies,
            }
        )
        return True

    async def connect(self) -> ClientConnection:
        socket = self.state.running.get(self.key)
        if socket is None:
            socket = await self.wake()
        try:
            return await self.dial(socket)
        except (FileNotFoundError, ConnectionRefusedError):
            self.state.forget_socket(self.key, socket)  # it has just exited: wake once
            return await self.dial(await self.wake(suspect=socket))
        finally:
            await self.client.stop_watching()  # from here on the pump reads the client

    async def wake(self, suspect: str | None = None) -> str:
        """Hold the handshake for a wake; a client that leaves is dropped at once."""
        return await hold(
            self.client,
            lambda: self.state.wake(self.key, self.target.wake_timeout, suspect),
            f"ws wake {self.key}",
        )

    async def dial(self, socket: str) -> ClientConnection:
        fwd = h.forwarded(self.scope, self.host, h.request_id(self.scope["headers"]))
        extra = [
            (n.decode("latin-1"), v.decode("latin-1")) for n, v in fwd if n.lower() not in HANDSHAKE
        ]
        user_agent = h.header(self.scope["headers"], b"user-agent")
        async with asyncio.timeout(self.target.request_timeout):
            sock = await connect_upstream(socket)
        dial = connect if parse_tcp(socket) else unix_connect  # unix_connect: AF_UNIX only
        return await dial(
            sock=sock,
            uri=f"ws://{self.host.decode('latin-1')}{h.target(self.scope).decode('latin-1')}",
            subprotocols=self.scope.get("subprotocols") or None,
            additional_headers=extra,
            user_agent_header=user_agent.decode("latin-1") if user_agent else None,
            compression=None,
            proxy=None,
            open_timeout=self.target.request_timeout,
            ping_interval=None,
            max_size=settings.TENEMENT_MAX_BODY_MB * 1024 * 1024,
        )

    async def refuse(self, status: int, detail: str) -> None:
        log.info("%s websocket refused (%s): %s", self.key, status, detail)
        if "websocket.http.response" not in self.scope.get("extensions", {}):
            await self.send({"type": "websocket.close", "code": 1013 if status == 503 else 1011})
            return
        body = f"{status} {detail}\n".encode()
        headers = [(b"content-type", b"text/plain; charset=utf-8")]
        if status == 503:
            headers.append((b"retry-after", b"5"))
        await self.send(
            {"type": "websocket.http.response.start", "status": status, "headers": headers}
        )
        await self.send({"type": "websocket.http.response.body", "body": body})

    # ---- data --------------------------------------------------------------------------

    async def pump(self) -> None:
        up = asyncio.create_task(self.client_to_app(), name=f"ws-up {self.key}")
        down = asyncio.create_task(self.app_to_client(), name=f"ws-down {self.key}")
        try:
            await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (up, down):
                task.cancel()
            for result in await asyncio.gather(up, down, return_exceptions=True):
                if isinstance(result, Exception) and not isinstance(result, ConnectionClosed):
                    log.error("%s websocket: %r", self.key, result)
            if self._closing is not None:
                await asyncio.gather(self._closing, return_exceptions=True)

    async def client_to_app(self) -> None:
        assert self.upstream is not None
        while True:
            message = await self.receive()
            if message["type"] == "websocket.disconnect":
                code = sendable(message.get("code"), 1001)
                await self.upstream.close(code, message.get("reason") or "")
                return
            data = message.get("text")
            payload = data if data is not None else message.get("bytes") or b""
            with contextlib.suppress(ConnectionClosed):  # app_to_client reports the close
                await self.upstream.send(payload)

    async def app_to_client(self) -> None:
        assert self.upstream is not None
        try:
            async for data in self.upstream:
                key = "text" if isinstance(data, str) else "bytes"
                await self.send({"type": "websocket.send", key: data})
        except ConnectionClosed:
            pass
        await self.send(self.close_message())

    def close_message(self) -> dict[str, Any]:
        assert self.upstream is not None
        if self.going_away is not None:
            return {
                "type": "websocket.close",
                "code": self.going_away,
                "reason": "instance stopping" if self.going_away == 1001 else "restarting",
            }
        frame = self.upstream.protocol.close_rcvd
        if frame is None:  # the app vanished without a close frame
            return {"type": "websocket.close", "code": 1011, "reason": "app went away"}
        return {"type": "websocket.close", "code": sendable(frame.code), "reason": frame.reason}

    def supervisor_closed(self, code: int) -> None:
        """The supervisor is stopping (1001) or restarting (1012) the instance."""
        self.going_away = code
        if self.upstream is not None and self._closing is None:
            self._closing = asyncio.create_task(
                self.upstream.close(code), name=f"ws-close {self.key}"
            )
