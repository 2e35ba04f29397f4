"""The supervisor driven in-process, with real child processes on real Unix sockets."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import os
import signal
import stat
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest
from asgiref.sync import sync_to_async

from instances import operations as ops
from instances.ids import InstanceKey
from instances.models import Event, Instance, LogLine, Service, SupervisorSettings
from instances.supervisor import InstanceUnavailable, Supervisor
from instances.supervisor.backoff import JITTER
from instances.supervisor.core import running_here
from instances.supervisor.runtime import Runtime
from tests.conftest import TENANT_PYTHON, TESTAPP

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]

FAST = {"health_check_interval": 0.1, "backoff_base_ms": 50, "backoff_max_ms": 400}


def make_service(
    tmp: Path, name: str = "app", env: dict[str, str] | None = None, **fields: Any
) -> Service:
    fields.setdefault("health", "/health")
    fields.setdefault("stop_timeout", 2)
    return Service.objects.create(
        name=name,
        command=f"{TENANT_PYTHON} {TESTAPP}",
        data_dir=str(tmp / "data"),
        env=env or {},
        **fields,
    )


def register(service: Service, *ids: str, desired: str = "stopped") -> None:
    for instance_id in ids:
        Instance.objects.create(service=service, instance_id=instance_id, desired_state=desired)


@asynccontextmanager
async def supervising(tmp: Path, **settings: Any) -> AsyncIterator[Supervisor]:
    await sync_to_async(SupervisorSettings.objects.update_or_create)(
        pk=1, defaults={**FAST, **settings}
    )
    sup = Supervisor(run_dir=tmp / "run")
    await sup.startup()
    serving = asyncio.create_task(sup.serve(), name="test-serve")
    try:
        yield sup
    finally:
        sup.stop_event.set()
        await serving
        await sup.shutdown()


async def wait_state(rt: Runtime, *states: str, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while rt.state not in states:
            await rt.changed.wait()


async def http_get(socket_path: str, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_unix_connection(socket_path)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def events(key: str, kind: str | None = None) -> list[Event]:
    service, instance_id = key.split(":")
    qs = Event.objects.filter(instance__service__name=service, instance__instance_id=instance_id)
    return list(qs.filter(kind=kind) if kind else qs)


async def aevents(key: str, kind: str | None = None) -> list[Event]:
    """Events once the running supervisor's mirror has caught up (it writes behind)."""
    if (sup := running_here()) is not None:
        assert await sup.outbox.flush(10)
    return await sync_to_async(events)(key, kind)


KEY = InstanceKey("app", "alice")


async def operator_stop(sup: Supervisor, key: InstanceKey) -> None:
    """An operator's stop as the CLI or the API makes it: desired state in the database,
    picked up by the supervisor's sync and acted on by its reconcile pass."""
    await sync_to_async(ops.request_stop)(str(key))
    await sup.sync_desired()
    sup.tick()
    rt = sup.runtimes[key]
    if rt.stop_task is not None:
        await rt.stop_task


async def mirrored_row(instance_id: str) -> Instance:
    if (sup := running_here()) is not None:
        assert await sup.outbox.flush(10)
    return await sync_to_async(Instance.objects.get)(instance_id=instance_id)


async def test_readiness_gate_waits_for_first_healthy_answer(short_tmp: Path) -> None:
    service = await sync_to_async(make_service)(short_tmp, env={"TESTAPP_START_DELAY": "0.6"})
    await sync_to_async(register)(service, "alice")
    async with supervising(short_tmp) as sup:
        rt = sup.runtimes[KEY]
        started = time.monotonic()
        waking = asyncio.create_task(sup.wake(KEY))
        await wait_state(rt, "starting")
        await asyncio.sleep(0.3)
        assert rt.state == "starting" and not rt.ready.is_set()
        await waking
        assert rt.state == "running"
        assert time.monotonic() - started >= 0.6
        status, _ = await http_get(rt.spec.socket_path("alice"), "/health")
        assert status == 200


