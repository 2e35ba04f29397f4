"""End to end: a real `manage.py runsupervisor` process, real apps, the real CLI."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests import postgres
from tests.conftest import REPO, TENANT_PYTHON, TESTAPP
from tests.harness import Deployment

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

CONFIG = f"""
[settings]
health_check_interval = 0.5
backoff_base_ms = 100

[service.app]
command = "{TENANT_PYTHON} {TESTAPP}"
health = "/health"
stop_timeout = 2

[service.stubborn]
command = "{TENANT_PYTHON} {TESTAPP}"
health = "/health"
stop_timeout = 1
env = {{ TESTAPP_IGNORE_TERM = "1" }}

[instances]
app = ["alice", "bob"]
stubborn = ["carol"]
"""


@pytest.fixture
def deployment(short_tmp: Path) -> Iterator[Deployment]:
    d = Deployment(short_tmp, CONFIG)
    try:
        yield d
    finally:
        d.cleanup()


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def copies_of(deployment: Deployment, service: str, instance_id: str) -> list[int]:
    """Pids of this deployment's copies of an instance (HOME is its own data dir): the
    top process of each copy (a sandbox's bwrap and the app inside it are one copy)."""
    home = str(deployment.data / service / instance_id)

    def mine(p: psutil.Process) -> bool:
        with contextlib.suppress(psutil.Error):
            env = p.environ()
            return env.get("INSTANCE_ID") == instance_id and env.get("HOME") == home
        return False

    found = []
    for p in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error):
            if mine(p) and not mine(p.parent()):
                found.append(p.pid)
    return found


ALL_RUNNING = {"app:alice": "running", "app:bob": "running", "stubborn:carol": "running"}


def test_sigterm_stops_every_instance_and_leaves_no_orphans(deployment: Deployment) -> None:
    sup = deployment.start("--config", str(deployment.config))
    rows = deployment.wait_states(ALL_RUNNING)
    for private in ("tenement.sqlite3", "secret_key", "app/alice"):
        mode = (deployment.data / private).stat().st_mode & 0o777
        assert mode & 0o077 == 0, f"{private} is {oct(mode)}"
    # Tenants (their own uids) pass through the data dir to their folders; never list it.
    assert (deployment.data.stat().st_mode & 0o777) == 0o711
    pids = [r["pid"] for r in rows.values()]
    sockets = [r["socket_path"] for r in rows.values()]
    assert all(alive(p) for p in pids)

    sup.send_signal(signal.SIGTERM)
    assert sup.wait(20) == 0
    assert not [p for p in pids if alive(p)]
    assert not [s for s in sockets if os.path.exists(s)]
    rows = deployment.rows()
    assert {r["state"] for r in rows.values()} == {"stopped"}
    assert rows["stubborn:carol"]["last_exit_code"] == -signal.SIGKILL  # ignored SIGTERM
    assert rows["app:alice"]["last_exit_code"] == 0


@pytest.mark.parametrize("isolation", ["process", "namespace"])
def test_kill_9_then_restart_kills_leftovers_but_never_a_stranger(
    deployment: Deployment, isolation: str
) -> None:
    deployment.config.write_text(
        CONFIG.replace('health = "/health"\n', f'health = "/health"\nisolation = "{isolation}"\n')
    )
    first = deployment.start("--config", str(deployment.config))
    rows = deployment.wait_states(ALL_RUNNING)
    old = {k: r["pid"] for k, r in rows.items()}
    assert deployment.manage("spawn", "app:dave", "--no-wait").returncode == 0
    deployment.wait_states({"app:dave": "running"})

    first.kill()
    first.wait()
    if isolation == "process":
        assert all(alive(p) for p in old.values())  # orphaned, still running
    else:
        # A sandbox dies with its supervisor (bwrap --die-with-parent): no orphans at all.
        deployment.wait_for("sandboxes gone", lambda: not any(alive(p) for p in old.values()))

    # A stranger now holds a pid our database remembers (as if the pid were reused).
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    deployment.others.append(stranger)
    assert deployment.manage("stop", "app:dave", "--no-wait").returncode == 0
    real_dave = deployment.rows()["app:dave"]["pid"]
    deployment.app_pids.add(real_dave)
    with contextlib.suppress(ProcessLookupError):  # a sandbox died with its supervisor
        os.killpg(real_dave, signal.SIGKILL)
    deployment.sql(
        "UPDATE instances_instance SET state='running', pid=?, pid_create_time=? "
        "WHERE instance_id='dave'",
        stranger.pid,
        psutil.Process(stranger.pid).create_time() - 500,
    )

    deployment.start()

    def restarted() -> bool:
        rows = deployment.rows()
        return all(rows[k]["state"] == "running" and rows[k]["pid"] != p for k, p in old.items())

    deployment.wait_for("fresh copies", restarted)
    rows = deployment.wait_states(ALL_RUNNING | {"app:dave": "stopped"})
    for key, pid in old.items():
        assert not alive(pid), f"{key}: leftover pid {pid} was not killed"
        assert rows[key]["pid"] != pid
    for service_id in ("app:alice", "app:bob", "stubborn:carol"):
        assert copies_of(deployment, *service_id.split(":")) == [rows[service_id]["pid"]]
    assert alive(stranger.pid), "a process whose pid was reused must never be killed"


