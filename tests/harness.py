"""A real deployment for end-to-end tests: a data dir and runsupervisor processes."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import REPO


class Deployment:
    """A data dir plus the runsupervisor processes started on it; cleans up everything."""

    def __init__(self, root: Path, config: str) -> None:
        self.root = root
        self.data = root / "data"
        self.config = root / "tenement.toml"
        self.config.write_text(config)
        # As an operator would: tenants under isolation = "process" could read it otherwise.
        self.config.chmod(0o600)
        # runsupervisor --metrics-bind: /metrics and /status without a token, out of reach
        # of tenants (over loopback they need a read token).
        self.metrics_socket = root / "metrics.sock"
        self.supervisors: list[subprocess.Popen[bytes]] = []
        self.others: list[subprocess.Popen[bytes]] = []
        self.app_pids: set[int] = set()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TENEMENT_")}

    def manage(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(REPO / "manage.py"), *args, "--data-dir", str(self.data)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            cwd=REPO,
        )

    def start(self, *args: str, http: bool = False) -> subprocess.Popen[bytes]:
        log = open(self.root / f"supervisor-{len(self.supervisors)}.log", "wb")
        proc = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "manage.py"),
                "runsupervisor",
                *([] if http else ["--no-http"]),
                "--data-dir",
                str(self.data),
                *(["--metrics-bind", f"unix:{self.metrics_socket}"] if http else []),
                *args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=REPO,
        )
        log.close()
        self.supervisors.append(proc)
        return proc

    def private_get(self, path: str) -> tuple[int, http.client.HTTPMessage, bytes]:
        """GET over the --metrics-bind Unix socket (no token needed there)."""
        return unix_http_get(str(self.metrics_socket), path)

    def connect(self) -> sqlite3.Connection:
        """The deployment's database, never created here (that is the supervisor's job,
        with its own file modes): a missing file is an OperationalError."""
        uri = f"file:{self.data / 'tenement.sqlite3'}?mode=rw"
        return sqlite3.connect(uri, uri=True, timeout=10)

    def rows(self) -> dict[str, dict[str, Any]]:
        with contextlib.closing(self.connect()) as db:
            db.row_factory = sqlite3.Row
            cur = db.execute(
                "SELECT s.name || ':' || i.instance_id AS key, i.* FROM instances_instance i "
                "JOIN instances_service s ON s.id = i.service_id"
            )
            return {r["key"]: dict(r) for r in cur}

    def query(self, statement: str, *params: Any) -> list[tuple[Any, ...]]:
        with contextlib.closing(self.connect()) as db:
            return list(db.execute(statement, params))

    def sql(self, statement: str, *params: Any) -> None:
        with contextlib.closing(self.connect()) as db:
            db.execute(statement, params)
            db.commit()

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float = 30) -> float:
        """Poll another process's state (no event crosses the process boundary)."""
        started = time.monotonic()
        while not check():
            if time.monotonic() - started > timeout:
                logs = "\n".join(p.read_text()[-3000:] for p in self.root.glob("supervisor-*.log"))
                raise AssertionError(f"timed out waiting for {what}\n{logs}")
            time.sleep(0.02)
        return time.monotonic() - started

    def wait_states(self, states: dict[str, str], timeout: float = 30) -> dict[str, dict[str, Any]]:
        def ok() -> bool:
            try:
                rows = self.rows()
            except sqlite3.OperationalError:
                return False  # not migrated yet
            return all(k in rows and rows[k]["state"] == s for k, s in states.items())

        self.wait_for(f"states {states}", ok, timeout)
        rows = self.rows()
        self.app_pids |= {r["pid"] for r in rows.values() if r["pid"]}
        return rows

    def cleanup(self) -> None:
        for proc in self.supervisors:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for proc in self.others:
            proc.kill()
            proc.wait()
        # Apps orphaned by a kill -9 are no longer our descendants: kill them by pid.
        for pid in self.app_pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


def http_request(
    port: int,
    host: str,
    path: str = "/",
    *,
    method: str = "GET",
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
    address: str = "127.0.0.1",
) -> tuple[http.client.HTTPResponse, bytes]:
    """One request to our server with this Host (the control host or a tenant's); the
    connection is closed, the body read."""
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Host": host, **(headers or {})})
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


def listening(port: int, address: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on the port (the server is up)."""
    try:
        socket.create_connection((address, port), timeout=1).close()
    except OSError:
        return False
    return True


def free_port() -> int:
    """A loopback TCP port free right now (the server we start binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


def unix_http_get(
    socket_path: str, path: str, timeout: float = 30
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One GET over a Unix socket; the connection is closed, the body read."""
    conn = _UnixConnection(socket_path, timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()
