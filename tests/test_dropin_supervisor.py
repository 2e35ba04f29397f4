"""Upstream's contract inside the supervisor: restart policies, $PORT and `listen`, the
config's folder as working directory. Real child processes, driven in-process."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async

from instances.ids import InvalidName, check_label
from instances.models import Instance
from instances.spec import ServiceSpec
from instances.supervisor import process
from instances.supervisor.isolation import Identity
from instances.supervisor.ports import PortPool, PortsExhausted
from tests.test_supervisor import (
    KEY,
    aevents,
    http_get,
    make_service,
    register,
    supervising,
    wait_state,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]


@pytest.mark.parametrize(
    ("policy", "code", "expected"),
    [
        ("on-failure", "0", "stopped"),  # a clean exit is a stop: the next request wakes it
        ("on-failure", "3", "running"),  # a crash is restarted
        ("always", "0", "running"),
        ("never", "3", "failed"),
    ],
)
async def test_restart_policy(short_tmp: Path, policy: str, code: str, expected: str) -> None:
    env = {"TESTAPP_EXIT_AFTER": "0.3", "TESTAPP_EXIT_CODE": code}
    service = await sync_to_async(make_service)(short_tmp, env=env, restart=policy)
    await sync_to_async(register)(service, "alice", desired="running")
    async with supervising(short_tmp) as sup:
        await sup.sync_desired()
        sup.tick()
        rt = sup.runtimes[KEY]
        await wait_state(rt, "running")
        first_pid = rt.proc.pid if rt.proc else None
        # It exits 0.3 s after its start; then the policy decides.
        await wait_state(rt, "stopped", "backoff", "failed", timeout=10)
        if expected == "running":
            await wait_state(rt, "running", timeout=10)
            assert rt.proc is not None and rt.proc.pid != first_pid
        else:
            await asyncio.sleep(0.5)  # a restart would have begun by now (backoff 50 ms)
            assert rt.state == expected
        if expected == "stopped":
            assert rt.desired == "stopped"
            stops = await aevents(str(KEY), "stopped")
            assert "not restarted (restart = on-failure)" in stops[-1].message
        if expected == "failed":
            failed = await aevents(str(KEY), "failed")
            assert "not restarted (restart = never)" in failed[-1].message


@pytest.mark.parametrize("listen", ["auto", "unix"])
async def test_an_app_on_both_is_reached_over_its_socket(short_tmp: Path, listen: str) -> None:
    """An app that opened both its socket and its port: auto and unix use the socket."""
    env = {"TESTAPP_ALSO_PORT": "1"}
    service = await sync_to_async(make_service)(short_tmp, env=env, listen=listen)
    await sync_to_async(register)(service, "alice")
    async with supervising(short_tmp) as sup:
        rt = await sup.wake(KEY)
        assert rt.upstream == rt.run_spec.socket_path("alice")
        assert rt.port is not None
        # It does answer on its port too: the choice was the socket's, not the only one.
        reader, writer = await asyncio.open_connection("127.0.0.1", rt.port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.")
        writer.close()
        row = await sync_to_async(Instance.objects.get)(instance_id="alice")
        assert row.port == rt.port


async def test_listen_tcp_for_an_app_on_a_socket_never_gets_ready(short_tmp: Path) -> None:
    service = await sync_to_async(make_service)(short_tmp, listen="tcp", startup_timeout=1)
    await sync_to_async(register)(service, "alice", desired="running")
    async with supervising(short_tmp) as sup:
        await sup.sync_desired()
        sup.tick()
        rt = sup.runtimes[KEY]
        await wait_state(rt, "backoff", "failed", timeout=10)
        assert "not healthy within startup_timeout" in (rt.failure or "")


def test_the_config_folder_is_the_default_working_directory(tmp_path: Path) -> None:
    spec = ServiceSpec(name="a", command="x", data_dir=str(tmp_path / "d"), config_dir="/srv/c")
    assert spec.cwd("alice") == Path("/srv/c")
    assert ServiceSpec(**{**spec.__dict__, "workdir": "sub"}).cwd("alice") == Path("/srv/c/sub")
    api_made = ServiceSpec(name="a", command="x", data_dir=str(tmp_path / "d"))
    assert api_made.cwd("alice") == tmp_path / "d" / "a" / "alice"


def test_an_unpassable_working_directory_is_named(tmp_path: Path) -> None:
    private = tmp_path / "private"
    (private / "app").mkdir(parents=True)
    private.chmod(0o700)
    with pytest.raises(process.SpawnError) as info:
        process.check_passable(private / "app", Identity(uid=200_123, gid=200_123))
    message = str(info.value)
    assert f"{private} is mode 0700" in message and "chmod o+x" in message
    process.check_passable(private / "app", Identity(uid=None, gid=None))  # our own uid


def test_ports_are_handed_out_once_and_skip_busy_ones() -> None:
    import socket

    pool = PortPool()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        held = busy.getsockname()[1]
        only = range(held, held + 1)
        with pytest.raises(PortsExhausted, match="widen"):
            pool.allocate(only)  # something else on the host holds it
    assert pool.allocate(only) == held  # free now
    with pytest.raises(PortsExhausted, match="1 in use by instances"):
        pool.allocate(only)  # an instance has it
    pool.release(held)
    assert pool.allocate(only) == held


def test_an_underscore_id_is_refused_with_the_dns_reason() -> None:
    with pytest.raises(InvalidName) as info:
        check_label("wr_a")
    assert "'_' cannot appear in a host name" in str(info.value) and "'wr-a'" in str(info.value)


async def test_port_is_in_the_environment_and_interpolated(short_tmp: Path) -> None:
    service = await sync_to_async(make_service)(
        short_tmp, env={"MY_PORT": "{port}"}, health="/health"
    )
    await sync_to_async(register)(service, "alice")
    async with supervising(short_tmp) as sup:
        rt = await sup.wake(KEY)
        port = rt.port
        _, body = await http_get(rt.spec.socket_path("alice"), "/env")
    env = json.loads(body)
    assert env["PORT"] == env["MY_PORT"] == str(port)
    assert env["PATH"].startswith("/usr/local/sbin")  # the system's, never our venv's


def test_a_working_directory_the_sandbox_hides_is_named(tmp_path: Path) -> None:
    from instances.supervisor.isolation import hidden_workdir

    data = tmp_path / "data"
    spec = ServiceSpec(
        name="a", command="x", data_dir=str(data), config_dir=str(data), isolation="namespace"
    )
    assert hidden_workdir(spec, "alice", spec.cwd("alice")) == str(data)
    assert hidden_workdir(spec, "alice", data / "a" / "alice") is None  # its own folder
    outside = ServiceSpec(**{**spec.__dict__, "config_dir": str(tmp_path / "apps")})
    assert hidden_workdir(outside, "alice", outside.cwd("alice")) is None
    as_process = ServiceSpec(**{**spec.__dict__, "isolation": "process"})
    assert hidden_workdir(as_process, "alice", as_process.cwd("alice")) is None


def test_only_commands_naming_files_in_the_working_directory_need_to_reach_it(
    tmp_path: Path,
) -> None:
    (tmp_path / "app.py").write_text("")
    assert process.names_files_in(["python3", "app.py"], tmp_path)
    assert process.names_files_in(["./app.py"], tmp_path)
    assert not process.names_files_in(["/usr/bin/python3", "/srv/app.py", "--port"], tmp_path)
