"""The upstream connection's bookkeeping, driven by hand through asyncio.Protocol calls."""

from __future__ import annotations

import pytest

from proxy.upstream import HIGH_WATER, UpstreamConnection

pytestmark = pytest.mark.timeout(10)


class FakeTransport:
    def __init__(self) -> None:
        self.paused = False
        self.written: list[bytes] = []

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        pass


async def test_a_reused_connection_reads_again_after_a_big_body_paused_it() -> None:
    conn = UpstreamConnection()
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.begin(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", head_only=False)
    size = HIGH_WATER + 1000
    # The whole response in one read: past the high-water mark, and complete.
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size)
    assert (await conn.head)[0] == 200
    assert conn.complete and conn.reusable and transport.paused
    conn.begin(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n", head_only=False)
    assert not transport.paused  # else the next response would never be read
    conn.data_received(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert (await conn.head)[0] == 204 and conn.complete
