"""TCP apps (upstream's contract): every instance gets a loopback $PORT; apps that listen
only there work through the proxy (HTTP, streaming, WebSocket, wake), in Python and Node."""

from __future__ import annotations

import json
import shutil
import socket
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.sync.client import connect as ws_connect

from tests.conftest import REPO, TENANT_PYTHON, TENANT_UVICORN
from tests.harness import Deployment, free_port, http_request

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

# The venv's packages (uvicorn) and the checkout (port_app imports tests.apps.proxyapp):
# named here, both stay visible inside the sandbox when the checkout is under /tmp.
PYTHONPATH = f"{sysconfig.get_paths()['purelib']}:{REPO}"
NODE = shutil.which("node") or "/usr/bin/node"
CONFIG = f"""
[settings]
health_check_interval = 1
port_range = "31000-31999"

# Reads $PORT itself; never opens $SOCKET_PATH.
[service.pyport]
command = "/usr/bin/env PYTHONPATH={PYTHONPATH} {TENANT_PYTHON} {REPO}/tests/apps/port_app.py"
health = "/health"
idle_timeout = 30
stop_timeout = 2

[service.nodeport]
command = "{NODE} {REPO}/tests/apps/port_app.js"
health = "/health"
env = {{ NODE_PATH = "/usr/share/nodejs" }}
stop_timeout = 2

# {{port}} in the command, and listen = "tcp" says where readiness and the proxy go.
[service.tcp]
command = "{TENANT_UVICORN} --app-dir {REPO} tests.apps.proxyapp:app --port {{port}}"
health = "/health"
listen = "tcp"
stop_timeout = 2

[instances]
pyport = ["alice"]
nodeport = ["alice"]
"""


class Server(Deployment):
    def __init__(self, root: Path) -> None:
        super().__init__(root, CONFIG)
        self.port = free_port()
        self.start("--config", str(self.config), "--bind", f"127.0.0.1:{self.port}", http=True)

    def get(self, host: str, path: str = "/") -> tuple[int, bytes]:
        response, body = http_request(self.port, host, path)
        return response.status, body


@pytest.fixture
def server(short_tmp: Path) -> Iterator[Server]:
    s = Server(short_tmp)
    try:
        s.wait_states({"pyport:alice": "running", "nodeport:alice": "running"}, timeout=60)
        yield s
    finally:
        s.cleanup()


@pytest.mark.parametrize("service", ["pyport", "nodeport"])
def test_a_port_only_app_serves_http_streaming_and_websockets(server: Server, service: str) -> None:
    host = f"alice.{service}.localhost"
    status, body = server.get(host, "/whoami")
    assert status == 200, body
    me = json.loads(body)
    assert me["instance"] == "alice" and 31000 <= int(me["port"]) <= 31999
    # The proxy and the health checks go to the port the app opened.
    assert server.rows()[f"{service}:alice"]["socket_path"] == f"tcp:127.0.0.1:{me['port']}"
    assert server.rows()[f"{service}:alice"]["port"] == int(me["port"])

    # Streaming: the chunks arrive one by one, not buffered into one answer.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        path = "/sse" if service == "pyport" else "/stream"
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        want = b"data: 2" if service == "pyport" else b"chunk 2"
        while want not in data:
            chunk = s.recv(4096)
            assert chunk, data
            data += chunk
        assert data.startswith(b"HTTP/1.1 200")

    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    with ws_connect(f"ws://{host}/ws", sock=sock, open_timeout=15) as ws:
        ws.send("hello over tcp")
        assert ws.recv(timeout=10) == "hello over tcp"
        ws.send(b"\x00\x01binary")
        assert ws.recv(timeout=10) == b"\x00\x01binary"


def test_port_interpolates_and_a_tcp_app_wakes_on_request(server: Server) -> None:
    # tcp:bob is registered by its first request (as any tenant: through the API) ...
    result = server.manage("spawn", "tcp:bob", "--no-wait")
    assert result.returncode == 0, result.stderr
    server.wait_states({"tcp:bob": "running"})
    result = server.manage("stop", "tcp:bob")
    assert result.returncode == 0, result.stderr
    server.wait_states({"tcp:bob": "stopped"})
    assert server.rows()["tcp:bob"]["port"] is None
    # ... and a request to the stopped tenant wakes it on a (new) port.
    response, body = http_request(server.port, "bob.tcp.localhost", "/whoami")
    assert response.status == 200, body
    assert response.getheader("X-Tenement-Wake") is not None
    me = json.loads(body)
    # The database mirrors the supervisor behind its back (write-behind): wait for it.
    server.wait_for(
        "the row's upstream",
        lambda: server.rows()["tcp:bob"]["socket_path"] == f"tcp:127.0.0.1:{me['port']}",
    )


def test_two_tenants_get_different_ports(server: Server) -> None:
    result = server.manage("spawn", "pyport:bob")
    assert result.returncode == 0, result.stderr
    ports = {
        json.loads(server.get(f"{t}.pyport.localhost", "/whoami")[1])["port"]
        for t in ("alice", "bob")
    }
    assert len(ports) == 2