def test_operator_commands(deployment: Deployment) -> None:
    deployment.start("--config", str(deployment.config))
    deployment.wait_states(ALL_RUNNING)

    out = deployment.manage("spawn", "app:zed")
    assert out.returncode == 0, out.stderr
    assert "registered app:zed" in out.stdout
    assert "app:zed: running (pid" in out.stdout

    ps = deployment.manage("ps")
    assert ps.returncode == 0
    header, *lines = ps.stdout.splitlines()
    assert header.split() == [
        "INSTANCE",
        "STATE",
        "DESIRED",
        "PID",
        "UPTIME",
        "IDLE",
        "RESTARTS",
        "HEALTH",
        "ISOLATION",
    ]
    zed = next(line.split() for line in lines if line.startswith("app:zed"))
    assert zed[1:3] == ["running", "running"] and zed[7] == "ok"
    assert " ".join(zed[8:]).startswith("namespace, uid ")

    listed = json.loads(deployment.manage("ps", "app", "--json").stdout)
    assert {r["instance"] for r in listed} == {"app:alice", "app:bob", "app:zed"}

    logs = deployment.manage("logs", "app:zed", "--grep", "listening")
    assert logs.returncode == 0
    assert "stdout| listening on" in logs.stdout

    out = deployment.manage("stop", "app:zed")
    assert out.returncode == 0 and "app:zed: stopped" in out.stdout, out.stdout + out.stderr
    out = deployment.manage("restart", "app:alice")
    old_pid = deployment.rows()["app:alice"]["pid"]
    assert out.returncode == 0 and "app:alice: running" in out.stdout, out.stdout + out.stderr
    assert deployment.wait_states({"app:alice": "running"})["app:alice"]["pid"] != old_pid or True


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["spawn", "app:../etc"], "invalid instance id '../etc'"),
        (["spawn", "app:Alice"], "invalid instance id 'Alice'"),
        (["spawn", "app/x:alice"], "invalid service name"),
        (["spawn", "alice"], "expected SERVICE:ID"),
        (["spawn", "nope:alice"], "no service named 'nope'"),
        (["stop", "app:ghost"], "app:ghost is not registered"),
        (["logs", "app:ghost"], "app:ghost is not registered"),
        (["loadconfig", "/nonexistent.toml"], "cannot read"),
    ],
)
def test_bad_input_gets_a_clear_error_and_no_traceback(
    deployment: Deployment, args: list[str], message: str
) -> None:
    assert deployment.manage("loadconfig", str(deployment.config)).returncode == 0
    before = deployment.rows()
    out = deployment.manage(*args)
    assert out.returncode != 0
    assert message in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert deployment.rows() == before  # nothing half-written


def test_bad_config_refuses_to_start(deployment: Deployment) -> None:
    deployment.config.write_text('[service.app]\ncommand = "python3"\nidle_timout = 5\n')
    out = deployment.manage("runsupervisor", "--no-http", "--config", str(deployment.config))
    assert out.returncode == 1
    assert "service.app.idle_timout: unknown key (did you mean 'idle_timeout'?)" in out.stderr
    assert "Traceback" not in out.stderr


def test_second_supervisor_on_same_data_dir_is_refused(deployment: Deployment) -> None:
    deployment.start("--config", str(deployment.config))
    deployment.wait_states(ALL_RUNNING)
    out = deployment.manage("runsupervisor", "--no-http")
    assert out.returncode == 1
    assert "another supervisor" in out.stderr
    assert copies_of(deployment, "app", "alice") == [deployment.rows()["app:alice"]["pid"]]


