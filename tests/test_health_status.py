"""GET /health and GET /status against real runsupervisor processes (and real PostgreSQL)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from instances.health import LagMonitor
from tests import postgres
from tests.conftest import REPO, TENANT_PYTHON, TESTAPP
from tests.harness import Deployment, free_port, http_request

CONFIG = f"""
[settings]
health_check_interval = 1
backoff_base_ms = 100

[service.app]
command = "{TENANT_PYTHON} {TESTAPP}"
health = "/health"
idle_timeout = 120

[service.slow]
command = "{TENANT_PYTHON} {TESTAPP}"
health = "/health"
env = {{ TESTAPP_START_DELAY = "3" }}
startup_timeout = 30
wake_timeout = 30

[service.crashy]
command = "{TENANT_PYTHON} {TESTAPP}"
health = "/health"
env = {{ TESTAPP_EXIT_AFTER = "0", TESTAPP_EXIT_CODE = "1" }}

[instances]
app = ["alice"]
slow = ["carol"]
crashy = ["bob"]
"""
STATES = ("stopped", "starting", "running", "stopping", "backoff", "failed")


def counts(**nonzero: int) -> dict[str, int]:
    return {state: nonzero.get(state, 0) for state in STATES}


class Server(Deployment):
    """A deployment serving HTTP; `host` is the address to bind and to call."""

    def __init__(self, root: Path, config: str = CONFIG, host: str = "127.0.0.1") -> None:
        super().__init__(root, config)
        self.host = host
        self.port = free_port()

    def serve(self, *args: str) -> subprocess.Popen[bytes]:
        bind = f"{self.host}:{self.port}"
        return self.start("--config", str(self.config), "--bind", bind, *args, http=True)

    def get(
        self,
        path: str,
        host: str = "localhost",
        headers: dict[str, str] | None = None,
        private: bool = False,
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """GET over TCP, or with `private` over the --metrics-bind socket (no token)."""
        if private:
            return self.private_get(path)
        response, body = http_request(self.port, host, path, headers=headers, address=self.host)
        return response.status, response.headers, body  # header names: any case

    def json(self, path: str, **kwargs: Any) -> tuple[int, Any]:
        status, headers, body = self.get(path, **kwargs)
        assert headers["Content-Type"] == "application/json", body
        return status, json.loads(body)

    def wait_json(
        self, path: str, check: Any, what: str, timeout: float = 30, private: bool = False
    ) -> Any:
        """Poll `path` until check(status, body) holds (another process: no event to await)."""
        seen: list[Any] = []

        def ok() -> bool:
            try:
                seen[:] = [self.json(path, private=private)]
            except (OSError, http.client.HTTPException):
                return False  # not listening yet
            return bool(check(*seen[0]))

        self.wait_for(f"{what} (last: {seen})", ok, timeout)
        return seen[0][1]


@pytest.fixture
def server(short_tmp: Path) -> Iterator[Server]:
    s = Server(short_tmp)
    try:
        yield s
    finally:
        s.cleanup()


# ---- the lag monitor, in process --------------------------------------------------------


async def test_lag_monitor_sees_a_blocked_loop() -> None:
    monitor = LagMonitor(interval=0.05, window=5)
    await asyncio.sleep(0.12)
    assert monitor.readings and monitor.worst() < 0.05
    time.sleep(0.3)  # block the loop, as slow synchronous code in a view would
    await asyncio.sleep(0.1)
    assert monitor.worst() >= 0.2


# ---- embedded runsupervisor on SQLite ------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_health_ok_with_every_check(server: Server) -> None:
    server.serve()
    body = server.wait_json("/health", lambda status, _: status == 200, "/health 200")
    assert body["status"] == "ok"
    checks = body["checks"]
    assert set(checks) == {"event_loop", "database", "supervisor", "file_descriptors"}
    assert all(check["ok"] for check in checks.values())
    assert checks["file_descriptors"]["exhausted_events"] == 0
    assert 0 <= checks["event_loop"]["lag_ms"] < 1000
    assert checks["supervisor"]["mode"] == "in-process"
    assert checks["supervisor"]["last_tick_s"] < 5
    status, headers, _ = server.get("/health")
    assert headers["Cache-Control"] == "no-store"
    # Only the control host serves it: a tenant host is the tenant's.
    status, _, _ = server.get("/health", host="nobody.app.localhost")
    assert status == 404


@pytest.mark.e2e
@pytest.mark.timeout(150)
def test_status_counts_wakes_connections_and_errors(server: Server) -> None:
    server.serve()
    server.wait_states({"app:alice": "running", "slow:carol": "running", "crashy:bob": "failed"})
    assert server.manage("stop", "slow:carol").returncode == 0
    server.wait_states({"slow:carol": "stopped"})

    status, _, anonymous = server.get("/status")  # loopback is no credential: tenants share it
    assert status == 401, anonymous
    status, body = server.json("/status", private=True)
    assert status == 200
    assert body["version"] == "0.1.0.dev0"
    assert 0 < body["uptime_s"] < 300
    assert body["instances"]["by_service"] == {
        "app": counts(running=1),
        "crashy": counts(failed=1),
        "slow": counts(stopped=1),
    }
    assert body["instances"]["total"] == counts(running=1, stopped=1, failed=1)
    last = body["last_errors"][0]
    assert last["instance"] == "crashy:bob" and last["kind"] == "failed"
    assert "crashed: exited with code 1" in last["message"]
    assert {e["kind"] for e in body["last_errors"]} == {"failed", "backoff"}
    assert body["wakes_in_flight"] == [] and body["open_connections"]["total"] == 0

    # A request for the sleeping slow app is held while it takes 3 s to start.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        held = pool.submit(server.get, "/", "carol.slow.localhost")
        during = server.wait_json(
            "/status",
            # The held request, and the start the supervisor records (written behind it).
            lambda _, b: b["wakes_in_flight"] and b["instances"]["by_service"]["slow"]["starting"],
            "a wake in flight",
            timeout=20,
            private=True,
        )
        status, headers, _ = held.result(timeout=40)
    assert during["wakes_in_flight"][0]["instance"] == "slow:carol"
    assert during["wakes_in_flight"][0]["held_requests"] == 1
    assert during["open_connections"]["by_instance"] == {"slow:carol": 1}
    assert during["instances"]["by_service"]["slow"]["starting"] == 1
    assert status == 404 and int(headers["x-tenement-wake"]) >= 1000  # testapp's 404 for "/"

    status, after = server.json("/status", private=True)
    assert after["wakes_in_flight"] == [] and after["open_connections"]["total"] == 0
    assert after["instances"]["by_service"]["slow"] == counts(running=1)


def non_loopback_ipv4() -> str | None:
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return address.address
    return None


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_status_needs_a_fleet_read_token_off_loopback(short_tmp: Path) -> None:
    address = non_loopback_ipv4()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    server = Server(short_tmp, "", host=address)
    try:
        tokens = {}
        for name, extra in (("reader", []), ("tenant", ["--tenant", "alice"])):
            made = server.manage("createtoken", "--name", name, *extra)
            assert made.returncode == 0, made.stderr
            tokens[name] = made.stdout.strip()
        server.serve()
        # /health stays open: load balancers call it from elsewhere.
        server.wait_json("/health", lambda status, _: status == 200, "/health 200")
        status, headers, body = server.get("/status")
        assert status == 401 and b"bearer token with read scope" in body
        assert headers["WWW-Authenticate"].startswith("Bearer")
        status, _, _ = server.get("/status", headers={"Authorization": "Bearer ten_nope"})
        assert status == 401
        bearer = {"Authorization": f"Bearer {tokens['tenant']}"}
        assert server.get("/status", headers=bearer)[0] == 403
        status, body = server.json(
            "/status", headers={"Authorization": f"Bearer {tokens['reader']}"}
        )
        assert status == 200 and body["instances"]["total"] == counts()
    finally:
        server.cleanup()


# ---- a web process apart from the supervisor: the heartbeat -----------------------------


@pytest.mark.e2e
@pytest.mark.timeout(150)
def test_health_follows_the_supervisor_heartbeat(server: Server) -> None:
    """Scaled mode: uvicorn serves the site; the supervisor runs in its own process."""
    sup = server.start("--config", str(server.config))  # --no-http
    server.wait_states({"app:alice": "running"})
    env = {**server.env, "TENEMENT_DATA_DIR": str(server.data)}
    web = subprocess.Popen(
        [
            *(sys.executable, "-m", "uvicorn", "tenement_site.asgi:application"),
            *("--host", "127.0.0.1", "--port", str(server.port), "--log-level", "warning"),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    server.others.append(web)
    body = server.wait_json("/health", lambda status, _: status == 200, "/health 200")
    assert body["checks"]["supervisor"]["mode"] == "heartbeat"
    assert body["checks"]["supervisor"]["heartbeat_age_s"] < 15

    # A supervisor killed outright leaves its heartbeat behind; it goes stale.
    sup.send_signal(signal.SIGKILL)
    sup.wait(10)
    began = time.monotonic()
    body = server.wait_json("/health", lambda status, _: status == 503, "/health 503", 40)
    assert time.monotonic() - began < 30
    assert body["status"] == "unhealthy"
    assert body["reason"].startswith("supervisor: no heartbeat for ")
    assert body["checks"]["database"]["ok"] is True


# ---- PostgreSQL stopped under a running supervisor ---------------------------------------


class Cluster:
    """A throwaway PostgreSQL cluster this test can stop and start again on one port."""

    def __init__(self) -> None:
        self.initdb, self.pg_ctl = postgres._bin("initdb"), postgres._bin("pg_ctl")
        if not self.initdb or not self.pg_ctl:
            raise RuntimeError("PostgreSQL is not installed: run scripts/system-deps.sh test")
        self.root = tempfile.mkdtemp(prefix="tpg", dir="/tmp")
        if os.getuid() == 0:
            shutil.chown(self.root, "postgres")
        self.data, self.port = os.path.join(self.root, "data"), free_port()
        self.run([self.initdb, "-D", self.data, "-A", "trust", "-U", "postgres"])
        self.url = f"postgres://postgres@127.0.0.1:{self.port}"

    def run(self, cmd: list[str]) -> None:
        subprocess.run(postgres._as_owner(cmd), check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = f"{self.root}/log"
        self.run([self.pg_ctl, "-D", self.data, "-o", opts, "-l", log, "-w", "start"])

    def stop(self) -> None:
        self.run([self.pg_ctl, "-D", self.data, "-m", "immediate", "-w", "stop"])

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    try:
        c.start()
        yield c
    finally:
        c.remove()


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_health_503_while_postgresql_is_down(server: Server, cluster: Cluster) -> None:
    server.env["DATABASE_URL"] = postgres.create_database(cluster.url, "tenement_health")
    server.serve()
    server.wait_json("/health", lambda status, _: status == 200, "/health 200", 60)

    cluster.stop()
    began = time.monotonic()
    status, body = server.json("/health")
    assert time.monotonic() - began < 5  # a dead database must not hang the check
    assert status == 503 and body["status"] == "unhealthy"
    assert body["reason"].startswith("database: unreachable (OperationalError)")
    assert body["checks"]["database"]["ok"] is False
    assert body["checks"]["event_loop"]["ok"] is True
    assert "Traceback" not in json.dumps(body) and "127.0.0.1" not in body["reason"]
    status, _, text = server.get("/status", private=True)
    assert status == 503 and b"the database is unreachable" in text

    cluster.start()
    body = server.wait_json("/health", lambda status, _: status == 200, "/health 200 again", 60)
    supervisor = body["checks"]["supervisor"]
    assert supervisor["mode"] == "in-process" and supervisor["ok"] is True  # it rode it out
