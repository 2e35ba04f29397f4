"""examples/multi-runtime: the notes app in Python and Node, alone and behind the proxy.

`test_direct_*` start each app on its own Unix socket (no supervisor), so the apps are
covered on their own. `test_through_proxy_*` runs the example's tenement.toml under a real
`manage.py runsupervisor` and talks HTTP to its port with tenant Host headers.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, TENANT_PYTHON
from tests.harness import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

EXAMPLE = REPO / "examples" / "multi-runtime"
SERVICES = {"python": "notes-py", "node": "notes-js"}
TENANTS = ("alice", "bob")
MAX_BODY = 64 * 1024


def node() -> str:
    path = shutil.which("node")
    if path is None:
        pytest.fail("node is not on PATH; scripts/system-deps.sh installs it (Node 18+ needed)")
    return path


def argv(runtime: str) -> list[str]:
    if runtime == "python":
        return [TENANT_PYTHON, str(EXAMPLE / "notes.py")]
    return [node(), str(EXAMPLE / "notes.js")]


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lowercased names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over AF_UNIX; counts connects so tests can check keep-alive."""

    def __init__(self, socket_path: Path, timeout: float = 5) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path
        self.connects = 0

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self.socket_path))
        self.sock = sock
        self.connects += 1


def call(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    *,
    token: str | None = None,
    body: bytes | dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    conn.request(method, path, body=data, headers=sent)
    resp = conn.getresponse()
    reply = Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    # Keep-alive friendly: the length is always declared, never read-until-close.
    assert "content-length" in reply.headers, (method, path, reply)
    return reply


class App:
    """One notes app process for one tenant, on a socket under `root`."""

    def __init__(self, runtime: str, tenant: str, root: Path) -> None:
        self.runtime = runtime
        self.tenant = tenant
        self.service = SERVICES[runtime]
        self.data_dir = root / f"{self.service}-{tenant}"
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        self.socket_path = root / f"{self.service}-{tenant}.sock"
        self.log_path = root / f"{self.service}-{tenant}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {
            "PATH": os.environ.get("PATH", os.defpath),
            "SOCKET_PATH": str(self.socket_path),
            "DATA_DIR": str(self.data_dir),
            "INSTANCE_ID": self.tenant,
            "SERVICE_NAME": self.service,
        }
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv(self.runtime), env=env, cwd=self.data_dir, stdout=log, stderr=log
            )
        wait_until(f"{self} listening", self._accepts, timeout=15)

    def _accepts(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"{self} exited {self.proc.returncode}: {self.log()}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(str(self.socket_path))
            except OSError:
                return False
        return True

    def connect(self) -> UnixHTTPConnection:
        return UnixHTTPConnection(self.socket_path)

    def token(self) -> str:
        return (self.data_dir / "api_token").read_text().strip()

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        """SIGTERM; the app must exit promptly by itself."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=5)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def __str__(self) -> str:
        return f"{self.service}:{self.tenant}"


@contextlib.contextmanager
def running(root: Path, *specs: tuple[str, str]) -> Iterator[list[App]]:
    apps = [App(runtime, tenant, root) for runtime, tenant in specs]
    try:
        for app in apps:
            app.start()
        yield apps
    finally:
        for app in apps:
            app.kill()


def wait_until(what: str, check: Callable[[], bool], timeout: float) -> None:
    """Poll another process's state with a deadline (nothing to await across processes)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


RUNTIMES = pytest.mark.parametrize("runtime", ["python", "node"])


@RUNTIMES
def test_direct_health_auth_and_notes(short_tmp: Path, runtime: str) -> None:
    with running(short_tmp, (runtime, "alice")) as [app]:
        token = app.token()
        assert len(token) == 64 and set(token) <= set("0123456789abcdef")
        assert (app.data_dir / "api_token").stat().st_mode & 0o777 == 0o600
        conn = app.connect()
        try:
            health = call(conn, "GET", "/health")
            assert health.status == 200
            assert health.json() == {
                "status": "ok",
                "tenant": "alice",
                "runtime": runtime,
                "service": app.service,
            }
            check_auth_is_required(conn, token)
            check_notes_round_trip(conn, token)
            check_bad_bodies(conn, token)
            assert conn.connects == 1, "every answer so far should keep the connection"

            too_big = call(conn, "POST", "/notes", token=token, body=b"x" * (MAX_BODY + 1))
            assert too_big.status == 413 and "error" in too_big.json()
            assert too_big.headers.get("connection", "").lower() == "close"
        finally:
            conn.close()

        stored = json.loads((app.data_dir / "notes.json").read_text())
        assert [n["text"] for n in stored] == ["first note", "zweite Notiz ü"]
        assert (app.data_dir / "notes.json").stat().st_mode & 0o077 == 0
        assert app.stop() == 0
        assert not app.socket_path.exists()
        log = app.log()
        for line in ("GET /health 200", "GET /notes 401", "GET /notes 403", "POST /notes 201"):
            assert line in log.splitlines(), f"{line!r} not logged:\n{log}"
        assert token not in log


def check_auth_is_required(conn: http.client.HTTPConnection, token: str) -> None:
    for header in (None, "Basic YWxpY2U6eA==", "Bearer", f"Bearer {token} extra", token):
        reply = call(conn, "GET", "/notes", headers={"Authorization": header} if header else {})
        assert reply.status == 401, header
        assert reply.headers["www-authenticate"].startswith("Bearer")
        assert "error" in reply.json()
    for wrong in ("nope", token[:-1], token.upper() + "0"):
        reply = call(conn, "GET", "/notes", token=wrong)
        assert reply.status == 403 and "error" in reply.json(), wrong
    # A refused POST's body must not be mistaken for the next request on this connection.
    refused = call(conn, "POST", "/notes", token="nope", body={"text": "sneaky"})
    assert refused.status == 403
    assert call(conn, "GET", "/nope", token=token).status == 404
    assert call(conn, "GET", "/nope").status == 401  # no anonymous probing of paths
    assert call(conn, "DELETE", "/notes", token=token).status == 405


def check_notes_round_trip(conn: http.client.HTTPConnection, token: str) -> None:
    assert call(conn, "GET", "/notes", token=token).json() == {"tenant": "alice", "notes": []}
    first = call(conn, "POST", "/notes", token=token, body={"text": "first note"})
    assert first.status == 201
    assert first.json()["id"] == 1 and first.json()["text"] == "first note"
    second = call(conn, "POST", "/notes?x=1", token=token, body={"text": "zweite Notiz ü"})
    assert second.status == 201 and second.json()["id"] == 2
    listed = call(conn, "GET", "/notes", token=token)
    assert listed.status == 200
    assert listed.json() == {"tenant": "alice", "notes": [first.json(), second.json()]}


def check_bad_bodies(conn: http.client.HTTPConnection, token: str) -> None:
    bad = [b"", b"{", b"not json", b"[1]", b'{"text": 5}', b'{"text": ""}', b'{"text":"\xff"}']
    bad.append(b"[" * 20000 + b"]" * 20000)  # deep nesting must not crash the parser
    for body in bad:
        reply = call(conn, "POST", "/notes", token=token, body=body)
        assert reply.status == 400, body[:40]
        assert "error" in reply.json()
        assert b"Traceback" not in reply.body


@RUNTIMES
def test_direct_restart_keeps_token_and_notes(short_tmp: Path, runtime: str) -> None:
    with running(short_tmp, (runtime, "alice")) as [app]:
        token = app.token()
        conn = app.connect()
        try:
            assert call(conn, "POST", "/notes", token=token, body={"text": "kept"}).status == 201
        finally:
            conn.close()
        assert app.stop() == 0
    # A stale socket file (as after a crash) must not stop the next start.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(app.socket_path))
    with running(short_tmp, (runtime, "alice")) as [again]:
        assert again.token() == token
        conn = again.connect()
        try:
            notes = call(conn, "GET", "/notes", token=token).json()["notes"]
        finally:
            conn.close()
        assert [n["text"] for n in notes] == ["kept"]


@RUNTIMES
def test_direct_concurrent_posts_get_distinct_ids(short_tmp: Path, runtime: str) -> None:
    with running(short_tmp, (runtime, "alice")) as [app]:
        token = app.token()
        statuses: list[int] = []

        def post(i: int) -> None:
            conn = app.connect()
            try:
                statuses.append(
                    call(conn, "POST", "/notes", token=token, body={"text": f"{i}"}).status
                )
            finally:
                conn.close()

        threads = [threading.Thread(target=post, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert statuses == [201] * 20
        stored = json.loads((app.data_dir / "notes.json").read_text())
        assert sorted(n["id"] for n in stored) == list(range(1, 21))
        assert sorted(int(n["text"]) for n in stored) == list(range(20))


def test_direct_tokens_are_per_tenant_and_per_runtime(short_tmp: Path) -> None:
    specs = list(itertools.product(SERVICES, TENANTS))
    with running(short_tmp, *specs) as apps:
        tokens = {str(app): app.token() for app in apps}
        assert len(set(tokens.values())) == 4
        conns = {str(app): app.connect() for app in apps}
        try:
            for owner, target in itertools.product(apps, apps):
                reply = call(conns[str(target)], "GET", "/notes", token=tokens[str(owner)])
                expected = 200 if owner is target else 403
                assert reply.status == expected, f"{owner}'s token on {target}"
            alice_py = conns["notes-py:alice"]
            note = {"text": "alice's secret"}
            assert (
                call(alice_py, "POST", "/notes", token=tokens["notes-py:alice"], body=note).status
                == 201
            )
            for app in apps:
                notes = call(conns[str(app)], "GET", "/notes", token=tokens[str(app)]).json()
                seen = [n["text"] for n in notes["notes"]]
                assert seen == (["alice's secret"] if str(app) == "notes-py:alice" else []), app
        finally:
            for conn in conns.values():
                conn.close()


class Supervisor:
    """A real `manage.py runsupervisor` serving the example config on a free port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.log_path = root / "supervisor.log"
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TENEMENT_")}
        self.proc: subprocess.Popen[bytes] | None = None
        self.app_pids: set[int] = set()

    def start(self) -> None:
        config = EXAMPLE / "tenement.toml"
        bind = f"127.0.0.1:{self.port}"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*self.manage_argv("runsupervisor"), "--config", str(config), "--bind", bind],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=REPO,
            )

    def manage_argv(self, *args: str) -> list[str]:
        return [sys.executable, str(REPO / "manage.py"), *args, "--data-dir", str(self.data)]

    def states(self) -> dict[str, str]:
        out = subprocess.run(
            self.manage_argv("ps", "--json"),
            capture_output=True,
            text=True,
            timeout=30,
            env=self.env,
            cwd=REPO,
        )
        rows = json.loads(out.stdout) if out.returncode == 0 and out.stdout.strip() else []
        self.app_pids |= {r["pid"] for r in rows if r["pid"]}
        return {r["instance"]: r["state"] for r in rows}

    def accepts_http(self) -> bool:
        self.check_alive()
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"runsupervisor exited {self.proc.returncode}:\n{self.log()}")

    def token(self, service: str, tenant: str) -> str:
        return (self.data / service / tenant / "api_token").read_text().strip()

    def log(self) -> str:
        return self.log_path.read_text()[-4000:] if self.log_path.exists() else ""

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        # Apps of a supervisor that had to be killed are orphans now: kill them by group.
        for pid in self.app_pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


@pytest.fixture
def supervisor(short_tmp: Path) -> Iterator[Supervisor]:
    node()  # fail clearly up front rather than as an instance that never starts
    sup = Supervisor(short_tmp)
    try:
        sup.start()
        yield sup
    finally:
        sup.cleanup()


ALL_INSTANCES = {f"{s}:{t}" for s in SERVICES.values() for t in TENANTS}


def test_through_proxy_each_tenant_has_its_own_notes_and_token(supervisor: Supervisor) -> None:
    def all_running() -> bool:
        supervisor.check_alive()
        return supervisor.states() == dict.fromkeys(ALL_INSTANCES, "running")

    wait_until("all four instances running", all_running, timeout=60)
    wait_until("the proxy port", supervisor.accepts_http, timeout=30)
    tokens = {key: supervisor.token(*key.split(":")) for key in ALL_INSTANCES}
    conn = http.client.HTTPConnection("127.0.0.1", supervisor.port, timeout=15)

    def ask(key: str, method: str, path: str, **kwargs: Any) -> Reply:
        service, tenant = key.split(":")
        headers = {"Host": f"{tenant}.{service}.localhost"}
        reply = call(conn, method, path, headers=headers, **kwargs)
        # Context for a failure while the proxy is young: what answered, and the logs.
        assert reply.status < 500, f"{key} {method} {path}: {reply}\n{supervisor.log()}"
        return reply

    try:
        for key in sorted(ALL_INSTANCES):
            service, tenant = key.split(":")
            runtime = next(r for r, s in SERVICES.items() if s == service)
            health = ask(key, "GET", "/health")
            assert health.status == 200, f"{key}: {health}"
            assert health.json() == {
                "status": "ok",
                "tenant": tenant,
                "runtime": runtime,
                "service": service,
            }

        unauthenticated = ask("notes-py:alice", "GET", "/notes")
        assert unauthenticated.status == 401
        assert unauthenticated.headers["www-authenticate"].startswith("Bearer")
        assert ask("notes-py:alice", "GET", "/notes", token="wrong").status == 403
        alice_py = tokens["notes-py:alice"]
        assert ask("notes-py:bob", "GET", "/notes", token=alice_py).status == 403
        assert ask("notes-js:alice", "GET", "/notes", token=alice_py).status == 403

        note = {"text": "alice only"}
        created = ask("notes-py:alice", "POST", "/notes", token=alice_py, body=note)
        assert created.status == 201 and created.json()["text"] == "alice only"
        mine = ask("notes-py:alice", "GET", "/notes", token=alice_py).json()
        assert mine == {"tenant": "alice", "notes": [created.json()]}
        bobs = ask("notes-py:bob", "GET", "/notes", token=tokens["notes-py:bob"]).json()
        assert bobs == {"tenant": "bob", "notes": []}
        alice_js = ask("notes-js:alice", "GET", "/notes", token=tokens["notes-js:alice"]).json()
        assert alice_js == {"tenant": "alice", "notes": []}
    finally:
        conn.close()

    assert supervisor.stop() == 0
    assert supervisor.states() == dict.fromkeys(ALL_INSTANCES, "stopped")
