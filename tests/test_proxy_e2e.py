"""The proxy end to end: a real runsupervisor, real apps on Unix sockets, real clients."""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from tests.conftest import REPO, TENANT_PYTHON, TENANT_UVICORN, TESTAPP
from tests.harness import Deployment, free_port, http_request

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

APP = f"{TENANT_UVICORN} --app-dir {REPO} tests.apps.proxyapp:app --uds {{socket}}"
CONFIG = f"""
[settings]
health_check_interval = 1
backoff_base_ms = 100
backoff_max_ms = 400

[service.web]
command = "{APP} --log-level warning"
health = "/health"
# The tests read the app's own pid (and kill it): outside a PID namespace that is the
# host's pid. Isolation itself is tested in test_isolation.py.
isolation = "process"
idle_timeout = 2
request_timeout = 2
wake_timeout = 10
stop_timeout = 2

[service.never]
command = "{TENANT_PYTHON} {TESTAPP}"
health = "/health"
env = {{ TESTAPP_HEALTH = "fail" }}
startup_timeout = 30
wake_timeout = 1.5

[service.crashy]
command = "{TENANT_PYTHON} {TESTAPP}"
health = "/health"
env = {{ TESTAPP_EXIT_AFTER = "0", TESTAPP_EXIT_CODE = "1" }}

[instances]
web = ["alice", "bob"]
never = ["carol"]
"""
MIB = 1024 * 1024


class Proxy(Deployment):
    """A deployment serving HTTP on a free loopback port."""

    def __init__(self, root: Path, env: dict[str, str] | None = None) -> None:
        super().__init__(root, CONFIG)
        self.port = free_port()
        self.env["TENEMENT_MAX_BODY_MB"] = "70"
        self.env.update(env or {})
        self.proc = self.start(
            "--config", str(self.config), "--bind", f"127.0.0.1:{self.port}", http=True
        )
        self.proc_info = psutil.Process(self.proc.pid)

    def request(
        self,
        host: str,
        path: str = "/",
        method: str = "GET",
        body: Any = None,
        headers: dict[str, str] | None = None,
        timeout: float = 20,
    ) -> tuple[http.client.HTTPResponse, bytes]:
        return http_request(
            self.port, host, path, method=method, body=body, headers=headers, timeout=timeout
        )

    def json(self, host: str, path: str) -> Any:
        response, body = self.request(host, path)
        assert response.status == 200, (response.status, body)
        return json.loads(body)

    def starts(self, key: str) -> int:
        """How many times `key` has been started (lifecycle events)."""
        service, instance_id = key.split(":")
        with contextlib.closing(sqlite3.connect(self.data / "tenement.sqlite3")) as db:
            (n,) = db.execute(
                "SELECT count(*) FROM instances_event e JOIN instances_instance i "
                "ON e.instance_id = i.id JOIN instances_service s ON i.service_id = s.id "
                "WHERE s.name = ? AND i.instance_id = ? AND e.kind = 'starting'",
                (service, instance_id),
            ).fetchone()
        return n

    def stop(self, key: str) -> None:
        result = self.manage("stop", key, timeout=60)
        assert result.returncode == 0, result.stderr
        self.wait_states({key: "stopped"})

    def websocket(self, host: str, path: str = "/ws", **kwargs: Any) -> ClientConnection:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        return ws_connect(f"ws://{host}{path}", sock=sock, open_timeout=15, **kwargs)


@pytest.fixture
def proxy(short_tmp: Path) -> Iterator[Proxy]:
    p = Proxy(short_tmp)
    try:
        p.wait_states({"web:alice": "running", "web:bob": "running"})
        yield p
    finally:
        p.cleanup()


