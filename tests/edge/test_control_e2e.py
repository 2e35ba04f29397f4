"""The control host's body limit against a real runsupervisor: a 1 GiB anonymous POST is
refused at once, and nothing of it reaches the disk."""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.edge.conftest import Edge, edge_deployment, read_all, status_of

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

GIB = 2**30
TMP = Path("/tmp") / f"tenement-edge-tmp-{os.getpid()}"
TMP.mkdir(exist_ok=True)
# Django spools bodies to TMPDIR: pointing it at an empty directory makes growth visible.
edge = edge_deployment({"TMPDIR": str(TMP)}, service="ctl")


@pytest.fixture(scope="module", autouse=True)
def remove_tmp() -> Iterator[None]:
    yield
    shutil.rmtree(TMP, ignore_errors=True)


def disk_bytes(*roots: Path) -> int:
    return sum(f.stat().st_size for root in roots for f in root.rglob("*") if f.is_file())


def stream(port: int, head: bytes, chunk: bytes, total: int) -> tuple[bytes, int]:
    """Send `head` then up to `total` bytes of `chunk`s until the server answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head)
        s.setblocking(False)
        sent = 0
        while sent < total:
            try:
                if s.recv(1, socket.MSG_PEEK):
                    break
            except BlockingIOError:
                pass
            try:
                sent += s.send(chunk)
            except BlockingIOError:
                time.sleep(0.001)
            except (BrokenPipeError, ConnectionResetError):
                break
        s.settimeout(10)
        return read_all(s), sent


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_1_gib_unauthenticated_post_is_refused_with_no_disk_growth(
    edge: Edge, framing: str
) -> None:
    before = disk_bytes(TMP, edge.data)
    if framing == "content-length":
        head = f"POST /api/services/ HTTP/1.1\r\nHost: localhost\r\nContent-Length: {GIB}\r\n"
        chunk = b"a" * 65536
    else:
        head = "POST /api/services/ HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
        chunk = b"10000\r\n" + b"a" * 65536 + b"\r\n"
    head += "Content-Type: application/json\r\n\r\n"
    response, sent = stream(edge.port, head.encode(), chunk, GIB)
    assert status_of(response) == 413, response[:300]
    assert b'"message": "request body over 1024 KiB"' in response
    assert sent < 64 * 2**20  # refused long before the gigabyte
    assert disk_bytes(TMP, edge.data) - before < 2**20