async def test_no_health_path_gates_on_socket_accepting(short_tmp: Path) -> None:
    service = await sync_to_async(make_service)(
        short_tmp, health="", env={"TESTAPP_HEALTH": "fail"}
    )
    await sync_to_async(register)(service, "alice")
    async with supervising(short_tmp) as sup:
        rt = await sup.wake(KEY)
        assert rt.state == "running"  # /health says 500, but no health path is configured


async def test_never_healthy_app_fails_its_start_within_startup_timeout(short_tmp: Path) -> None:
    service = await sync_to_async(make_service)(
        short_tmp,
        env={"TESTAPP_HEALTH": "fail"},
        startup_timeout=0.5,
        wake_timeout=1.5,
    )
    await sync_to_async(register)(service, "alice")
    async with supervising(
        short_tmp, max_restarts=1, backoff_base_ms=2000, backoff_max_ms=5000
    ) as sup:
        started = time.monotonic()
        with pytest.raises(InstanceUnavailable, match=r"not ready within 1\.5s"):
            await sup.wake(KEY)
        assert time.monotonic() - started < 2.5
        backoff = await aevents("app:alice", "backoff")
        assert "not healthy within startup_timeout (0.5s)" in backoff[0].message


async def test_health_failures_restart_the_instance(short_tmp: Path) -> None:
    service = await sync_to_async(make_service)(short_tmp, env={"TESTAPP_HEALTH": "file"})
    await sync_to_async(register)(service, "alice")
    async with supervising(short_tmp) as sup:
        rt = await sup.wake(KEY)
        first_pid = rt.proc.pid
        marker = rt.spec.instance_dir("alice") / "unhealthy"
        marker.touch()
        await wait_state(rt, "backoff")
        marker.unlink()  # let the restarted app pass its readiness gate
        await wait_state(rt, "running")
        assert rt.proc.pid != first_pid
        assert not psutil.pid_exists(first_pid) or psutil.Process(first_pid).status() == "zombie"
        failures = await aevents("app:alice", "health_failed")
        assert len(failures) == 3
        assert (
            "3 consecutive health checks failed"
            in (await aevents("app:alice", "backoff"))[0].message
        )
        row = await mirrored_row("alice")
        assert row.restart_count == 1


async def test_crash_loop_backs_off_exponentially_then_fails(short_tmp: Path) -> None:
    service = await sync_to_async(make_service)(short_tmp, env={"TESTAPP_EXIT_AFTER": "0"})
    await sync_to_async(register)(service, "alice", desired="running")
    async with supervising(short_tmp, max_restarts=3, backoff_base_ms=100) as sup:
        rt = sup.runtimes[KEY]
        await wait_state(rt, "failed")
        with pytest.raises(InstanceUnavailable, match="failed"):
            await sup.wake(KEY)  # answers at once, does not wait for wake_timeout
    starts = sorted(e.time.timestamp() for e in await aevents("app:alice", "starting"))
    assert len(starts) == 4  # the first start and 3 restarts
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    for gap, delay in zip(gaps, (0.1, 0.2, 0.4), strict=True):
        assert gap >= delay * (1 - JITTER)
    failed = await aevents("app:alice", "failed")
    assert "crashed: exited with code 3" in failed[0].message
    assert "giving up until a manual start" in failed[0].message


async def test_failed_is_cleared_only_by_a_manual_start(short_tmp: Path) -> None:
    service = await sync_to_async(make_service)(short_tmp, env={"TESTAPP_EXIT_AFTER": "0"})
    await sync_to_async(register)(service, "alice", desired="running")
    async with supervising(short_tmp, max_restarts=0) as sup:
        rt = sup.runtimes[KEY]
        await wait_state(rt, "failed")
        sup.tick()
        assert rt.state == "failed"  # reconcile leaves it alone
        await sync_to_async(Service.objects.filter(name="app").update)(env={})
        await sync_to_async(ops.request_start)("app:alice")
        await sup.sync_desired()
        sup.tick()
        await wait_state(rt, "running")
        assert [e.message for e in await aevents("app:alice", "reset")] == [
            "failed state cleared by manual start"
        ]