def raw_request(port: int, host: bytes) -> bytes:
    """Send a request line by hand: http.client refuses to send some bad hosts."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


# ---- routing -----------------------------------------------------------------------------


def test_subdomains_route_to_their_own_tenant(proxy: Proxy) -> None:
    alice = proxy.json("alice.web.localhost", "/whoami")
    bob = proxy.json("bob.web.localhost", "/whoami")
    assert alice["instance"] == "alice" and bob["instance"] == "bob"
    assert alice["pid"] != bob["pid"]
    # Case, port and one trailing dot do not matter.
    assert proxy.json(f"ALICE.Web.LocalHost.:{proxy.port}", "/whoami") == alice
    # The control host is Django: the dashboard sends a visitor to its login page.
    response, _ = proxy.request("localhost", "/")
    assert response.status == 302
    assert response.getheader("Location") == "/accounts/login/?next=/"
    response, body = proxy.request("localhost", "/accounts/login/?next=/")
    assert response.status == 200 and b"tenement" in body.lower()


def test_unknown_tenants_get_404_and_nothing_is_started(proxy: Proxy) -> None:
    for host, what in [
        ("zed.web.localhost", b"no such tenant: web:zed"),
        ("alice.nosuch.localhost", b"no such service: nosuch:alice"),
        ("x.alice.web.localhost", b"no tenant is served"),
        ("example.com", b"no tenant is served"),
    ]:
        response, body = proxy.request(host)
        assert response.status == 404, host
        assert what in body and b"Traceback" not in body
    assert "web:zed" not in proxy.rows()
    assert not (proxy.data / "web" / "zed").exists()
    assert not (proxy.data / "nosuch").exists()


@pytest.mark.parametrize(
    "host",
    [
        b"a..web.localhost",
        b"al%69ce.web.localhost",
        b"alice/x.web.localhost",
        b"alice.web.localhost:99999",
        b"alice.web.localhost:http",
        b"alice\x01.web.localhost",
        b"-",
        b"",
    ],
)
def test_malformed_hosts_get_400_never_5xx(proxy: Proxy, host: bytes) -> None:
    response = raw_request(proxy.port, host)
    assert response.startswith(b"HTTP/1.1 400"), response[:200]
    assert b"Traceback" not in response


# ---- forwarding ----------------------------------------------------------------------------


def test_headers_forwarded_and_hop_by_hop_dropped(proxy: Proxy) -> None:
    response, body = proxy.request(
        "alice.web.localhost",
        "/headers?x=1",
        headers={
            "Authorization": "Bearer secret-token",
            "X-Request-ID": "req-123",
            "X-Forwarded-For": "10.9.8.7",
            "X-Forwarded-Host": "spoofed.example",
            "Connection": "keep-alive, X-Drop-Me",
            "X-Drop-Me": "1",
            "Keep-Alive": "timeout=5",
            "Proxy-Authorization": "Basic eA==",
            "X-Custom": "kept",
        },
    )
    assert response.status == 200
    seen = json.loads(body)
    names = [n for n, _ in seen]
    got = dict(seen)
    assert got["authorization"] == "Bearer secret-token"
    assert got["x-custom"] == "kept"
    assert got["host"] == "alice.web.localhost"
    # The client is no trusted proxy (TENEMENT_TRUSTED_PROXIES is empty): its claim is
    # replaced, not extended (tests/edge/test_headers.py has the trusted case).
    assert got["x-forwarded-for"] == "127.0.0.1"
    assert got["x-forwarded-proto"] == "http"
    assert got["x-forwarded-host"] == "alice.web.localhost"
    assert got["x-request-id"] == "req-123"
    for hop in ("x-drop-me", "keep-alive", "proxy-authorization"):
        assert hop not in names
    assert names.count("x-forwarded-host") == 1
    assert response.getheader("X-Request-ID") == "req-123"
    assert response.getheader("X-Tenement-Wake") is None  # it was running

    response, _ = proxy.request("alice.web.localhost", "/headers")
    generated = response.getheader("X-Request-ID")
    assert generated and len(generated) == 32


def test_64_mib_each_way_in_bounded_memory(proxy: Proxy) -> None:
    peak = PeakRss(proxy.proc_info)
    with peak:
        digest = hashlib.sha256()
        chunk = os.urandom(MIB)

        def body() -> Iterator[bytes]:
            for _ in range(64):
                digest.update(chunk)
                yield chunk

        response, answer = proxy.request(
            "alice.web.localhost",
            "/upload",
            "POST",
            body=body(),
            headers={"Content-Length": str(64 * MIB)},
            timeout=60,
        )
        assert response.status == 200, answer
        assert json.loads(answer) == {"bytes": 64 * MIB, "sha256": digest.hexdigest()}

        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=60)
        conn.request("GET", "/download?mb=64", headers={"Host": "bob.web.localhost"})
        response = conn.getresponse()
        size = 0
        while data := response.read(MIB):
            size += len(data)
        conn.close()
        assert size == 64 * MIB
    assert peak.growth < 40 * MIB, f"proxy RSS grew {peak.growth / MIB:.0f} MiB"


class PeakRss:
    """Samples a process's RSS in a thread; `growth` is peak minus the starting value."""

    def __init__(self, process: psutil.Process) -> None:
        self.process = process
        self.base = process.memory_info().rss
        self.peak = self.base
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def sample(self) -> None:
        while not self.done.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(5)

    @property
    def growth(self) -> int:
        return self.peak - self.base


