"""Releases end to end: a real runsupervisor, real apps, real clients, upstream's `ten`.

Upstream's own scripts/e2e.sh scenarios for weighted routing, deploy and route are ported
here (our code, its assertions), driven by its `ten` 0.2.2 binary against our server.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from routing.releases import bucket
from tests.conftest import REPO, TENANT_PYTHON, TENANT_UVICORN, TESTAPP
from tests.harness import Deployment, free_port, http_request

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

APP = f"{TENANT_UVICORN} --app-dir {REPO} tests.apps.proxyapp:app --uds {{socket}}"
SERVICE = """
command = "{app} --log-level warning"
health = "/health"
isolation = "process"
startup_timeout = 4
wake_timeout = 20
stop_timeout = 5
idle_timeout = {idle}
"""
TENANTS = [f"t{i}" for i in range(12)]


def config() -> str:
    parts = ["[settings]\nhealth_check_interval = 1\nbackoff_base_ms = 100\n"]
    for name, idle in (("web", 0), ("bg", 0), ("weighted", 0), ("sleepy", 2), ("blue", 0)):
        parts.append(f"[service.{name}]" + SERVICE.format(app=APP, idle=idle))
    parts.append(f'[service.never]\ncommand = "{TENANT_PYTHON} {TESTAPP}"\nhealth = "/health"\n')
    parts.append('isolation = "process"\nstartup_timeout = 2\n')
    return "\n".join(parts)


class Server(Deployment):
    def __init__(self, root: Path) -> None:
        super().__init__(root, config())
        self.port = free_port()
        self.proc = self.start(
            "--config", str(self.config), "--bind", f"127.0.0.1:{self.port}", http=True
        )
        self.wait_for("the server", self.up, 60)
        made = self.manage("createtoken", "--name", "ops", "--scope", "admin")
        assert made.returncode == 0, made.stderr
        self.token = made.stdout.strip()

    def up(self) -> bool:
        try:
            return http_request(self.port, "localhost", "/health", timeout=2)[0].status == 200
        except OSError:
            return False

    def get(self, host: str, path: str = "/whoami", **kwargs: Any) -> tuple[int, Any]:
        response, body = http_request(self.port, host, path, **kwargs)
        try:
            return response.status, json.loads(body)
        except ValueError:
            return response.status, body

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        data = json.dumps(body) if body is not None else None
        response, raw = http_request(
            self.port, "localhost", path, method=method, body=data, headers=headers, timeout=60
        )
        return response.status, json.loads(raw) if raw else None

    def ten(self, binary: Path, *args: str) -> str:
        """Upstream's `ten`, talking to our server."""
        server = f"http://127.0.0.1:{self.port}"
        result = subprocess.run(
            [str(binary), "--server", server, "--token", self.token, *args],
            capture_output=True,
            text=True,
            timeout=90,
            env={"PATH": os.environ["PATH"], "HOME": str(self.root)},
        )
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        return result.stdout

    def register(self, service: str, ids: list[str], start: bool = True) -> None:
        for i in ids:
            status, body = self.api(
                "POST", "/api/instances/", {"service": service, "instance_id": i, "start": start}
            )
            assert status == 201, body

    def release_of(self, key: str) -> str:
        service, instance_id = key.split(":")
        status, body = self.get(f"{instance_id}.{service}.localhost")
        assert status == 200, body
        return body["release"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = Path(os.path.join("/tmp", f"tr{os.getpid()}"))
    root.mkdir(mode=0o711)
    s = Server(root)
    try:
        yield s
    finally:
        s.cleanup()
        subprocess.run(["rm", "-rf", str(root)], check=False)


def count_by_instance(server: Server, host: str, n: int) -> collections.Counter[str]:
    """n requests on one keep-alive connection, counted by the instance that answered."""
    seen: collections.Counter[str] = collections.Counter()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        for _ in range(n):
            conn.request("GET", "/whoami", headers={"Host": host})
            response = conn.getresponse()
            body = response.read()
            assert response.status == 200, body
            seen[json.loads(body)["instance"]] += 1
    finally:
        conn.close()
    return seen


# ---- upstream's shape: weighted service hosts, driven by upstream's `ten` -------------------


def test_upstream_weighted_routing_and_weight_zero(server: Server, upstream_ten: Path) -> None:
    """scripts/e2e.sh "weighted-multi": both appear; after weight a=0 b=100, a gets 0."""
    server.register("weighted", ["a", "b"])
    server.wait_states({"weighted:a": "running", "weighted:b": "running"})
    seen = count_by_instance(server, "weighted.localhost", 40)
    assert seen["a"] > 0 and seen["b"] > 0, seen
    out = server.ten(upstream_ten, "weight", "weighted:a", "0")
    assert "Set weighted:a weight to 0" in out
    server.ten(upstream_ten, "weight", "weighted:b", "100")
    seen = count_by_instance(server, "weighted.localhost", 200)
    assert seen == {"b": 200}
    # The 10,000-request split: within 2 points of the weights (30/70).
    server.ten(upstream_ten, "weight", "weighted:a", "30")
    server.ten(upstream_ten, "weight", "weighted:b", "70")
    seen = count_by_instance(server, "weighted.localhost", 10_000)
    assert abs(seen["a"] / 100 - 30) <= 2 and abs(seen["b"] / 100 - 70) <= 2, seen
    # scripts/e2e.sh "weighted-reselect": one backend killed, every request still answered.
    pid = server.get("a.weighted.localhost")[1]["pid"]
    os.kill(pid, signal.SIGKILL)
    for _ in range(15):
        status, body = server.get("weighted.localhost", timeout=10)
        assert status == 200, body


def test_upstream_weighted_wakes_a_sleeping_instance_and_skips_a_failed_one(
    server: Server, upstream_ten: Path
) -> None:
    """A chosen instance asleep is woken (no error); a failed one gets nothing."""
    server.register("sleepy", ["s1"])
    server.wait_states({"sleepy:s1": "running"})
    server.wait_states({"sleepy:s1": "stopped"}, timeout=30)  # idle_timeout = 2
    assert count_by_instance(server, "sleepy.localhost", 3) == {"s1": 3}
    server.register("never", ["ok", "bad"], start=False)
    # "bad" never gets healthy under its release override, and is failed for good.
    server.sql(
        "UPDATE instances_instance SET state = 'failed' WHERE instance_id = 'bad' AND "
        "service_id = (SELECT id FROM instances_service WHERE name = 'never')"
    )
    server.ten(upstream_ten, "weight", "never:ok", "0")
    status, _ = server.get("never.localhost", "/health")
    # The proxy learns about "bad" being failed on its first wake; after that, only
    # 503 "no instance takes traffic" (ok has weight 0), never a request to bad.
    assert status == 503


def test_upstream_deploy_and_route(server: Server, upstream_ten: Path) -> None:
    """scripts/e2e.sh "deploy-route": deploy v1 (100) and v2 (0), then route v1 -> v2."""
    out = server.ten(upstream_ten, "deploy", "bg:v1", "--weight", "100", "--timeout", "30")
    assert "Deployed bg:v1" in out and "Status: healthy" in out
    server.ten(upstream_ten, "deploy", "bg:v2", "--weight", "0", "--timeout", "30")
    assert server.get("v2.bg.localhost")[1]["instance"] == "v2"
    assert count_by_instance(server, "bg.localhost", 10) == {"v1": 10}
    out = server.ten(upstream_ten, "route", "bg", "--from", "v1", "--to", "v2")
    assert "Routed traffic: bg:v1 -> bg:v2" in out
    assert count_by_instance(server, "bg.localhost", 10) == {"v2": 10}
    # Every change is an audit record, with the token that made it.
    status, changes = server.api("GET", "/api/releases/changes?service=bg")
    assert status == 200
    assert [c["kind"] for c in changes][:2] == ["route", "deploy"]
    assert all(c["actor"] == "token:ops" for c in changes)


def test_upstream_deploy_of_an_app_that_never_gets_healthy_fails_cleanly(
    server: Server, upstream_ten: Path
) -> None:
    server.sql(
        "UPDATE instances_service SET env = ? WHERE name = 'never'",
        json.dumps({"TESTAPP_HEALTH": "fail"}),
    )
    deploy = subprocess.Popen(
        [
            str(upstream_ten),
            "--server",
            f"http://127.0.0.1:{server.port}",
            "--token",
            server.token,
            "deploy",
            "never:v9",
            "--timeout",
            "4",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # While the deploy waits for health, the rest of the API answers at once.
        server.wait_for("the deploy to begin", lambda: "never:v9" in server.rows(), 10)
        began = time.monotonic()
        status, _ = server.api("GET", "/api/releases/changes?service=never")
        assert status == 200 and time.monotonic() - began < 1.5
        assert deploy.poll() is None  # still waiting
        _, stderr = deploy.communicate(timeout=60)
    finally:
        if deploy.poll() is None:
            deploy.kill()
            deploy.wait()
    assert deploy.returncode != 0, stderr
    rows = server.rows()
    assert rows["never:v9"]["weight"] == 0 and rows["never:v9"]["desired_state"] == "stopped"


# ---- our shape: tenant releases ---------------------------------------------------------------


def expected(weights: dict[str, int], tenant: str, service: str = "web") -> str:
    """Independent of the code under test: newest first, each its weight of buckets."""
    point, start = bucket(service, tenant), 0
    for name in sorted(weights, reverse=True):
        if weights[name] and start <= point < start + weights[name]:
            return name
        start += weights[name]
    return min(n for n, w in weights.items() if w)


class SingleInstanceWatch:
    """Samples the processes of every tenant; two at once for one tenant is a failure."""

    def __init__(self, server: Server, service: str) -> None:
        self.service = service
        # Only this deployment's apps: other test runs may share the machine.
        self.data = str(server.data)
        self.worst: collections.Counter[str] = collections.Counter()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.done.is_set():
            seen: collections.Counter[str] = collections.Counter()
            for p in psutil.process_iter(["cmdline"]):
                with contextlib.suppress(psutil.Error):
                    if "tests.apps.proxyapp:app" not in " ".join(p.info["cmdline"] or ()):
                        continue
                    env = p.environ()
                    mine = env.get("DATA_DIR", "").startswith(self.data)
                    if mine and env.get("SERVICE_NAME") == self.service:
                        seen[env["INSTANCE_ID"]] += 1
            for tenant, n in seen.items():
                self.worst[tenant] = max(self.worst[tenant], n)
            time.sleep(0.02)

    def __enter__(self) -> SingleInstanceWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(10)


def test_tenant_split_moves_forward_pins_win_and_stays_stable(server: Server) -> None:
    keys = [f"web:{t}" for t in TENANTS]
    server.register("web", TENANTS)
    server.wait_states(dict.fromkeys(keys, "running"), timeout=90)
    status, body = server.api(
        "POST", "/api/services/web/releases", {"name": "v2", "env": {"RELEASE": "v2"}}
    )
    assert status == 201, body
    # Nothing moves yet: v2 has weight 0.
    assert {server.release_of(k) for k in keys} == {""}
    with SingleInstanceWatch(server, "web") as watch:
        placed: dict[str, str] = {}
        for weight in (30, 60):
            status, body = server.api(
                "PUT", "/api/services/web/releases/v2/weight", {"weight": weight}
            )
            assert status == 200, body
            want = {t: expected({"v1": 100 - weight, "v2": weight}, t) for t in TENANTS}

            def settled(want: dict[str, str] = want) -> bool:
                last = server.rows()
                # (Those that never moved ran the service's definition: release v1.)
                return all((last[f"web:{t}"]["last_release"] or "v1") == r for t, r in want.items())

            server.wait_for(f"tenants on their releases at v2={weight}", settled, 60)
            server.wait_states(dict.fromkeys(keys, "running"), timeout=60)
            now = {t: server.release_of(f"web:{t}") or "v1" for t in TENANTS}
            assert now == want
            # Forward only: nobody on v2 before is on v1 now.
            assert all(now[t] == "v2" for t, r in placed.items() if r == "v2")
            placed = now
        # A pin wins over the split, and is honoured at once.
        on_v1 = next(t for t, r in placed.items() if r == "v1")
        status, _ = server.api("PUT", f"/api/instances/web:{on_v1}/release", {"release": "v2"})
        assert status == 200
        server.wait_for("the pin", lambda: server.rows()[f"web:{on_v1}"]["last_release"] == "v2")
        server.wait_states({f"web:{on_v1}": "running"})
        assert server.release_of(f"web:{on_v1}") == "v2"
    assert max(watch.worst.values()) == 1, watch.worst
    status, body = server.api("GET", "/api/services/web/releases")
    counts = {r["name"]: r["tenants"] for r in body["releases"]}
    assert counts["v2"] == sum(1 for r in placed.values() if r == "v2") + 1


def test_a_release_that_never_gets_healthy_falls_back_with_no_client_error(
    server: Server,
) -> None:
    server.register("web", ["fb"])
    server.wait_states({"web:fb": "running"}, timeout=60)
    assert server.get("fb.web.localhost")[0] == 200
    status, body = server.api(
        "POST", "/api/services/web/releases", {"name": "broken", "health": "/nope"}
    )
    assert status in (201, 409), body
    server.api("PUT", "/api/instances/web:fb/release", {"release": "broken"})
    # Requests during the failed start and the fallback are held and answered, never 5xx.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status, who = server.get("fb.web.localhost")
        assert status == 200, who
        if any(
            e
            for e in server.query(
                "SELECT 1 FROM instances_releasechange WHERE kind = 'fallback' AND instance = 'fb'"
            )
        ):
            break
    else:
        raise AssertionError("no fallback recorded")
    assert server.get("fb.web.localhost")[0] == 200
    assert server.rows()["web:fb"]["last_release"] != "broken"
    _, _, metrics = server.private_get("/metrics")
    assert b'tenement_release_fallbacks_total{release="broken",service="web"}' in metrics
    server.api("PUT", "/api/instances/web:fb/release", {"release": ""})


# ---- our `ten` -------------------------------------------------------------------------------


def test_our_ten_release_verbs_with_smoke_tests(server: Server) -> None:
    from tests.test_cli import ten

    def ok(*args: str) -> str:
        result = ten(*args, server=f"http://127.0.0.1:{server.port}", token=server.token)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        return result.stdout

    server.register("web", ["c0", "c1"])
    server.wait_states({"web:c0": "running", "web:c1": "running"}, timeout=60)
    out = ok("release", "create", "web", "v3", "--env", "RELEASE=v3", "--smoke", "c0")
    assert "v3" in out and "active" in out
    assert server.rows()["web:c0"]["release"] == ""  # the smoke pin is taken back
    # A release whose smoke test fails is failed, with weight 0, and nobody moves onto it.
    result = ten(
        "release",
        "create",
        "web",
        "v4",
        "--health",
        "/nope",
        "--smoke",
        "c1",
        "--weight",
        "50",
        server=f"http://127.0.0.1:{server.port}",
        token=server.token,
    )
    assert result.returncode == 7, (result.stdout, result.stderr)
    assert "smoke test of v4 on web:c1 failed" in result.stderr
    state = server.query("SELECT state, weight FROM instances_release WHERE name = 'v4'")
    assert state == [("failed", 0)]
    assert server.get("c1.web.localhost")[0] == 200
    ok("release", "pin", "web:c1", "v3")
    server.wait_for("c1 on v3", lambda: server.rows()["web:c1"]["last_release"] == "v3")
    assert "unpinned" in ok("release", "pin", "web:c1")
    listing = json.loads(ok("release", "list", "web", "--json"))
    assert {r["name"]: r["state"] for r in listing["releases"]}["v4"] == "failed"
    changes = ok("release", "changes", "web")
    assert "failed" in changes and "token:ops" in changes
    assert "Set web:c0 weight to 50" in ok("weight", "web:c0", "50")


# ---- blue-green under load ------------------------------------------------------------------


class Load:
    """50 clients, each on its own keep-alive connection, mixed GET and POST, until told."""

    def __init__(self, server: Server, tenants: list[str], clients: int = 50) -> None:
        self.server, self.tenants = server, tenants
        self.stop = threading.Event()
        self.results: list[tuple[float, int, str]] = []  # (time, status, release)
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.pool = concurrent.futures.ThreadPoolExecutor(clients)
        self.futures = [self.pool.submit(self.client, i) for i in range(clients)]

    def client(self, n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=30)
        i = n
        while not self.stop.is_set():
            i += 1
            tenant = self.tenants[i % len(self.tenants)]
            host = {"Host": f"{tenant}.blue.localhost"}
            try:
                if i % 2:
                    conn.request("GET", "/whoami", headers=host)
                else:
                    conn.request("POST", "/upload", body=b"x" * 2048, headers=host)
                response = conn.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException) as e:
                with self.lock:
                    self.errors.append(f"{tenant}: {e!r}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=30)
                continue
            # /whoami says which release answered; /upload (the POSTs) does not.
            answer = json.loads(body) if response.status == 200 else {}
            release = answer.get("release", "-")
            with self.lock:
                self.results.append((time.monotonic(), response.status, release))
        conn.close()

    def finish(self) -> None:
        self.stop.set()
        for future in self.futures:
            future.result(timeout=60)
        self.pool.shutdown()


def test_blue_green_switch_and_rollback_under_load_lose_nothing(server: Server) -> None:
    tenants = [f"b{i}" for i in range(10)]
    server.register("blue", tenants)
    server.wait_states({f"blue:{t}": "running" for t in tenants}, timeout=90)
    status, body = server.api(
        "POST", "/api/services/blue/releases", {"name": "v2", "env": {"RELEASE": "v2"}}
    )
    assert status == 201, body
    stack = contextlib.ExitStack()

    def websocket() -> Any:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        return stack.enter_context(
            ws_connect("ws://b0.blue.localhost/ws", sock=sock, open_timeout=15)
        )

    ws = websocket()
    watch = stack.enter_context(SingleInstanceWatch(server, "blue"))
    load = Load(server, tenants)
    try:
        time.sleep(1)
        status, body = server.api("POST", "/api/services/blue/releases/v2/switch")
        assert status == 200, body
        switched = time.monotonic()
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
        # The client reconnects at once: the handshake waits for the tenant on v2.
        ws = websocket()
        ws.send("hello")
        assert ws.recv(timeout=10) == "hello"
        assert server.release_of("blue:b0") == "v2"

        def all_on(name: str) -> bool:
            rows = server.rows()
            return all(rows[f"blue:{t}"]["last_release"] == name for t in tenants)

        server.wait_for("every tenant on v2", lambda: all_on("v2"), 60)
        on_v2 = time.monotonic()
        time.sleep(1)
        status, body = server.api("POST", "/api/services/blue/rollback")
        assert status == 200, body
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
        server.wait_for("every tenant back on v1", lambda: all_on("v1"), 60)
        time.sleep(0.5)
    finally:
        load.finish()
        stack.close()
    assert watch.worst and max(watch.worst.values()) == 1, watch.worst
    assert not load.errors, load.errors[:5]
    statuses = collections.Counter(s for _, s, _ in load.results)
    assert set(statuses) == {200}, statuses
    assert len(load.results) > 500
    # Between "every tenant is on v2" and the rollback, every answer came from v2.
    middle = {r for t, s, r in load.results if on_v2 + 0.2 < t < on_v2 + 0.9 and r != "-"}
    assert middle == {"v2"}, middle
    assert any(r == "" for t, _, r in load.results if t < switched)
    assert server.release_of("blue:b0") == ""  # v1: the service's own definition


def test_tenant_release_is_stable_across_idle_stops_and_supervisor_restarts(
    short_tmp: Path,
) -> None:
    server = Server(short_tmp)
    try:
        check_stable_across_restarts(server)
    finally:
        server.cleanup()


def check_stable_across_restarts(server: Server) -> None:
    tenants = [f"s{i}" for i in range(8)]
    server.register("sleepy", tenants, start=False)
    status, body = server.api(
        "POST",
        "/api/services/sleepy/releases",
        {"name": "v2", "env": {"RELEASE": "v2"}, "weight": 50},
    )
    assert status == 201, body
    want = {t: expected({"v1": 50, "v2": 50}, t, "sleepy") for t in tenants}
    first = {t: server.release_of(f"sleepy:{t}") or "v1" for t in tenants}
    assert first == want
    server.wait_states({f"sleepy:{t}": "stopped" for t in tenants}, timeout=30)
    assert {t: server.release_of(f"sleepy:{t}") or "v1" for t in tenants} == want
    server.proc.terminate()
    server.proc.wait(30)
    server.app_pids.clear()
    server.proc = server.start(
        "--config", str(server.config), "--bind", f"127.0.0.1:{server.port}", http=True
    )
    server.wait_for("the server again", server.up, 60)
    assert {t: server.release_of(f"sleepy:{t}") or "v1" for t in tenants} == want
