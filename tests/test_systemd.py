"""Type=notify: a real runsupervisor with NOTIFY_SOCKET pointed at a datagram socket of
the test's own, as systemd would; the watchdog follows /health's checks."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from instances.systemd import Notifier
from tests.conftest import REPO, TENANT_PYTHON
from tests.harness import Deployment, free_port

pytestmark = [pytest.mark.timeout(120)]

CONFIG = f"""
[service.notified]
command = "{TENANT_PYTHON} {REPO}/tests/apps/hello.py"
health = "/health"

[instances]
notified = ["alice"]
"""


class Listener:
    """systemd's end: collects the supervisor's notify datagrams."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def wait_for(self, field: str, timeout: float) -> float:
        """Seconds until a message holding `field` arrives (AssertionError if none)."""
        began = time.monotonic()
        while time.monotonic() - began < timeout:
            self.sock.settimeout(max(0.01, timeout - (time.monotonic() - began)))
            try:
                message = self.sock.recv(4096).decode()
            except TimeoutError:
                break
            self.messages.append(message)
            if field in message.split("\n"):
                return time.monotonic() - began
        raise AssertionError(f"no {field} within {timeout}s; got {self.messages}")

    def drain(self) -> list[str]:
        self.sock.setblocking(False)
        try:
            while True:
                self.messages.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            return self.messages
        finally:
            self.sock.setblocking(True)


@pytest.fixture
def listener(short_tmp: Path) -> Iterator[Listener]:
    found = Listener(short_tmp / "notify.sock")
    try:
        yield found
    finally:
        found.sock.close()


@pytest.fixture
def deployment(short_tmp: Path) -> Iterator[Deployment]:
    d = Deployment(short_tmp, CONFIG)
    try:
        yield d
    finally:
        d.cleanup()


def test_ready_then_watchdog_pings_that_stop_while_health_fails(
    deployment: Deployment, listener: Listener, short_tmp: Path
) -> None:
    deployment.env.update(
        NOTIFY_SOCKET=str(short_tmp / "notify.sock"),
        WATCHDOG_USEC="400000",  # ping every 0.2 s
        TENEMENT_HEALTH_MAX_LAG_MS="300",
    )
    port = free_port()
    proc = deployment.start(
        "--config", str(deployment.config), "--bind", f"127.0.0.1:{port}", http=True
    )
    listener.wait_for("READY=1", 60)
    assert any("STATUS=serving" in m for m in listener.messages)
    listener.wait_for("WATCHDOG=1", 2)
    listener.wait_for("WATCHDOG=1", 2)
    # Hang the supervisor for a second: its loop lags past the limit, /health fails, and
    # the pings stop while the lag is within the check's 5 s window.
    os.kill(proc.pid, signal.SIGSTOP)
    time.sleep(1.0)
    listener.drain()
    listener.messages.clear()
    os.kill(proc.pid, signal.SIGCONT)
    time.sleep(2.0)
    during = listener.drain()
    assert not any("WATCHDOG=1" in m.split("\n") for m in during), during
    assert any(m.startswith("STATUS=unhealthy: event_loop") for m in during), during
    # Healthy again once the lag leaves the window: pings resume.
    listener.messages.clear()
    listener.wait_for("WATCHDOG=1", 10)
    proc.send_signal(signal.SIGTERM)
    listener.wait_for("STOPPING=1", 10)
    assert proc.wait(30) == 0


def test_abstract_socket_names_and_a_missing_listener(short_tmp: Path) -> None:
    """The abstract-namespace form ('@name') systemd also uses."""
    name = f"tenement-test-{os.getpid()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind("\0" + name)
    server.settimeout(5)
    notifier = Notifier("@" + name)
    try:
        assert notifier.send("READY=1", "STATUS=x")
        assert server.recv(100) == b"READY=1\nSTATUS=x"
    finally:
        notifier.close()
        server.close()
    # A socket nobody listens on: False and a logged warning, never an exception.
    gone = Notifier(str(short_tmp / "nobody.sock"))
    try:
        assert gone.send("WATCHDOG=1") is False
    finally:
        gone.close()
