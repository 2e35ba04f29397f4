"""Lifecycle correctness under faults (issue 12): one test per defect found, each with a
real runsupervisor, real tenant processes and a real database (unless the defect lives
in one part, then that part for real). The test names say which defect."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from channels.layers import InMemoryChannelLayer

from instances.ids import InstanceKey
from instances.messages import PROXY_GROUP, SUPERVISOR_CHANNEL
from tests.conftest import REPO
from tests.faults import APP, FullDisk, Site, can_mount, locked_database
from tests.harness import http_request

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

CONFIG = f"""
[settings]
health_check_interval = 0.5
backoff_base_ms = 100
backoff_max_ms = 400

[service.app]
command = "{APP}"
health = "/health"
stop_timeout = 2
wake_timeout = 10

[service.slow]
command = "{APP}"
health = "/health"
stop_timeout = 2
wake_timeout = 10
env = {{ TESTAPP_START_DELAY = "3" }}

[service.late]
command = "{APP}"
health = "/health"
stop_timeout = 2
wake_timeout = 3
env = {{ TESTAPP_START_DELAY = "4" }}

[service.idle]
command = "{APP}"
health = "/health"
stop_timeout = 2
idle_timeout = 1
"""


@pytest.fixture
def site(short_tmp: Path) -> Iterator[Site]:
    s = Site(short_tmp, CONFIG, TENEMENT_DRAIN_TIMEOUT="1")
    try:
        yield s
        s.assert_legal_transitions()
    finally:
        s.cleanup()


@pytest.fixture
def full_disk_site(short_tmp: Path) -> Iterator[tuple[Site, FullDisk]]:
    if not can_mount():
        pytest.skip("needs root to mount a small tmpfs")
    s = Site(short_tmp, CONFIG, TENEMENT_DRAIN_TIMEOUT="1")
    disk = FullDisk(s.data)
    try:
        yield s, disk
    finally:
        s.cleanup()
        disk.unmount()


def events(site: Site, key: str, kind: str) -> int:
    service, instance_id = key.split(":")
    with contextlib.closing(sqlite3.connect(site.data / "tenement.sqlite3", timeout=10)) as db:
        (n,) = db.execute(
            "SELECT COUNT(*) FROM instances_event e JOIN instances_instance i ON i.id ="
            " e.instance_id JOIN instances_service s ON s.id = i.service_id WHERE s.name = ?"
            " AND i.instance_id = ? AND e.kind = ?",
            (service, instance_id, kind),
        ).fetchone()
    return n


def fetch(site: Site, key: str, path: str = "/health", timeout: float = 30) -> tuple[int, str]:
    service, instance_id = key.split(":")
    response, body = http_request(
        site.port, f"{instance_id}.{service}.localhost", path, timeout=timeout
    )
    return response.status, body.decode(errors="replace")


def in_background(fn, *args):  # type: ignore[no-untyped-def]
    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(fn, *args)
    pool.shutdown(wait=False)
    return future


# ---- the wake path ------------------------------------------------------------------------


def test_defect_01_operator_stop_cancels_a_slow_wake_without_flapping(site: Site) -> None:
    site.serve()
    site.register("slow:alice")
    held = in_background(fetch, site, "slow:alice")
    site.wait_states({"slow:alice": "starting"}, timeout=20)
    began = time.monotonic()
    stopped = site.manage("stop", "slow:alice")
    assert stopped.returncode == 0, stopped.stderr
    status, body = held.result(timeout=15)
    assert status == 503 and "stopped by the operator" in body, body
    assert time.monotonic() - began < 10  # well within wake_timeout
    time.sleep(4)  # long enough for a flap (a start every second) to show
    assert site.rows()["slow:alice"]["state"] == "stopped"
    assert events(site, "slow:alice", "starting") == 1
    assert "slow:alice" not in site.tenants()


def test_defect_02_request_joining_just_before_the_deadline_is_carried_over(site: Site) -> None:
    # The app needs ~4 s; wake_timeout is 3 s. The first request gives up at 3 s; the
    # second, joining at 2.5 s, still has time when the supervisor's first wake times out.
    site.serve()
    site.register("late:alice")
    first = in_background(fetch, site, "late:alice")
    time.sleep(2.5)
    second = in_background(fetch, site, "late:alice")
    assert first.result(timeout=15)[0] == 503
    status, body = second.result(timeout=15)
    assert status == 200, body


def test_defect_03_a_late_unavailable_reply_settles_only_its_own_wake(db: None) -> None:
    from proxy.state import ProxyState

    async def scenario() -> None:
        state = ProxyState()
        state.channel = await state.layer.new_channel("tenement.proxy.")
        key = InstanceKey("app", "alice")
        # A wake whose answer is overdue (its deadline passed): the next request asks again.
        first = asyncio.create_task(state.wake(key, 0.2), name="test-wake-1")
        old = await state.layer.receive(SUPERVISOR_CHANNEL)
        await asyncio.sleep(0.3)
        second = asyncio.create_task(state.wake(key, 5), name="test-wake-2")
        new = await state.layer.receive(SUPERVISOR_CHANNEL)
        # The first wake's late "unavailable" must not fail the second...
        late = {"type": "wake.unavailable", "key": str(key), "reason": "late", "id": old.get("id")}
        state.handle(late)
        await asyncio.sleep(0.05)
        assert not second.done()
        # ...which its own answer settles.
        state.handle({"type": "wake.ready", "key": str(key), "socket": "/s", "id": new.get("id")})
        assert await asyncio.wait_for(second, 1) == "/s"
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)

    asyncio.run(scenario())


def test_defect_04_the_proxy_stays_in_its_broadcast_group(db: None) -> None:
    from proxy.state import ProxyState

    async def scenario() -> None:
        state = ProxyState()
        state.layer = InMemoryChannelLayer(group_expiry=1)
        await state.ready()
        try:
            await asyncio.sleep(2.5)  # membership from the first join has expired by now
            state._reload.clear()
            await state.layer.group_send(PROXY_GROUP, {"type": "instance.down", "key": "a:b"})
            state.running[InstanceKey("a", "b")] = "/gone"
            await state.layer.group_send(PROXY_GROUP, {"type": "instance.down", "key": "a:b"})
            async with asyncio.timeout(2):
                while InstanceKey("a", "b") in state.running:
                    await asyncio.sleep(0.01)
        finally:
            await state.close()

    asyncio.run(scenario())


def test_defect_05_a_client_that_leaves_is_dropped_from_the_hold_at_once(site: Site) -> None:
    site.serve()
    site.register("slow:alice")
    conn = socket.create_connection(("127.0.0.1", site.port), timeout=5)
    conn.sendall(b"GET / HTTP/1.1\r\nHost: alice.slow.localhost\r\n\r\n")
    site.wait_for("the request to be held", lambda: held(site) == 1, timeout=20)
    conn.close()
    waited = site.wait_for("the request to be dropped", lambda: held(site) == 0, timeout=10)
    assert waited < 1.0
    assert status_json(site)["open_connections"]["total"] == 0
    # The same for a WebSocket handshake held for the wake.
    site.manage("stop", "slow:alice")
    conn = socket.create_connection(("127.0.0.1", site.port), timeout=5)
    conn.sendall(
        b"GET / HTTP/1.1\r\nHost: alice.slow.localhost\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    site.wait_for("the handshake to be held", lambda: held(site) == 1, timeout=20)
    conn.close()
    waited = site.wait_for("the handshake to be dropped", lambda: held(site) == 0, timeout=10)
    assert waited < 1.0


def held(site: Site) -> int:
    wakes = status_json(site)["wakes_in_flight"]
    return sum(w["held_requests"] for w in wakes)


def status_json(site: Site) -> dict:  # type: ignore[type-arg]
    status, _, body = site.private_get("/status")
    assert status == 200, body
    return json.loads(body)


def test_defect_06_oversized_body_is_refused_before_any_wake(site: Site) -> None:
    site.serve()
    site.register("app:alice")
    conn = socket.create_connection(("127.0.0.1", site.port), timeout=5)
    conn.sendall(
        b"POST / HTTP/1.1\r\nHost: alice.app.localhost\r\nContent-Length: 2000000000\r\n\r\n"
    )
    head = conn.recv(4096)
    conn.close()
    assert head.startswith(b"HTTP/1.1 413"), head
    assert events(site, "app:alice", "starting") == 0  # refused before any wake
    assert fetch_method(site, "app:alice", "TRACE")[0] == 405
    assert fetch_method(site, "app:alice", "CONNECT")[0] in (400, 405)
    time.sleep(1)  # a wake, had one been sent, would have started it by now
    assert site.rows()["app:alice"]["state"] == "stopped"
    assert events(site, "app:alice", "starting") == 0
    assert "app:alice" not in site.tenants()


def fetch_method(site: Site, key: str, method: str) -> tuple[int, bytes]:
    service, instance_id = key.split(":")
    conn = socket.create_connection(("127.0.0.1", site.port), timeout=5)
    try:
        target = b"alice.app.localhost:80" if method == "CONNECT" else b"/"
        conn.sendall(
            method.encode()
            + b" "
            + target
            + b" HTTP/1.1\r\nHost: "
            + f"{instance_id}.{service}.localhost".encode()
            + b"\r\nContent-Length: 0\r\n\r\n"
        )
        head = conn.recv(4096)
    finally:
        conn.close()
    return int(head.split()[1]), head


# ---- database awaits inside lifecycle steps ------------------------------------------------


def test_defect_07_a_failing_running_write_does_not_kill_a_healthy_instance(
    full_disk_site: tuple[Site, FullDisk],
) -> None:
    site, disk = full_disk_site
    site.serve()
    site.register("app:alice")
    disk.fill()
    assert fetch(site, "app:alice")[0] == 200
    pids = site.tenants()["app:alice"]
    time.sleep(3)  # a kill and a restart would show by now
    assert site.tenants()["app:alice"] == pids
    assert fetch(site, "app:alice")[0] == 200
    disk.free()
    site.wait_for(
        "the mirror to catch up",
        lambda: (
            site.rows()["app:alice"]["state"] == "running"
            and site.rows()["app:alice"]["pid"] == pids[0]
        ),
        timeout=15,
    )
    assert site.rows()["app:alice"]["restart_count"] == 0


def test_defect_08_a_failing_stopping_write_does_not_wedge_the_instance(
    full_disk_site: tuple[Site, FullDisk],
) -> None:
    site, disk = full_disk_site
    site.serve()
    site.register("idle:alice")
    assert fetch(site, "idle:alice")[0] == 200
    disk.fill()
    # Idle after 1 s: it must be stopped, though no write can land...
    site.wait_for("the idle stop", lambda: "idle:alice" not in site.tenants(), timeout=6)
    # ...and wake again at once on the next request.
    assert fetch(site, "idle:alice", timeout=10)[0] == 200
    disk.free()


# Defect 9 (stop racing an exit) and 12 (asgiref's thread): tests/test_faults_inprocess.py


def test_defect_10_sigterm_with_the_database_locked_stops_everything(site: Site) -> None:
    proc = site.serve()
    site.register("app:alice", "app:bob")
    assert fetch(site, "app:alice")[0] == 200 and fetch(site, "app:bob")[0] == 200
    with locked_database(site):
        took = site.stop_within(proc, limit=1 + 2 + 2)  # drain + stop_timeout + 2 s
        assert proc.returncode == 0
    assert site.tenants() == {}
    assert took < 5


def test_defect_11_disk_full_sigterm_and_restart_leave_no_orphan_and_no_duplicate(
    full_disk_site: tuple[Site, FullDisk],
) -> None:
    site, disk = full_disk_site
    proc = site.serve()
    site.register("app:alice", "app:bob")
    assert fetch(site, "app:alice")[0] == 200 and fetch(site, "app:bob")[0] == 200
    disk.fill()
    # A crash now restarts alice with a pid the database cannot take.
    old = site.tenants()["app:alice"][0]
    signal_pid(old, signal.SIGKILL)
    site.wait_for(
        "alice restarted", lambda: site.tenants().get("app:alice", [old]) != [old], timeout=10
    )
    assert fetch(site, "app:alice")[0] == 200
    proc.send_signal(signal.SIGKILL)  # the supervisor dies too: its children live on
    proc.wait(10)
    proc = site.serve()
    assert fetch(site, "app:alice")[0] == 200
    site.wait_for("one copy each", lambda: all(len(p) == 1 for p in site.tenants().values()))
    assert len(site.tenants()["app:alice"]) == 1
    took = site.stop_within(proc, limit=1 + 2 + 2)
    assert proc.returncode == 0, site.log()[-3000:]
    assert site.tenants() == {}
    assert "Traceback" not in site.log()
    assert took < 5


def signal_pid(pid: int, sig: signal.Signals) -> None:
    os.kill(pid, sig)


# ---- shutdown --------------------------------------------------------------------------------


def open_stream(site: Site, key: str) -> socket.socket:
    service, instance_id = key.split(":")
    conn = socket.create_connection(("127.0.0.1", site.port), timeout=10)
    conn.sendall(f"GET /hold HTTP/1.1\r\nHost: {instance_id}.{service}.localhost\r\n\r\n".encode())
    head = conn.recv(4096)
    assert head.startswith(b"HTTP/1.1 200"), head
    return conn


def test_defect_13_sigterm_with_a_streaming_response_is_bounded(site: Site) -> None:
    proc = site.serve()
    site.register("app:alice")
    stream = open_stream(site, "app:alice")
    try:
        took = site.stop_within(proc, limit=1 + 2 + 2)
        assert proc.returncode == 0
        assert took >= 0.9  # the drain was given its second
    finally:
        stream.close()
    assert site.tenants() == {}


def test_defect_14_a_second_signal_skips_the_drain(short_tmp: Path) -> None:
    site = Site(short_tmp, CONFIG, TENEMENT_DRAIN_TIMEOUT="60")
    try:
        proc = site.serve()
        site.register("app:alice")
        stream = open_stream(site, "app:alice")
        try:
            began = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert proc.poll() is None  # draining
            proc.send_signal(signal.SIGINT)
            proc.wait(2 + 2)
            assert proc.returncode == 0
            assert time.monotonic() - began < 5
        finally:
            stream.close()
        assert site.tenants() == {}
    finally:
        site.cleanup()


# ---- start-up ----------------------------------------------------------------------------------


def test_defect_15_commands_racing_on_a_fresh_data_dir_set_it_up_once(short_tmp: Path) -> None:
    site = Site(short_tmp, CONFIG)
    try:
        racers = [
            subprocess.Popen(
                [
                    sys.executable,
                    str(REPO / "manage.py"),
                    "createtoken",
                    "--name",
                    f"t{i}",
                    "--data-dir",
                    str(site.data),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=site.env,
                cwd=REPO,
            )
            for i in range(3)
        ]
        proc = site.serve()
        for racer in racers:
            _out, err = racer.communicate(timeout=90)
            assert racer.returncode == 0, err.decode()
            assert b"Traceback" not in err
        assert proc.poll() is None, site.log()
        assert "Traceback" not in site.log()
    finally:
        site.cleanup()
