"""One real runsupervisor per test module, serving two tenants with lowered edge limits.

Module-scoped: the attacks here must not disturb the tenants, so the same two processes
serve every test of a module (a restart would also trip the leftover-process check).
"""

from __future__ import annotations

import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, TENANT_UVICORN
from tests.harness import Deployment, free_port

APP = f"{TENANT_UVICORN} --app-dir {REPO} tests.apps.proxyapp:app --uds {{socket}}"
# The service name is the test module's own: instance cgroups are named {service}-{id}, and
# two deployments alive at once (or another suite's) must not share them.
CONFIG = """
[settings]
health_check_interval = 2

[service.{service}]
command = "{app} --log-level warning"
health = "/health"

[instances]
{service} = ["alice", "bob"]
"""
# Lowered so the tests take seconds: what is enforced is the same at any value.
EDGE_ENV = {
    "TENEMENT_HEADER_TIMEOUT": "1",
    "TENEMENT_BODY_TIMEOUT": "1",
    "TENEMENT_KEEPALIVE_TIMEOUT": "1",
    "TENEMENT_MAX_CONNECTIONS_PER_ADDRESS": "40",
}


class Edge(Deployment):
    """A deployment serving HTTP on a free loopback port, optionally with a low fd limit."""

    def __init__(
        self, root: Path, env: dict[str, str], nofile: int | None = None, service: str = "edge"
    ) -> None:
        super().__init__(root, CONFIG.format(service=service, app=APP))
        self.service = service
        self.port = free_port()
        self.env.update(env)
        self.nofile = nofile
        self.proc = self.start("--config", str(self.config), "--bind", f"127.0.0.1:{self.port}")

    def start(self, *args: str, http: bool = True) -> subprocess.Popen[bytes]:
        log = open(self.root / f"supervisor-{len(self.supervisors)}.log", "wb")
        cmd = [sys.executable, str(REPO / "manage.py"), "runsupervisor", "--data-dir"]
        proc = subprocess.Popen(
            [*cmd, str(self.data), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=REPO,
            preexec_fn=self.limit_fds if self.nofile else None,
        )
        log.close()
        self.supervisors.append(proc)
        return proc

    def limit_fds(self) -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def dial(self, timeout: float = 10) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def exchange(self, raw: bytes, timeout: float = 10) -> bytes:
        """Send raw bytes on a new connection; everything received until it closes."""
        with self.dial(timeout) as s:
            s.sendall(raw)
            return read_all(s)

    def get_ms(self, host: str = "", path: str = "/whoami") -> float:
        """One keep-alive-free GET (bob's, by default); milliseconds (asserting a 200)."""
        host = host or f"bob.{self.service}.localhost"
        began = time.perf_counter()
        response = self.exchange(
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        )
        assert response.startswith(b"HTTP/1.1 200"), response[:200]
        return (time.perf_counter() - began) * 1000

    def log_text(self) -> str:
        return "\n".join(p.read_text() for p in self.root.glob("supervisor-*.log"))


def read_all(s: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response[9:12])


def p50(sample: Callable[[], float], n: int = 20) -> float:
    return statistics.median(sample() for _ in range(n))


def edge_deployment(
    env: dict[str, str] | None = None, nofile: int | None = None, service: str = "edge"
) -> Any:
    """A module fixture: an Edge with both tenants running."""

    @pytest.fixture(scope="module")
    def fixture() -> Iterator[Edge]:
        root = Path(tempfile.mkdtemp(prefix="te", dir="/tmp"))
        root.chmod(0o711)  # tenants run as their own uids and must pass through
        edge = Edge(root, {**EDGE_ENV, **(env or {})}, nofile, service)
        try:
            keys = {f"{service}:alice": "running", f"{service}:bob": "running"}
            edge.wait_states(keys, timeout=60)
            yield edge
        finally:
            edge.cleanup()
            shutil.rmtree(root, ignore_errors=True)

    return fixture


edge = edge_deployment()