async def test_idle_instance_is_stopped_and_its_socket_removed(short_tmp: Path) -> None:
    service = await sync_to_async(make_service)(short_tmp, idle_timeout=0.5)
    await sync_to_async(register)(service, "alice")
    async with supervising(short_tmp) as sup:
        rt = await sup.wake(KEY)
        socket_path = Path(rt.spec.socket_path("alice"))
        assert socket_path.exists()
        await wait_state(rt, "stopped", timeout=5)
        assert not socket_path.exists()
        row = await mirrored_row("alice")
        assert row.desired_state == "stopped" and row.pid is None
        assert "stopped (idle)" in (await aevents("app:alice", "stopped"))[0].message


async def test_open_connection_keeps_instance_awake(short_tmp: Path) -> None:
    service = await sync_to_async(make_service)(short_tmp, idle_timeout=0.4)
    await sync_to_async(register)(service, "alice")
    async with supervising(short_tmp) as sup:
        rt = await sup.wake(KEY)
        sup.bridge.record_activity("proxy-1", [str(KEY)], {str(KEY): 1})
        await asyncio.sleep(1.2)  # three idle timeouts
        assert rt.state == "running"
        closed_at = time.monotonic()
        sup.bridge.record_activity("proxy-1", [str(KEY)], {})
        sup.poke()
        await wait_state(rt, "stopping", "stopped", timeout=5)
        assert time.monotonic() - closed_at >= 0.4


async def test_health_checks_are_not_activity(short_tmp: Path) -> None:
    service = await sync_to_async(make_service)(short_tmp, idle_timeout=0.6)
    await sync_to_async(register)(service, "alice")
    async with supervising(short_tmp, health_check_interval=0.05) as sup:
        rt = await sup.wake(KEY)
        await wait_state(rt, "stopped", timeout=5)


async def test_app_ignoring_sigterm_is_killed_after_stop_timeout(short_tmp: Path) -> None:
    service = await sync_to_async(make_service)(
        short_tmp, env={"TESTAPP_IGNORE_TERM": "1"}, stop_timeout=0.7
    )
    await sync_to_async(register)(service, "alice")
    async with supervising(short_tmp) as sup:
        rt = await sup.wake(KEY)
        pid = rt.proc.pid
        started = time.monotonic()
        await operator_stop(sup, KEY)
        took = time.monotonic() - started
        assert rt.state == "stopped"
        assert 0.7 <= took < 3
        assert not psutil.pid_exists(pid)
        row = await mirrored_row("alice")
        assert row.last_exit_code == -signal.SIGKILL
        assert "killed by SIGKILL" in (await aevents("app:alice", "stopped"))[0].message


async def test_logs_are_captured_in_batches_with_retention(short_tmp: Path) -> None:
    service = await sync_to_async(make_service)(
        short_tmp, env={"TESTAPP_LINES": "500"}, log_retention_lines=100
    )
    await sync_to_async(register)(service, "alice")
    async with supervising(short_tmp) as sup:
        rt = await sup.wake(KEY)
        await http_get(rt.spec.socket_path("alice"), "/stderr")
        await asyncio.sleep(0.1)
        await sup.logs.flush()
        lines = await sync_to_async(list)(
            LogLine.objects.filter(instance__instance_id="alice").values_list("stream", "text")
        )
    texts = [t for _, t in lines]
    assert len(lines) <= 110  # the cap plus the 10% trimming step
    assert "line 499" in texts and "line 0" not in texts
    assert ("stderr", "to stderr") in lines
    assert ("stdout", f"listening on {rt.spec.socket_path('alice')}") in lines