def test_chunked_upload_is_forwarded(proxy: Proxy) -> None:
    parts = [b"a" * 1000, b"b" * 70_000, b"c"]
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=20)
    try:
        conn.request(
            "POST",
            "/upload",
            body=iter(parts),
            headers={"Host": "alice.web.localhost"},
            encode_chunked=True,
        )
        response = conn.getresponse()
        answer = json.loads(response.read())
    finally:
        conn.close()
    whole = b"".join(parts)
    assert answer == {"bytes": len(whole), "sha256": hashlib.sha256(whole).hexdigest()}


def test_body_over_the_limit_gets_413(proxy: Proxy) -> None:
    response, body = proxy.request(
        "alice.web.localhost",
        "/upload",
        "POST",
        body=b"x" * 1024,
        headers={"Content-Length": str(71 * MIB)},
    )
    assert response.status == 413
    assert b"70 MB" in body


def test_no_response_headers_within_request_timeout_is_504(proxy: Proxy) -> None:
    started = time.monotonic()
    response, body = proxy.request("alice.web.localhost", "/slow?s=10")
    assert response.status == 504, body
    assert 1.8 < time.monotonic() - started < 5


def test_client_disconnect_mid_stream_releases_the_upstream(proxy: Proxy) -> None:
    def upstream_unix_connections() -> int:
        return len(proxy.proc_info.net_connections(kind="unix"))

    proxy.json("alice.web.localhost", "/active")
    baseline = upstream_unix_connections()
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    conn.request("GET", "/sse", headers={"Host": "alice.web.localhost"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.read1(100).startswith(b"data: 0")
    assert proxy.json("alice.web.localhost", "/active") == {"sse": 1}
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    proxy.wait_for("the app's stream to end", lambda: active(proxy) == 0, timeout=5)
    proxy.wait_for(
        "the upstream connection to close",
        lambda: upstream_unix_connections() <= baseline,
        timeout=5,
    )


def active(proxy: Proxy) -> int:
    return proxy.json("alice.web.localhost", "/active")["sse"]


# ---- waking ---------------------------------------------------------------------------------


def test_idle_stop_then_a_request_wakes_it_and_is_not_lost(proxy: Proxy) -> None:
    first = proxy.json("alice.web.localhost", "/whoami")["pid"]
    rows = proxy.wait_states({"web:alice": "stopped"}, timeout=15)  # idle_timeout is 2 s
    assert not os.path.exists(rows["web:alice"]["socket_path"])
    response, body = proxy.request("alice.web.localhost", "/whoami")
    assert response.status == 200
    assert json.loads(body)["pid"] != first
    assert int(response.getheader("X-Tenement-Wake")) > 0


def test_a_burst_of_150_requests_wakes_the_instance_once(proxy: Proxy) -> None:
    proxy.stop("web:bob")
    before = proxy.starts("web:bob")
    with concurrent.futures.ThreadPoolExecutor(150) as pool:
        results = list(
            pool.map(lambda _: proxy.request("bob.web.localhost", "/whoami"), range(150))
        )
    statuses = [r.status for r, _ in results]
    assert statuses == [200] * 150
    assert len({json.loads(body)["pid"] for _, body in results}) == 1
    assert proxy.starts("web:bob") - before == 1


def test_crash_then_the_next_request_is_held_through_the_restart(proxy: Proxy) -> None:
    pid = proxy.json("alice.web.localhost", "/whoami")["pid"]
    os.kill(pid, signal.SIGKILL)
    response, body = proxy.request("alice.web.localhost", "/whoami")
    assert response.status == 200, body
    assert json.loads(body)["pid"] != pid


def test_a_never_healthy_app_gets_503_within_wake_timeout(proxy: Proxy) -> None:
    started = time.monotonic()
    response, body = proxy.request("carol.never.localhost")
    waited = time.monotonic() - started
    assert response.status == 503, body
    assert response.getheader("Retry-After")
    assert 1.4 < waited < 1.5 + 1.0  # wake_timeout is 1.5 s
    assert b"did not become ready" in body and b"Traceback" not in body


def test_a_crash_looping_instance_gets_503_at_once(proxy: Proxy) -> None:
    result = proxy.manage("spawn", "crashy:dave", "--no-wait")
    assert result.returncode == 0, result.stderr
    proxy.wait_states({"crashy:dave": "failed"}, timeout=20)
    started = time.monotonic()
    response, body = proxy.request("dave.crashy.localhost")
    assert response.status == 503 and b"crash loop" in body
    assert time.monotonic() - started < 0.5


# ---- WebSockets ---------------------------------------------------------------------------------


def test_websocket_echo_subprotocol_and_it_outlives_idle_timeout(proxy: Proxy) -> None:
    with proxy.websocket("alice.web.localhost", subprotocols=["chat.v2", "chat.v1"]) as ws:
        assert ws.subprotocol == "chat.v2"
        ws.send("hello")
        assert ws.recv(timeout=5) == "hello"
        ws.send(b"\x00\x01binary")
        assert ws.recv(timeout=5) == b"\x00\x01binary"
        assert ws.ping().wait(5)
        time.sleep(3.5)  # longer than idle_timeout (2 s): the open socket keeps it awake
        assert proxy.rows()["web:alice"]["state"] == "running"
        ws.send("still here")
        assert ws.recv(timeout=5) == "still here"
        ws.send("close:4001")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001


@pytest.mark.parametrize(("how", "code"), [("stop", 1001), ("restart", 1012)])
def test_websockets_closed_cleanly_when_the_supervisor_stops_it(
    proxy: Proxy, how: str, code: int
) -> None:
    with proxy.websocket("bob.web.localhost") as ws:
        ws.send("hi")
        assert ws.recv(timeout=5) == "hi"
        result = proxy.manage(how, "web:bob", timeout=60)
        assert result.returncode == 0, result.stderr
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == code


def test_websocket_to_an_unknown_tenant_is_refused(proxy: Proxy) -> None:
    with pytest.raises(InvalidStatus) as refused:
        proxy.websocket("zed.web.localhost")
    assert refused.value.response.status_code == 403


# ---- leaks -----------------------------------------------------------------------------------


def test_no_fd_thread_or_child_growth_over_many_wake_and_stop_cycles(proxy: Proxy) -> None:
    def cycle() -> None:
        assert proxy.json("bob.web.localhost", "/whoami")["instance"] == "bob"
        proxy.stop("web:bob")

    cycle()  # warm up: pools, database connections, the channel layer
    info = proxy.proc_info
    before = (info.num_fds(), info.num_threads(), len(info.children(recursive=True)))
    for _ in range(10):
        cycle()
    after = (info.num_fds(), info.num_threads(), len(info.children(recursive=True)))
    assert after[0] <= before[0] + 2, f"fds {before[0]} -> {after[0]}"
    assert after[1] <= before[1] + 1, f"threads {before[1]} -> {after[1]}"
    assert after[2] <= before[2], f"children {before[2]} -> {after[2]}"


# ---- daphne -----------------------------------------------------------------------------------


def test_daphne_serves_the_same_application(short_tmp: Path) -> None:
    """Scaled mode's server: the proxy under daphne, the supervisor in its own process."""
    deployment = Deployment(short_tmp, CONFIG)
    try:
        deployment.start("--config", str(deployment.config))  # --no-http
        deployment.wait_states({"web:alice": "running"})
        port = free_port()
        env = {**deployment.env, "TENEMENT_DATA_DIR": str(deployment.data)}
        daphne = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "daphne"),
                "-b",
                "127.0.0.1",
                "-p",
                str(port),
                "tenement_site.asgi:application",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deployment.others.append(daphne)
        deployment.wait_for("daphne to listen", lambda: _listening(port), timeout=30)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/whoami", headers={"Host": "alice.web.localhost"})
        response = conn.getresponse()
        assert response.status == 200
        assert json.loads(response.read())["instance"] == "alice"
        conn.close()
        assert raw_request(port, b"a..b.localhost").startswith(b"HTTP/1.1 400")
        assert b" 404 " in raw_request(port, b"zed.web.localhost")[:20]
    finally:
        deployment.cleanup()


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False
