"""Upstream's examples/multi-runtime, run as its test.sh runs it: its tenement.toml and
its Python, Node and Go apps taken unchanged from upstream's repository (v0.2.2), our
server in place of `ten serve`, upstream's `ten` 0.2.2 for token file, spawn and ps, and
every assertion of test.sh (health, per-tenant tokens, auth, notes isolation, runtime).

The apps know nothing of Unix sockets: they read $PORT, so this is also the TCP path
end to end. `go run` compiles on each start (startup_timeout = 30 in the example).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO
from tests.harness import Deployment, free_port, http_request, listening
from tests.test_dropin_config import upstream_file

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

FILES = ("tenement.toml", "py_app.py", "node_app.js", "go_app.go")
SERVICES = ("pyapi", "nodeapi", "goapi")
TENANTS = ("alice", "bob")
RUNTIME = {"pyapi": "python", "nodeapi": "node", "goapi": "go"}
BASE_ENV = {k: v for k, v in os.environ.items() if not k.startswith("TENEMENT_")}


class MultiRuntime(Deployment):
    def __init__(self, root: Path, ten_binary: Path) -> None:
        self.example = root / "multi-runtime"
        self.example.mkdir(mode=0o755)
        for name in FILES:
            path = self.example / name
            path.write_text(upstream_file(f"examples/multi-runtime/{name}"))
            path.chmod(0o600 if name == "tenement.toml" else 0o644)
        super().__init__(root, "")
        # Its [settings] data_dir = "./data": the same folder as the control plane's.
        self.data = self.example / "data"
        self.ten_binary = ten_binary
        self.port = free_port()
        self.start(
            "--config", str(self.example / "tenement.toml"), "--bind", f"127.0.0.1:{self.port}",
            http=True,
        )  # fmt: skip

    def upstream_ten(self, *args: str) -> str:
        result = subprocess.run(
            [str(self.ten_binary), *args, "--server", f"http://localhost:{self.port}"],
            capture_output=True,
            text=True,
            timeout=60,
            env=BASE_ENV,
            cwd=self.example,  # test.sh runs from the example's folder (its tenement.toml)
        )
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        return result.stdout

    def call(
        self, svc: str, tenant: str, path: str, token: str | None = None, **kw: Any
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if "body" in kw:
            headers["Content-Type"] = "application/json"
        response, body = http_request(
            self.port, f"{tenant}.{svc}.localhost:{self.port}", path, headers=headers, **kw
        )
        try:
            return response.status, json.loads(body)
        except ValueError:
            return response.status, body


@pytest.fixture(scope="module")
def world(upstream_ten: Path) -> Iterator[MultiRuntime]:
    if shutil.which("go") is None:
        pytest.fail("go is missing: scripts/system-deps.sh test installs golang-go")
    root = Path(tempfile.mkdtemp(prefix="tm", dir="/tmp"))
    root.chmod(0o711)
    server = MultiRuntime(root, upstream_ten)
    try:
        server.wait_for("the HTTP listener", lambda: listening(server.port), 60)
        # test.sh: `ten token-gen` (ours: tokens live in our database), then `ten spawn`.
        result = subprocess.run(
            [sys.executable, "-m", "instances.cli", "--data-dir", str(server.data), "token-gen"],
            capture_output=True,
            text=True,
            timeout=60,
            env=BASE_ENV,
            cwd=REPO,
        )
        assert result.returncode == 0, result.stderr
        for svc in SERVICES:
            for tenant in TENANTS:
                assert f"Spawned {svc}:{tenant}" in server.upstream_ten("spawn", f"{svc}:{tenant}")
        server.wait_states({f"{s}:{t}": "running" for s in SERVICES for t in TENANTS}, timeout=120)
        yield server
    finally:
        server.app_pids |= {r["pid"] for r in server.rows().values() if r["pid"]}
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def test_ps_lists_all_six(world: MultiRuntime) -> None:
    out = world.upstream_ten("ps")
    for svc in SERVICES:
        for tenant in TENANTS:
            assert f"{svc}:{tenant}" in out
    assert "6 instance(s) running" in out


def test_1_health_without_auth(world: MultiRuntime) -> None:
    for svc in SERVICES:
        for tenant in TENANTS:
            status, body = world.call(svc, tenant, "/health")
            assert status == 200 and body["status"] == "ok", (svc, tenant, body)
            assert body["tenant"] == tenant


def tokens(world: MultiRuntime) -> dict[tuple[str, str], str]:
    out = {}
    for svc in SERVICES:
        for tenant in TENANTS:
            status, body = world.call(svc, tenant, "/token")
            assert status == 200, body
            out[(svc, tenant)] = body["token"]
    return out


def test_2_each_instance_has_its_own_token(world: MultiRuntime) -> None:
    found = tokens(world)
    assert all(any(c in "0123456789abcdef" for c in t) for t in found.values())
    for svc in SERVICES:
        assert found[(svc, "alice")] != found[(svc, "bob")]


def test_3_auth_enforcement(world: MultiRuntime) -> None:
    found = tokens(world)
    for svc in SERVICES:
        alice = found[(svc, "alice")]
        assert world.call(svc, "alice", "/notes")[0] == 401
        assert world.call(svc, "alice", "/notes", "wrong")[0] == 403
        assert world.call(svc, "alice", "/notes", alice)[0] == 200
        assert world.call(svc, "bob", "/notes", alice)[0] == 403


def test_4_notes_stay_with_their_tenant_and_5_services(world: MultiRuntime) -> None:
    found = tokens(world)
    for svc in SERVICES:
        for tenant in TENANTS:
            note = json.dumps({"text": f"Hello from {tenant} via {svc}"})
            status, body = world.call(
                svc, tenant, "/notes", found[(svc, tenant)], method="POST", body=note
            )
            assert tenant in json.dumps(body), (svc, tenant, status, body)
    for svc in SERVICES:
        for tenant in TENANTS:
            _, body = world.call(svc, tenant, "/notes", found[(svc, tenant)])
            notes = body["notes"]
            assert len(notes) == 1 and tenant in notes[0]["text"]
    # 5: a token of one service is refused by another, for the same tenant.
    assert world.call("nodeapi", "alice", "/notes", found[("pyapi", "alice")])[0] == 403
    assert world.call("goapi", "alice", "/notes", found[("nodeapi", "alice")])[0] == 403


def test_6_runtime_identification(world: MultiRuntime) -> None:
    for svc in SERVICES:
        _, body = world.call(svc, "alice", "/health")
        assert body["runtime"] == RUNTIME[svc]