async def test_environment_has_no_supervisor_secrets(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DJANGO_SECRET_KEY", "do-not-leak")
    monkeypatch.setenv("DATABASE_URL", "postgres://user:hunter2@db/x")
    monkeypatch.setenv("TENEMENT_TOKEN", "secret-token")
    service = await sync_to_async(make_service)(short_tmp, env={"GREETING": "hi {id}"})
    await sync_to_async(register)(service, "alice")
    async with supervising(short_tmp) as sup:
        rt = await sup.wake(KEY)
        _, body = await http_get(rt.spec.socket_path("alice"), "/env")
    env = json.loads(body)
    assert not {"DJANGO_SECRET_KEY", "DATABASE_URL", "TENEMENT_TOKEN"} & env.keys()
    assert "hunter2" not in body.decode() and "do-not-leak" not in body.decode()
    assert env["GREETING"] == "hi alice"
    assert env["INSTANCE_ID"] == "alice" and env["SERVICE_NAME"] == "app"
    assert env["SOCKET_PATH"] == rt.spec.socket_path("alice")
    assert env["PORT"].isdigit()
    assert set(env) <= {
        "PORT",
        "PATH",
        "LANG",
        "LC_ALL",
        "TZ",
        "HOME",
        "DATA_DIR",
        "SOCKET_PATH",
        "INSTANCE_ID",
        "SERVICE_NAME",
        "GREETING",
        "LC_CTYPE",
    }


async def test_data_dir_persists_across_restarts_and_differs_per_tenant(short_tmp: Path) -> None:
    service = await sync_to_async(make_service)(short_tmp)
    await sync_to_async(register)(service, "alice", "bob")
    async with supervising(short_tmp) as sup:
        alice = await sup.wake(KEY)
        sock = alice.spec.socket_path("alice")
        assert [(await http_get(sock, "/count"))[1] for _ in range(2)] == [b"1", b"2"]
        await operator_stop(sup, KEY)
        await sup.wake(KEY)
        assert (await http_get(sock, "/count"))[1] == b"3"
        bob = await sup.wake(InstanceKey("app", "bob"))
        assert (await http_get(bob.spec.socket_path("bob"), "/count"))[1] == b"1"
        _, env_a = await http_get(sock, "/env")
        _, env_b = await http_get(bob.spec.socket_path("bob"), "/env")
    dir_a, dir_b = json.loads(env_a)["DATA_DIR"], json.loads(env_b)["DATA_DIR"]
    assert dir_a != dir_b
    assert dir_a == str(short_tmp / "data" / "app" / "alice")
    assert stat.S_IMODE(os.stat(dir_a).st_mode) == 0o700


async def test_missing_command_is_a_clear_failed_start(short_tmp: Path) -> None:
    service = await sync_to_async(make_service)(short_tmp)
    await sync_to_async(Service.objects.filter(pk=service.pk).update)(command="/nonexistent/app")
    await sync_to_async(register)(service, "alice", desired="running")
    async with supervising(short_tmp, max_restarts=1) as sup:
        await wait_state(sup.runtimes[KEY], "failed")
    failed = await aevents("app:alice", "failed")
    assert "command not found or not executable: /nonexistent/app" in failed[0].message


async def test_concurrent_wakes_spawn_once(short_tmp: Path) -> None:
    service = await sync_to_async(make_service)(short_tmp)
    await sync_to_async(register)(service, "alice")
    async with supervising(short_tmp) as sup:
        results = await asyncio.gather(*(sup.wake(KEY) for _ in range(200)))
        assert {id(r) for r in results} == {id(sup.runtimes[KEY])}
    assert len(await aevents("app:alice", "starting")) == 1


async def test_no_fd_thread_or_child_growth_over_many_cycles(short_tmp: Path) -> None:
    service = await sync_to_async(make_service)(short_tmp)
    await sync_to_async(register)(service, "alice")
    me = psutil.Process()
    async with supervising(short_tmp) as sup:
        await sup.wake(KEY)
        await operator_stop(sup, KEY)
        baseline = (me.num_fds(), me.num_threads(), len(me.children()))
        for _ in range(15):
            await sup.wake(KEY)
            await operator_stop(sup, KEY)
        await asyncio.sleep(0.1)
        after = (me.num_fds(), me.num_threads(), len(me.children()))
    assert after[0] <= baseline[0] + 2, (baseline, after)
    assert after[1] <= baseline[1], (baseline, after)
    assert after[2] == 0, (baseline, after)


async def test_deregistered_instance_is_stopped_cleanly(short_tmp: Path) -> None:
    service = await sync_to_async(make_service)(short_tmp, env={"TESTAPP_LINES": "50"})
    await sync_to_async(register)(service, "alice")
    async with supervising(short_tmp) as sup:
        rt = await sup.wake(KEY)
        pid = rt.proc.pid
        await sync_to_async(Instance.objects.filter(instance_id="alice").delete)()
        await sup.sync_desired()
        sup.tick()
        assert KEY not in sup.runtimes
        await asyncio.wait_for(rt.task, 10)
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
        assert rt.state == "stopped"
        sup.logs.add(rt.pk, "stdout", "a line after deregistration")
        await sup.logs.flush()  # must not raise an integrity error for the deleted row
        assert await sync_to_async(LogLine.objects.count)() == 0


async def test_instances_that_cannot_idle_do_not_make_the_loop_spin(short_tmp: Path) -> None:
    service = await sync_to_async(make_service)(short_tmp, idle_timeout=0.2)
    await sync_to_async(register)(service, "alice", "bob")
    await sync_to_async(Instance.objects.filter(instance_id="alice").update)(always_on=True)
    async with supervising(short_tmp) as sup:
        await sup.wake(KEY)
        await sup.wake(InstanceKey("app", "bob"))
        # e.g. an open WebSocket
        sup.bridge.record_activity("proxy-1", ["app:bob"], {"app:bob": 1})
        await asyncio.sleep(0.5)  # both are past their idle deadline now
        assert sup.seconds_until_next_deadline() > 0.1
        assert sup.runtimes[KEY].state == "running"


async def test_deleted_and_reregistered_key_never_runs_twice(short_tmp: Path) -> None:
    service = await sync_to_async(make_service)(short_tmp)
    await sync_to_async(register)(service, "alice")
    async with supervising(short_tmp) as sup:
        old = await sup.wake(KEY)
        old_pid = old.proc.pid

        def recreate() -> None:
            Instance.objects.filter(instance_id="alice").delete()
            register(service, "alice", desired="running")

        await sync_to_async(recreate)()
        await sup.sync_desired()
        sup.tick()
        new = sup.runtimes[KEY]
        assert new is not old and set(sup.by_pk) == {new.pk}
        await wait_state(new, "running")
        await asyncio.wait_for(old.task, 10)
        assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == "zombie"


async def test_wake_fails_fast_when_the_instance_is_deregistered(short_tmp: Path) -> None:
    service = await sync_to_async(make_service)(short_tmp, env={"TESTAPP_START_DELAY": "5"})
    await sync_to_async(register)(service, "alice")
    async with supervising(short_tmp) as sup:
        waking = asyncio.create_task(sup.wake(KEY))
        await wait_state(sup.runtimes[KEY], "starting")
        await sync_to_async(Instance.objects.filter(instance_id="alice").delete)()
        started = time.monotonic()
        await sup.sync_desired()
        sup.tick()
        with pytest.raises(InstanceUnavailable, match="deregistered"):
            await waking
        assert time.monotonic() - started < 3


async def test_a_bad_health_path_fails_checks_without_killing_the_supervisor(
    short_tmp: Path,
) -> None:
    service = await sync_to_async(make_service)(short_tmp)
    await sync_to_async(register)(service, "alice")
    async with supervising(short_tmp) as sup:
        rt = await sup.wake(KEY)
        rt.proc_spec = dataclasses.replace(rt.proc_spec, health="/é")  # as if saved in admin
        rt.next_health = 0
        await sup.check_health()
        assert rt.health_failures == 1
        failure = (await aevents("app:alice", "health_failed"))[0].message
        assert "cannot run the health check" in failure
        assert not sup.stop_event.is_set()


async def test_a_line_longer_than_the_pipe_buffer_is_truncated_and_says_so(short_tmp: Path) -> None:
    service = await sync_to_async(make_service)(short_tmp, env={"TESTAPP_LONG_LINE": "150000"})
    await sync_to_async(register)(service, "alice")
    async with supervising(short_tmp) as sup:
        await sup.wake(KEY)
        await asyncio.sleep(0.1)
        await sup.logs.flush()
        texts = await sync_to_async(list)(
            LogLine.objects.filter(instance__instance_id="alice").values_list("text", flat=True)
        )
    long_rows = [t for t in texts if t.startswith("L")]
    assert long_rows == ["L" * 16384 + f" [... {150000 - 16384} more bytes truncated]"]
    assert texts[texts.index(long_rows[0]) + 1] == "after the long line"
    assert not any("\n" in t for t in texts)