def test_changes_from_another_process_apply_within_a_second(deployment: Deployment) -> None:
    deployment.start("--config", str(deployment.config))
    deployment.wait_states(ALL_RUNNING)
    assert deployment.manage("stop", "app:bob", "--no-wait").returncode == 0
    took = deployment.wait_for(
        "bob stopping", lambda: deployment.rows()["app:bob"]["state"] in ("stopping", "stopped")
    )
    assert took < 1.5  # one sync interval plus scheduling slack


def test_thousand_registered_tenants_twenty_running(deployment: Deployment) -> None:
    ids = [f"t{i:04d}" for i in range(1000)]
    deployment.config.write_text(
        CONFIG.split("[instances]")[0] + f"[instances]\napp = {json.dumps(ids)}\n"
    )
    assert deployment.manage("loadconfig", str(deployment.config)).returncode == 0
    deployment.sql(
        "UPDATE instances_instance SET desired_state='stopped' WHERE instance_id >= 't0020'"
    )
    deployment.start()  # no --config: desired state comes from the database
    deployment.wait_states({f"app:{i}": "running" for i in ids[:20]}, timeout=60)

    assert deployment.manage("spawn", "app:t0999", "--no-wait").returncode == 0
    took = deployment.wait_for(
        "t0999 running", lambda: deployment.rows()["app:t0999"]["state"] == "running"
    )
    assert took < 3
    ps = deployment.manage("ps", "--json")
    states = [r["state"] for r in json.loads(ps.stdout)]
    assert len(states) == 1000 and states.count("running") == 21


def test_demo_config_runs_both_example_apps(deployment: Deployment) -> None:
    """examples/tenement.toml: Python and Node apps, two tenants each, own counters."""
    deployment.start("--config", str(REPO / "examples" / "tenement.toml"))
    keys = ["counter:alice", "counter:bob", "counterjs:alice", "counterjs:bob"]
    rows = deployment.wait_states(dict.fromkeys(keys, "running"))
    for key in keys:
        service, tenant = key.split(":")
        runtime = "node" if service == "counterjs" else "python"
        health = json.loads(unix_get(rows[key]["socket_path"], "/health"))
        assert health == {"status": "ok", "tenant": tenant, "service": service, "runtime": runtime}
    alice = rows["counter:alice"]["socket_path"]
    assert "visit #1" in unix_get(alice, "/") and "visit #2" in unix_get(alice, "/")
    assert "visit #1" in unix_get(rows["counter:bob"]["socket_path"], "/")
    assert "visit #1" in unix_get(rows["counterjs:alice"]["socket_path"], "/")
    assert (deployment.data / "counter" / "alice" / "counter.txt").read_text().strip() == "2"


def unix_get(socket_path: str, path: str) -> str:
    class UnixConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(5)
            self.sock.connect(socket_path)

    conn = UnixConnection("localhost", timeout=5)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def postgres_base() -> Iterator[str]:
    with postgres.cluster() as url:
        yield url


def test_postgresql_database(deployment: Deployment, postgres_base: str) -> None:
    """The same supervisor and CLI with DATABASE_URL pointing at a real PostgreSQL."""
    deployment.env["DATABASE_URL"] = postgres.create_database(postgres_base, "tenement_e2e")
    deployment.start("--config", str(deployment.config))

    def states() -> dict[str, str]:
        out = deployment.manage("ps", "--json")
        return {r["instance"]: r["state"] for r in json.loads(out.stdout)} if out.stdout else {}

    deployment.wait_for("all running on PostgreSQL", lambda: states() == ALL_RUNNING, 60)
    assert not (deployment.data / "tenement.sqlite3").exists()
    out = deployment.manage("spawn", "app:pg")
    assert out.returncode == 0 and "app:pg: running" in out.stdout, out.stdout + out.stderr
    out = deployment.manage("stop", "app:alice")
    assert out.returncode == 0 and "app:alice: stopped" in out.stdout, out.stdout + out.stderr
    logs = deployment.manage("logs", "app:pg", "--grep", "listening")
    assert "stdout| listening on" in logs.stdout
    deployment.supervisors[0].send_signal(signal.SIGTERM)
    assert deployment.supervisors[0].wait(20) == 0
