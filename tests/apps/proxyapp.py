"""An ASGI tenant app for the proxy tests, run by uvicorn on $SOCKET_PATH.

GET  /health            200
GET  /whoami            {"instance": ..., "pid": ..., "release": $RELEASE, "port": $PORT}
GET  /headers           the request headers as JSON (lists, in order)
POST /upload            streams the body in; answers {"bytes": n, "sha256": ...}
GET  /download?mb=N     N MiB of a repeating pattern, streamed in 64 KiB chunks (chunked)
GET  /sse               one event every 50 ms until the client goes; /active counts them
GET  /active            how many /sse streams are open right now
GET  /slow?s=N          waits N seconds before answering
WS   /ws                echoes text and bytes; accepts the first offered subprotocol;
                        the text "close:CODE" makes it close with CODE
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from typing import Any
from urllib.parse import parse_qs

CHUNK = bytes(range(256)) * 256  # 64 KiB
ACTIVE = {"sse": 0}


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "websocket":
        await websocket(scope, receive, send)
    elif scope["type"] == "http":
        await http(scope, receive, send)


async def http(scope: dict[str, Any], receive: Any, send: Any) -> None:
    path, query = scope["path"], parse_qs(scope["query_string"].decode())
    if path == "/upload":
        await upload(receive, send)
    elif path == "/download":
        await download(send, int(query.get("mb", ["1"])[0]))
    elif path == "/sse":
        await sse(receive, send)
    elif path == "/slow":
        await asyncio.sleep(float(query.get("s", ["5"])[0]))
        await answer(send, 200, {"slow": True})
    elif path == "/headers":
        headers = [[n.decode("latin-1"), v.decode("latin-1")] for n, v in scope["headers"]]
        await answer(send, 200, headers)
    elif path == "/whoami":
        who = {"instance": os.environ["INSTANCE_ID"], "pid": os.getpid()}
        extra = {"release": os.environ.get("RELEASE", ""), "port": os.environ.get("PORT")}
        await answer(send, 200, {**who, **extra})
    elif path == "/active":
        await answer(send, 200, ACTIVE)
    else:
        await answer(send, 200 if path == "/health" else 404, {"path": path})


async def answer(send: Any, status: int, payload: Any) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def upload(receive: Any, send: Any) -> None:
    digest, size = hashlib.sha256(), 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        digest.update(chunk)
        size += len(chunk)
        if not message.get("more_body"):
            break
    await answer(send, 200, {"bytes": size, "sha256": digest.hexdigest()})


async def download(send: Any, mib: int) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    for _ in range(mib * 16):
        await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def sse(receive: Any, send: Any) -> None:
    headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    ACTIVE["sse"] += 1
    gone = asyncio.ensure_future(wait_disconnect(receive))
    try:
        n = 0
        while not gone.done():
            await send(
                {"type": "http.response.body", "body": b"data: %d\n\n" % n, "more_body": True}
            )
            n += 1
            await asyncio.wait([gone], timeout=0.05)
    finally:
        ACTIVE["sse"] -= 1
        gone.cancel()


async def wait_disconnect(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def websocket(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await receive()  # websocket.connect
    offered = scope.get("subprotocols") or []
    await send({"type": "websocket.accept", "subprotocol": offered[0] if offered else None})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text")
        if text is not None and text.startswith("close:"):
            await send({"type": "websocket.close", "code": int(text[6:]), "reason": "asked"})
            return
        if text is not None:
            await send({"type": "websocket.send", "text": text})
        else:
            await send({"type": "websocket.send", "bytes": message.get("bytes")})
