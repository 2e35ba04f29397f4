"""Tenant isolation end to end: a hostile probe tenant tries every escape.

One real runsupervisor (as root, as in CI) runs the probe app under each isolation level
and with cgroup limits; requests go through the real proxy.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from instances.supervisor import cgroups
from tests.conftest import TENANT_PYTHON
from tests.harness import Deployment, free_port, http_request, listening

PROBE = Path(__file__).parent / "apps" / "probe.py"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(180),
    pytest.mark.skipif(os.geteuid() != 0, reason="per-tenant uids need root (CI runs as root)"),
]

CONFIG = f"""
[settings]
health_check_interval = 1
backoff_base_ms = 200

[service.ns]
command = "{TENANT_PYTHON} {PROBE}"
health = "/health"

[service.proc]
command = "{TENANT_PYTHON} {PROBE}"
health = "/health"
isolation = "process"

[service.cut]
command = "{TENANT_PYTHON} {PROBE}"
health = "/health"
network = "none"

[service.hog]
command = "{TENANT_PYTHON} {PROBE}"
health = "/health"
memory_limit_mb = 64

[service.bomb]
command = "{TENANT_PYTHON} {PROBE}"
health = "/health"
pids_max = 40

[service.light]
command = "{TENANT_PYTHON} {PROBE}"
health = "/health"
cpu_shares = 100
env = {{ PROBE_ONE_CPU = "1" }}

[service.heavy]
command = "{TENANT_PYTHON} {PROBE}"
health = "/health"
cpu_shares = 300
env = {{ PROBE_ONE_CPU = "1" }}

