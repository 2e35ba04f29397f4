"""Slowloris against a supervisor with a lowered descriptor limit (256): the edge sheds
new connections before the supervisor starves, and running out of descriptors is never
held against a tenant."""

from __future__ import annotations

import json
import socket
import time

import pytest

from tests.edge.conftest import Edge, edge_deployment, read_all

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

SLOW = {"TENEMENT_HEADER_TIMEOUT": "60", "TENEMENT_MAX_CONNECTIONS_PER_ADDRESS": "100000"}
# The default reserve (128 of 256): the edge stops admitting well before the limit.
shedding = edge_deployment(SLOW, nofile=256, service="shed")
# A reserve of 1: the edge lets the process reach its limit, so the supervisor's own
# health checks and spawns meet EMFILE.
starved = edge_deployment({**SLOW, "TENEMENT_FD_RESERVE": "1"}, nofile=256, service="starve")


def slowloris(edge: Edge, n: int) -> tuple[list[socket.socket], int]:
    """Open n connections that each send part of a head; (those held, those refused)."""
    opened = []
    for _ in range(n):
        try:
            s = edge.dial(timeout=2)
            s.sendall(f"GET / HTTP/1.1\r\nHost: alice.{edge.service}.localhost\r\nX-A: ".encode())
            opened.append(s)
        except OSError:
            pass
    time.sleep(0.5)
    held = [s for s in opened if still_open(s)]
    for s in set(opened) - set(held):
        s.close()
    return held, n - len(held)


def still_open(s: socket.socket) -> bool:
    """Neither answered (a 503) nor closed by the server."""
    s.setblocking(False)
    try:
        s.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def hold(held: list[socket.socket], seconds: float) -> None:
    """Trickle a byte on every held connection now and then, as a slowloris does."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for s in held:
            try:
                s.send(b"a")
            except OSError:
                pass
        time.sleep(0.5)


def close_all(held: list[socket.socket]) -> None:
    for s in held:
        s.close()


def restarts(edge: Edge) -> dict[str, tuple[str, int]]:
    rows = edge.rows()
    keys = (f"{edge.service}:alice", f"{edge.service}:bob")
    return {k: (rows[k]["state"], rows[k]["restart_count"]) for k in keys}


def untouched(edge: Edge) -> dict[str, tuple[str, int]]:
    return {f"{edge.service}:{tenant}": ("running", 0) for tenant in ("alice", "bob")}


def test_slowloris_is_shed_and_tenants_stay_running(shedding: Edge) -> None:
    before = restarts(shedding)
    held, refused = slowloris(shedding, 400)
    try:
        assert refused > 0 and len(held) < 200, (len(held), refused)
        hold(held, 4)  # four health-check intervals under attack
        assert restarts(shedding) == before == untouched(shedding)
    finally:
        close_all(held)
    time.sleep(0.5)
    assert shedding.get_ms() < 1000  # served again at once
    assert "connection refused: too many file descriptors" in shedding.log_text()


def test_with_almost_no_reserve_tenants_still_stay_running(starved: Edge) -> None:
    # The in-process test (test_fd_supervisor.py) makes the supervisor meet a real EMFILE;
    # here the edge may take all but one descriptor and the tenants must not notice.
    before = restarts(starved)
    held, _ = slowloris(starved, 400)
    try:
        hold(held, 5)
        assert restarts(starved) == before == untouched(starved), starved.log_text()[-5000:]
    finally:
        close_all(held)
    time.sleep(0.5)
    with starved.dial() as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        response = read_all(s)
    body = json.loads(response.split(b"\r\n\r\n", 1)[1])
    fd = body["checks"]["file_descriptors"]
    assert fd["limit_for_clients"] == 255 and fd["reserve"] == 1
    assert fd["edge_refused"]["by_reason"].get("file descriptors", 0) > 0
    assert restarts(starved) == before
