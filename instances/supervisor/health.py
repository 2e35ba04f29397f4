"""Health checks over a Unix socket or a loopback TCP port (`tcp:127.0.0.1:PORT`): a real
HTTP/1.1 exchange, always under a timeout."""

from __future__ import annotations

import asyncio
from typing import NamedTuple

import h11

from instances.addresses import parse_tcp
from instances.supervisor import fds

MAX_RESPONSE_HEAD = 64 * 1024
MAX_RESPONSE_BODY = 1024 * 1024


class HealthResult(NamedTuple):
    ok: bool
    detail: str
    # The supervisor could not check (it is out of file descriptors): no verdict on the app.
    inconclusive: bool = False


async def check(socket_path: str, path: str, timeout: float) -> HealthResult:
    """GET `path` (2xx is healthy); with no path, a successful connect is enough."""
    try:
        async with asyncio.timeout(timeout):
            if not path:
                return await _connect_only(socket_path)
            return await _http_get(socket_path, path)
    except TimeoutError:
        return HealthResult(False, f"no answer within {timeout:g}s")
    except (OSError, h11.ProtocolError) as e:
        if fds.exhausted(e):
            fds.pressure.record("health check", e)
            return HealthResult(False, f"not checked: {_describe_error(e)}", inconclusive=True)
        return HealthResult(False, _describe_error(e))


def _describe_error(e: Exception) -> str:
    if isinstance(e, FileNotFoundError):
        return "socket does not exist yet"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, h11.ProtocolError):
        return f"invalid HTTP response: {e}"
    return f"{type(e).__name__}: {e}"


async def _open(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if (tcp := parse_tcp(address)) is not None:
        return await asyncio.open_connection(*tcp)
    return await asyncio.open_unix_connection(address)


async def _connect_only(socket_path: str) -> HealthResult:
    _reader, writer = await _open(socket_path)
    writer.close()
    await writer.wait_closed()
    return HealthResult(True, "socket accepts connections")


async def _http_get(socket_path: str, path: str) -> HealthResult:
    reader, writer = await _open(socket_path)
    try:
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
        request = h11.Request(
            method="GET",
            target=path,
            headers=[("Host", "localhost"), ("Connection", "close"), ("User-Agent", "tenement")],
        )
        writer.write(conn.send(request) + conn.send(h11.EndOfMessage()))
        await writer.drain()
        status = await _read_status(conn, reader)
    finally:
        writer.close()
    if 200 <= status < 300:
        return HealthResult(True, f"HTTP {status}")
    return HealthResult(False, f"HTTP {status}")


async def _read_status(conn: h11.Connection, reader: asyncio.StreamReader) -> int:
    """The response's status, once its whole body is read (up to MAX_RESPONSE_BODY): an
    app whose answer we hung up on would log a broken pipe for every check."""
    status, body = None, 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(16384))
            continue
        if isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += len(event.data)
            if body > MAX_RESPONSE_BODY and status is not None:
                return status  # a health body this large is the app's problem, not ours
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            if status is None:
                raise h11.RemoteProtocolError("connection closed before a response")
            return status
