"""Operator papercuts of issue 16, one test each (in-process where that is enough)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async

from instances.supervisor import health as probe
from tests.test_supervisor import (
    KEY,
    make_service,
    mirrored_row,
    operator_stop,
    register,
    supervising,
)

pytestmark = [pytest.mark.timeout(60)]


async def test_the_health_probe_reads_the_whole_response(short_tmp: Path) -> None:
    """The app's body goes out after its head; hanging up after the head broke its pipe."""
    body = b"x" * 200_000
    wrote: list[BaseException | None] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
        await writer.drain()
        await asyncio.sleep(0.1)  # the head arrives alone, as a slow app's would
        try:
            writer.write(body)
            await writer.drain()
            wrote.append(None)
        except OSError as e:
            wrote.append(e)
        finally:
            writer.close()

    path = str(short_tmp / "app.sock")
    server = await asyncio.start_unix_server(answer, path)
    try:
        result = await probe.check(path, "/health", 5)
        await asyncio.sleep(0.05)
    finally:
        server.close()
        await server.wait_closed()
    assert result.ok and result.detail == "HTTP 200"
    assert wrote == [None]


@pytest.mark.django_db(transaction=True)
async def test_health_checked_at_moves_on_every_check_and_stopped_is_not_healthy(
    short_tmp: Path,
) -> None:
    service = await sync_to_async(make_service)(short_tmp)
    await sync_to_async(register)(service, "alice")
    async with supervising(short_tmp, health_check_interval=0.1) as sup:
        await sup.wake(KEY)
        first = (await mirrored_row("alice")).health_checked_at
        await asyncio.sleep(0.5)  # several passing checks
        row = await mirrored_row("alice")
        assert row.health_ok is True and row.health_checked_at > first
        await operator_stop(sup, KEY)
        row = await mirrored_row("alice")
        assert row.state == "stopped" and row.health_ok is None