[instances]
ns = ["alice", "bob"]
proc = ["carol", "dave"]
cut = ["eve"]
hog = ["mallory"]
bomb = ["trudy"]
light = ["l"]
heavy = ["h"]
"""
ALL = {
    k: "running"
    for k in [
        "ns:alice",
        "ns:bob",
        "proc:carol",
        "proc:dave",
        "cut:eve",
        "hog:mallory",
        "bomb:trudy",
        "light:l",
        "heavy:h",
    ]
}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Deployment, int]]:
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="ti", dir="/tmp"))
    root.chmod(0o711)
    d = Deployment(root, CONFIG)
    d.config.chmod(0o600)  # isolation = process refuses a config tenants could read
    port = free_port()
    try:
        d.start("--config", str(d.config), "--bind", f"127.0.0.1:{port}", http=True)
        d.wait_for("http", lambda: listening(port))
        d.wait_states(ALL, timeout=60)
        yield d, port
    finally:
        d.cleanup()
        import shutil

        shutil.rmtree(root, ignore_errors=True)


def get(port: int, tenant: str, path: str, timeout: float = 30) -> tuple[int, Any]:
    response, body = http_request(port, f"{tenant}.localhost", path, timeout=timeout)
    try:
        return response.status, json.loads(body)
    except ValueError:
        return response.status, body


def probe(d: Deployment, port: int, tenant: str, other: str, **extra: str) -> dict[str, Any]:
    """Ask tenant (e.g. alice.ns) to attack `other` (e.g. bob.ns) and the control plane."""
    o_id, o_svc = other.split(".")
    rows = d.rows()
    query = {
        "secret": str(d.data / "secret_key"),
        "db": str(d.data / "tenement.sqlite3"),
        "config": str(d.config),
        "other_dir": str(d.data / o_svc / o_id),
        "other_sock": rows[f"{o_svc}:{o_id}"]["socket_path"],
        "data_root": str(d.data),
        "control": f"127.0.0.1:{port}",
        **extra,
    }
    path = "/probe?" + "&".join(f"{k}={v}" for k, v in query.items())
    status, report = get(port, tenant, path)
    assert status == 200, report
    return report


def escaped(report: dict[str, Any], key: str) -> bool:
    return str(report[key]).startswith("ok")


@pytest.mark.parametrize("tenant,other", [("alice.ns", "bob.ns"), ("carol.proc", "dave.proc")])
def test_probe_reaches_nothing_of_the_control_plane_or_a_neighbour(
    deployment: tuple[Deployment, int], tenant: str, other: str
) -> None:
    d, port = deployment
    report = probe(d, port, tenant, other)
    assert report["uid"] >= 100_000, "the tenant runs as its own unprivileged uid"
    for key in (
        "supervisor_environ",
        "secret",
        "db",
        "config",
        "other_dir_list",
        "other_dir_write",
        "other_sock",
        "metrics",
        "status",
    ):
        assert not escaped(report, key), f"{tenant} could {key}: {report[key]}"
    # Each tenant has a uid of its own, different from its neighbour's.
    other_report = probe(d, port, other, tenant)
    assert other_report["uid"] != report["uid"]


def test_namespace_sees_only_itself(deployment: tuple[Deployment, int], tmp_path: Path) -> None:
    d, port = deployment
    marker = Path("/tmp") / f"host-marker-{os.getpid()}"
    marker.write_text("x")
    try:
        report = probe(d, port, "alice.ns", "bob.ns")
        proc_report = probe(d, port, "carol.proc", "dave.proc")
    finally:
        marker.unlink()
    # PID namespace: the sandbox's init and the app, not the host's processes.
    assert len(report["pids"]) <= 3, report["pids"]
    assert len(proc_report["pids"]) > 10  # the host's, as a process-isolated tenant sees
    assert marker.name not in report["tmp"]
    assert marker.name in proc_report["tmp"]
    # The data root is a tmpfs holding only the way to alice's own folders.
    listing = report["data_root_list"]
    assert escaped(report, "data_root_list")
    for private in ("secret_key", "tenement.sqlite3", "hog", "proc"):
        assert private not in listing


def test_network_none_cuts_outbound_but_serves(deployment: tuple[Deployment, int]) -> None:
    d, port = deployment
    listener = socket.create_server(("127.0.0.1", 0))
    target = f"127.0.0.1:{listener.getsockname()[1]}"
    try:
        cut = probe(d, port, "eve.cut", "bob.ns", outbound=target)
        host = probe(d, port, "alice.ns", "bob.ns", outbound=target)
    finally:
        listener.close()
    assert not escaped(cut, "outbound"), cut["outbound"]
    assert escaped(host, "outbound"), host["outbound"]  # network = host can


def test_effective_isolation_is_recorded_and_shown(deployment: tuple[Deployment, int]) -> None:
    d, port = deployment
    rows = d.rows()
    assert rows["ns:alice"]["isolation"].startswith("namespace, uid ")
    assert "network none" in rows["cut:eve"]["isolation"]
    assert "memory 64 MiB" in rows["hog:mallory"]["isolation"]
    assert rows["ns:alice"]["uid"] != rows["ns:bob"]["uid"]
    ps = d.manage("ps")
    assert ps.returncode == 0, ps.stderr
    assert "namespace" in ps.stdout and "process" in ps.stdout
    log = (d.root / "supervisor-0.log").read_text()
    assert "Isolation (host:" in log and "hog: namespace, own uid per tenant" in log
    response, body = http_request(
        port,
        "localhost",
        "/api/instances/cut:eve/",
        headers={"Authorization": f"Bearer {token(d)}"},
    )
    assert response.status == 200, body
    shown = json.loads(body)
    assert shown["isolation"] == rows["cut:eve"]["isolation"] and shown["uid"] >= 200_000


def test_memory_hog_is_oom_killed_recorded_and_restarted(
    deployment: tuple[Deployment, int],
) -> None:
    d, port = deployment
    before = d.rows()["hog:mallory"]["restart_count"]
    response, _ = http_request(port, "mallory.hog.localhost", "/hog?mb=400", method="POST")
    status = response.status
    assert status in (502, 503), "the hog was not stopped at its limit"
    d.wait_for("the restart", lambda: d.rows()["hog:mallory"]["restart_count"] > before)
    rows = d.wait_states({"hog:mallory": "running"}, timeout=30)
    assert rows["hog:mallory"]["restart_count"] == before + 1
    backoffs = d.query(
        "SELECT e.message FROM instances_event e JOIN instances_instance i "
        "ON i.id = e.instance_id WHERE i.instance_id = 'mallory' AND e.kind = 'backoff'"
    )
    assert [m for (m,) in backoffs if m.startswith("oom: killed by the kernel")], backoffs
    response, body = http_request(
        port, "localhost", "/metrics", headers={"Authorization": f"Bearer {token(d)}"}
    )
    assert response.status == 200
    restarts = {
        (sample.labels["service"], sample.labels["reason"]): sample.value
        for family in text_string_to_metric_families(body.decode())
        if family.name == "tenement_restarts"
        for sample in family.samples
        if sample.name == "tenement_restarts_total"
    }
    assert restarts[("hog", "oom")] == 1
    assert ("hog", "crash") not in restarts


def test_fork_bomb_stops_at_pids_max_and_supervisor_stays_healthy(
    deployment: tuple[Deployment, int],
) -> None:
    _, port = deployment
    with health_watch(port) as healthy:
        status, result = get(port, "trudy.bomb", "/forkbomb", timeout=60)
    assert status == 200, result
    assert 0 < result["children"] < 40, result
    assert healthy and set(healthy) == {200}, healthy


def test_cpu_shares_split_a_contended_core(deployment: tuple[Deployment, int]) -> None:
    _, port = deployment
    got: dict[str, float] = {}

    def spin(tenant: str) -> None:
        got[tenant] = get(port, tenant, "/spin?seconds=4")[1]["cpu"]

    threads = [threading.Thread(target=spin, args=(t,)) for t in ("l.light", "h.heavy")]
    with health_watch(port) as healthy:  # the supervisor stays responsive meanwhile
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert healthy and set(healthy) == {200}, healthy
    ratio = got["h.heavy"] / max(got["l.light"], 1e-3)
    print(f"cpu seconds light={got['l.light']:.2f} heavy={got['h.heavy']:.2f} ratio={ratio:.2f}")
    assert 2.0 <= ratio <= 4.5, got


def test_cgroups_are_gone_after_stop(deployment: tuple[Deployment, int]) -> None:
    d, _ = deployment
    host = cgroups.probe(cgroups.base_name_for(d.data))
    assert host is not None, "this host has no writable cgroup hierarchy"
    folders = [base / "bomb-trudy" for base in host.bases.values()]
    assert any(f.exists() for f in folders)
    stopped = d.manage("stop", "bomb:trudy")
    assert stopped.returncode == 0, stopped.stderr
    d.wait_states({"bomb:trudy": "stopped"})
    assert not any(f.exists() for f in folders)


@contextlib.contextmanager
def health_watch(port: int) -> Iterator[list[int]]:
    """Poll the control host's /health every 0.1 s while the block runs."""
    healthy: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            healthy.append(http_request(port, "localhost", "/health", timeout=10)[0].status)
            time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        yield healthy
    finally:
        done.set()
        watcher.join()


def token(d: Deployment) -> str:
    made = d.manage("createtoken", "--name", f"reader-{time.monotonic_ns()}")
    assert made.returncode == 0, made.stderr
    return made.stdout.strip()
