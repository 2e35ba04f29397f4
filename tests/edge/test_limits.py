"""The edge limits of proxy/edge.py against a real runsupervisor and raw sockets."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from websockets.sync.client import connect as ws_connect

from tests.edge.conftest import Edge, p50, read_all, status_of

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

HEAD = b"GET /whoami HTTP/1.1\r\nHost: alice.edge.localhost\r\n"
LIMIT = 64 * 1024  # TENEMENT_MAX_HEADER_KB's default
MIB = 1024 * 1024


def send_huge_header(edge: Edge, total: int, chunk: int, pause: float) -> tuple[bytes, float]:
    """Send a head with a `total`-byte header; the answer and when it came after the limit.

    Stops sending as soon as the server answers (or closes): it never reads past the limit.
    """
    s = edge.dial()
    try:
        s.sendall(HEAD + b"X-Big: ")
        sent, crossed = len(HEAD) + 7, None
        s.setblocking(False)
        block = b"a" * chunk
        while sent < total:
            try:
                if s.recv(1, socket.MSG_PEEK):
                    break  # answered
            except BlockingIOError:
                pass
            try:
                sent += s.send(block)
            except BlockingIOError:
                time.sleep(0.001)
            except (BrokenPipeError, ConnectionResetError):
                break
            if crossed is None and sent > LIMIT:
                crossed = time.monotonic()
            if pause:
                time.sleep(pause)
        s.settimeout(10)
        response = read_all(s)
        return response, time.monotonic() - (crossed or time.monotonic())
    finally:
        s.close()


class Attack(threading.Thread):
    """Sends 64 MiB headers to alice's host, one after another, until stopped."""

    def __init__(self, edge: Edge, chunk: int, pause: float) -> None:
        super().__init__(daemon=True)
        self.edge, self.chunk, self.pause = edge, chunk, pause
        self.results: list[tuple[bytes, float]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.results.append(send_huge_header(self.edge, 64 * MIB, self.chunk, self.pause))

    def stop(self) -> list[tuple[bytes, float]]:
        self.done.set()
        self.join(30)
        return self.results


@pytest.mark.parametrize(("chunk", "pause"), [(MIB, 0), (1024, 0.002)], ids=["fast", "slow"])
def test_64_mib_header_is_refused_at_the_limit_and_neighbours_stay_fast(
    edge: Edge, chunk: int, pause: float
) -> None:
    edge.get_ms()  # a warm pooled connection to bob, as in steady state
    attack = Attack(edge, chunk, pause)
    attack.start()
    try:
        neighbour_p50 = p50(edge.get_ms, 30)
    finally:
        results = attack.stop()
    assert results
    for response, after_limit in results:
        assert status_of(response) == 431, response[:200]
        assert b"over 65536 bytes" in response
        assert after_limit < 1.0
    assert neighbour_p50 < 10


def test_long_header_line_many_headers_and_long_url(edge: Edge) -> None:
    line = HEAD + b"X-Long: " + b"a" * 9000 + b"\r\n\r\n"
    assert status_of(edge.exchange(line)) == 431
    many = HEAD + b"".join(b"X-%d: 1\r\n" % i for i in range(101)) + b"\r\n"
    assert b"more than 100 header lines" in edge.exchange(many)
    url = b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: alice.edge.localhost\r\n\r\n"
    assert status_of(edge.exchange(url)) == 414
    # Just under every limit is served.
    ok = HEAD + b"X-Long: " + b"a" * 8000 + b"\r\nConnection: close\r\n\r\n"
    assert status_of(edge.exchange(ok)) == 200


def test_websocket_handshake_with_a_big_header_gets_an_answer(edge: Edge) -> None:
    handshake = (
        b"GET /ws HTTP/1.1\r\nHost: alice.edge.localhost\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\nX-Big: " + b"a" * 8185 + b"\r\n\r\n"
    )
    assert status_of(edge.exchange(handshake)) == 431
    # And an ordinary handshake still works.
    sock = edge.dial()
    with ws_connect("ws://alice.edge.localhost/ws", sock=sock, open_timeout=10) as ws:
        ws.send("hi")
        assert ws.recv(timeout=10) == "hi"


def test_idle_connection_is_closed_by_the_header_timeout(edge: Edge) -> None:
    with edge.dial() as s:
        began = time.monotonic()
        assert read_all(s) == b""  # closed, nothing said: it never asked anything
        assert 0.8 < time.monotonic() - began < 3


def test_slow_head_gets_408(edge: Edge) -> None:
    with edge.dial() as s:
        began = time.monotonic()
        for byte in HEAD[:8]:  # a byte every 100 ms, less than the whole head in time
            s.sendall(bytes([byte]))
            time.sleep(0.1)
        response = read_all(s)
    assert status_of(response) == 408
    assert time.monotonic() - began < 3


def test_idle_keep_alive_connection_is_closed(edge: Edge) -> None:
    with edge.dial() as s:
        s.sendall(HEAD + b"\r\n")
        began = time.monotonic()
        response = read_all(s)  # the answer, then the close after the keep-alive timeout
    assert status_of(response) == 200
    assert 0.8 < time.monotonic() - began < 3


def test_stalled_body_gets_408(edge: Edge) -> None:
    with edge.dial() as s:
        s.sendall(
            b"POST /upload HTTP/1.1\r\nHost: alice.edge.localhost\r\n"
            b"Content-Length: 1000\r\n\r\nfirst bytes"
        )
        began = time.monotonic()
        response = read_all(s)
    assert status_of(response) == 408, response[:200]
    assert b"no request body data" in response
    assert 0.8 < time.monotonic() - began < 3


def test_connections_per_address_are_capped(edge: Edge) -> None:
    held = [edge.dial() for _ in range(40)]
    try:
        time.sleep(0.2)
        refused = edge.exchange(b"")
        assert status_of(refused) == 503
        assert b"too many connections per address" in refused
    finally:
        for s in held:
            s.close()
    time.sleep(0.2)
    assert p50(edge.get_ms, 3) < 1000  # slots are given back


def test_refusals_are_logged_and_counted(edge: Edge) -> None:
    assert "request refused: 431" in edge.log_text()
