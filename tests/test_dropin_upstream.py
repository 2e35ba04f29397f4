"""Upstream's own `ten` 0.2.2 binary against our server, on upstream's e2e scenarios.

scripts/e2e.sh of upstream tenement v0.2.2 writes its apps and its tenement.toml with
heredocs; we take them from the script at test time, unchanged (only ${DATA_DIR} is
filled in, as the shell does), and run its scenarios as tests with upstream's `ten`:
spawn, stop, restart, ps, health, logs (and -f's endpoint), config, init, token file,
and weighted routing, `weight`, `deploy`, `route` (weighted-multi, weighted-reselect,
deploy-route).

Not ported here, and why:
- fastapi-example: needs `uv` and network access to PyPI;
- upstream's `ten token-gen` writes upstream's own database, which our server does not
  read: tokens are minted with our `ten token-gen` (same verb, same {data_dir}/api_token
  file, which upstream's `ten` then reads).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.harness import Deployment, free_port, http_request, listening
from tests.test_dropin_config import upstream_file

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

HEREDOC = re.compile(r'cat > "\$\{SERVE_DIR\}/([\w.]+)" <<(\'?)(\w+)\2\n(.*?)\n\3\n', re.S)
BASE_ENV = {k: v for k, v in os.environ.items() if not k.startswith("TENEMENT_")}


def e2e_files(data_dir: Path) -> dict[str, str]:
    """The files upstream's e2e.sh writes into its SERVE_DIR, as the shell would."""
    script = upstream_file("scripts/e2e.sh")
    files = {}
    for name, quoted, _end, body in HEREDOC.findall(script):
        # An unquoted heredoc expands variables; the config uses only ${DATA_DIR}.
        files[name] = body if quoted else body.replace("${DATA_DIR}", str(data_dir))
    assert set(files) >= {"simple.sh", "identify.sh", "tenement.toml"}, sorted(files)
    assert 'echo "e2e-ok" > "${SERVE_DIR}/index.html"' in script
    files["index.html"] = "e2e-ok\n"
    return files


class Upstream(Deployment):
    """Our runsupervisor on upstream's e2e config; upstream's `ten` as the client."""

    def __init__(self, root: Path, ten_binary: Path) -> None:
        self.serve = root / "serve"
        self.serve.mkdir()
        self.serve.chmod(0o755)  # the apps (tenant uids) serve files from it
        self.ten_binary = ten_binary
        super().__init__(root, "")
        for name, text in e2e_files(self.data).items():
            path = self.serve / name
            path.write_text(text + ("\n" if not text.endswith("\n") else ""))
            path.chmod(0o755 if name.endswith(".sh") else 0o644)
        (self.serve / "tenement.toml").chmod(0o600)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env["TENEMENT_REGISTER_ON_REQUEST"] = "1"  # upstream wakes any id
        self.start(
            "--config", str(self.serve / "tenement.toml"), "--bind", f"127.0.0.1:{self.port}",
            http=True,
        )  # fmt: skip

    def ten(self, *args: str, cwd: Path | None = None, timeout: float = 60) -> str:
        """Upstream's `ten`, as e2e.sh runs it: --data-dir, the token from its file."""
        result = subprocess.run(
            [str(self.ten_binary), "--data-dir", str(self.data), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**BASE_ENV, "TENEMENT_SERVER": self.url},
            cwd=cwd or self.serve,
        )
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        return result.stdout

    def ours(self, *args: str) -> str:
        """Our `ten` (for token-gen: tokens live in our database)."""
        result = subprocess.run(
            [sys.executable, "-m", "instances.cli", "--data-dir", str(self.data), *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={**BASE_ENV, "TENEMENT_SERVER": self.url},
            cwd=REPO,
        )
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        return result.stdout

    def until(self, what: str, check: Callable[[], bool], timeout: float = 30) -> None:
        self.wait_for(what, check, timeout)

    def in_ps(self, key: str) -> bool:
        return key in self.ten("ps")

    def get(self, host: str, path: str = "/", **kwargs: object) -> tuple[int, str]:
        try:
            response, body = http_request(self.port, f"{host}.localhost", path, **kwargs)  # type: ignore[arg-type]
        except (OSError, http.client.HTTPException):
            return 0, ""
        return response.status, body.decode(errors="replace")

    def serving(self, host: str) -> bool:
        return self.get(host)[0] == 200

    def api(self, path: str, token: str | None) -> tuple[int, str]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response, body = http_request(self.port, "localhost", path, headers=headers)
        return response.status, body.decode()

    def spawned(self, key: str) -> None:
        self.ten("spawn", key)
        self.until(f"{key} in ps", lambda: self.in_ps(key), 15)

    def stopped(self, key: str) -> None:
        self.ten("stop", key)
        self.until(f"{key} not in ps", lambda: not self.in_ps(key), 15)

    def cleanup(self) -> None:
        self.app_pids |= {r["pid"] for r in self.rows().values() if r["pid"]}
        super().cleanup()


@pytest.fixture(scope="module")
def up(upstream_ten: Path) -> Iterator[Upstream]:
    # Not pytest's tmp_path: its 0700 parents would keep tenant uids out of the config's
    # folder, which is the apps' working directory.
    root = Path(tempfile.mkdtemp(prefix="tu", dir="/tmp"))
    root.chmod(0o711)
    server = Upstream(root, upstream_ten)
    try:
        server.until("the HTTP listener", lambda: listening(server.port), 60)
        server.until("/health", lambda: server.api("/health", None)[0] == 200, 30)
        # e2e.sh's bootstrap: `ten token-gen`, then the token is read from its file.
        out = server.ours("token-gen")
        assert (server.data / "api_token").stat().st_mode & 0o777 == 0o600
        assert "Token saved to" in out
        yield server
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def test_basic_spawn_proxy_stop(up: Upstream) -> None:
    up.spawned("basic:one")
    up.until("proxy 200", lambda: up.serving("one.basic"))
    status, body = up.get("one.basic", "/index.html")
    assert status == 200 and "e2e-ok" in body
    out = up.ten("ps")
    row = next(line for line in out.splitlines() if line.startswith("basic:one"))
    assert "healthy" in row and "?" not in row  # every column parsed (was rows of '?')
    up.stopped("basic:one")
    # Upstream's stop is a stop: the tenant stays registered and wakes on a request.
    assert up.rows()["basic:one"]["state"] == "stopped"
    assert up.serving("one.basic")
    up.stopped("basic:one")


def test_wake_on_request(up: Upstream) -> None:
    assert "wake:" not in up.ten("ps")
    up.until("wake proxy 200", lambda: up.serving("cold.wake"))
    up.until("wake:cold in ps", lambda: up.in_ps("wake:cold"), 15)
    up.stopped("wake:cold")


def test_restart_on_crash(up: Upstream) -> None:
    up.spawned("crash:one")
    up.until("crash:one serving", lambda: up.serving("one.crash"))
    pid_before = int(re.search(r"pid=(\d+)", up.get("one.crash")[1])[1])  # type: ignore[index]
    up.app_pids.add(pid_before)
    os.kill(pid_before, signal.SIGKILL)
    # One request right after the kill: the proxy waits for the restart, never a 502.
    status, body = up.get("one.crash", timeout=30)
    assert status == 200, body
    pid_after = int(re.search(r"pid=(\d+)", body)[1])  # type: ignore[index]
    assert pid_after != pid_before
    up.app_pids.add(pid_after)
    up.stopped("crash:one")


def test_logs(up: Upstream) -> None:
    up.spawned("logs:one")
    up.until("the start line logged", lambda: "started id=one" in up.ten("logs", "logs:one"))
    out = up.ten("logs", "logs:one", "--limit", "50")
    assert re.search(r"^\d\d:\d\d:\d\d \[OUT\] logs:one started id=one", out, re.M), out
    assert "started" in up.ten("logs", "logs:one", "--search", "started", "--limit", "50")
    # The filters apply: another tenant's lines never show (they were ignored before).
    up.spawned("logs:two")
    up.until("two's start line", lambda: "started id=two" in up.ten("logs", "logs:two"))
    assert "id=two" not in up.ten("logs", "logs:one", "--limit", "50")
    assert "started" not in up.ten("logs", "logs:one", "--level", "stderr")
    up.stopped("logs:one")
    up.stopped("logs:two")


def test_cli_surface(up: Upstream, tmp_path: Path) -> None:
    assert "basic" in up.ten("config")
    up.spawned("basic:cli")
    up.until("cli serving", lambda: up.serving("cli.basic"))
    assert re.search("healthy|ok|up", up.ten("health", "basic:cli"))
    pid = up.rows()["basic:cli"]["pid"]
    assert "Restarted basic:cli" in up.ten("restart", "basic:cli")
    up.until(
        "post-restart 200", lambda: up.serving("cli.basic") and up.rows()["basic:cli"]["pid"] != pid
    )
    up.stopped("basic:cli")

    up.spawned("weighted:post")
    up.until("post backend up", lambda: up.serving("post.weighted"))
    status, body = up.get("post.weighted", "/", method="POST", body=b"hello")
    assert status == 200 and "echo id=post body=hello" in body
    up.stopped("weighted:post")

    init_dir = tmp_path / "init-test"
    init_dir.mkdir()
    up.ten("init", "--name", "demo", "--command", "./run.sh", cwd=init_dir)
    assert "service.demo" in (init_dir / "tenement.toml").read_text()


def test_idle_timeout_then_wake(up: Upstream) -> None:
    up.spawned("idle:one")
    up.until("idle backend serving", lambda: up.serving("one.idle"))
    up.until("the idle reaper stopped it", lambda: not up.in_ps("idle:one"), 20)
    up.until("post-idle wake 200", lambda: up.serving("one.idle"))
    up.until("idle:one in ps", lambda: up.in_ps("idle:one"), 15)
    up.stopped("idle:one")


def test_tenant_tokens(up: Upstream) -> None:
    up.spawned("tenant:alice")
    up.spawned("tenant:bob")
    out = up.ours("token-gen", "--tenant", "alice")
    alice = re.search(r"^  (\S+)", out, re.M)[1]  # type: ignore[index]
    admin_list = up.ten("ps")
    assert "tenant:alice" in admin_list and "tenant:bob" in admin_list
    status, body = up.api("/api/instances", alice)
    assert status == 200 and "tenant:alice" in body and "tenant:bob" not in body
    response, _ = http_request(
        up.port,
        "localhost",
        "/api/deploy",
        method="POST",
        body=json.dumps({"process": "tenant", "id": "alice", "weight": 100}),
        headers={"Authorization": f"Bearer {alice}", "Content-Type": "application/json"},
    )
    assert 400 <= response.status < 500
    up.stopped("tenant:alice")
    up.stopped("tenant:bob")


def test_unhealthy_detection(up: Upstream) -> None:
    up.spawned("bad:one")
    up.until(
        "bad:one reported unhealthy",
        lambda: bool(re.search("unhealthy|degraded|unknown", up.ten("health", "bad:one"), re.I)),
        15,
    )
    up.stopped("bad:one")


def test_storage_persistence(up: Upstream) -> None:
    up.spawned("persist:p1")
    up.until("persist serving", lambda: up.serving("p1.persist"))
    marker = up.data / "persist" / "p1" / "marker.txt"
    up.until("marker written", marker.exists, 10)
    first = marker.read_text()
    up.stopped("persist:p1")
    assert marker.exists()
    up.spawned("persist:p1")
    up.until("persist serving again", lambda: up.serving("p1.persist"))
    assert marker.read_text() == first
    up.stopped("persist:p1")

    up.spawned("ephemeral:e1")
    up.until("ephemeral serving", lambda: up.serving("e1.ephemeral"))
    emarker = up.data / "ephemeral" / "e1" / "marker.txt"
    up.until("ephemeral marker written", emarker.exists, 10)
    up.stopped("ephemeral:e1")
    assert not emarker.exists()


def test_logs_follow(up: Upstream) -> None:
    """Upstream's `ten logs -f` on our SSE stream."""
    up.spawned("logs:follow")
    up.until("follow serving", lambda: up.serving("follow.logs"))
    follow = subprocess.Popen(
        [str(up.ten_binary), "--data-dir", str(up.data), "logs", "logs:follow", "-f"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**BASE_ENV, "TENEMENT_SERVER": up.url},
        cwd=up.serve,
    )
    try:
        time.sleep(1)  # the stream starts from now
        up.get("follow.logs", "/followed")
        # Lines written just before the stream opened may come first (the app's start).
        lines: list[str] = []
        while len(lines) < 5 and not any("path=/followed" in x for x in lines):
            lines.append(follow.stdout.readline())  # type: ignore[union-attr]
        line = next(x for x in lines if "path=/followed" in x)
        assert line.startswith("[OUT] logs:follow req id=follow"), lines
    finally:
        follow.kill()
        follow.wait()
        follow.stdout.close()  # type: ignore[union-attr]
        follow.stderr.close()  # type: ignore[union-attr]
    up.stopped("logs:follow")


def test_log_streaming(up: Upstream) -> None:
    up.spawned("logs:stream")
    up.until("stream serving", lambda: up.serving("stream.logs"))
    token = (up.data / "api_token").read_text().strip()
    conn = http.client.HTTPConnection("127.0.0.1", up.port, timeout=10)
    try:
        conn.request(
            "GET",
            "/api/logs/stream?process=logs&id=stream",
            headers={"Host": "localhost", "Authorization": f"Bearer {token}"},
        )
        response = conn.getresponse()
        assert response.status == 200
        time.sleep(0.5)  # the stream starts from now: poke the app after it is open
        for _ in range(5):
            up.get("stream.logs")
        seen = b""
        deadline = time.monotonic() + 6
        while b"id=stream" not in seen and time.monotonic() < deadline:
            seen += response.fp.readline()
        assert b"id=stream" in seen, seen
        event = json.loads(next(line for line in seen.splitlines() if b"id=stream" in line)[5:])
        assert event["process"] == "logs" and event["instance_id"] == "stream"
    finally:
        conn.close()
    up.stopped("logs:stream")


def test_auth_edges(up: Upstream) -> None:
    assert up.api("/api/instances", None)[0] == 401
    assert up.api("/api/instances", "not-a-real-token-deadbeef")[0] == 401
    token = (up.data / "api_token").read_text().strip()
    assert up.api("/api/instances", token)[0] == 200


def test_upstream_api_answers(up: Upstream) -> None:
    """Endpoints upstream's `ten` does not call but its API has: storage, telemetry."""
    token = (up.data / "api_token").read_text().strip()
    up.spawned("persist:api")
    status, body = up.api("/api/instances/persist:api/storage", token)
    assert status == 200
    storage = json.loads(body)
    assert storage["path"] == str(up.data / "persist" / "api") and storage["used_bytes"] >= 0
    status, body = up.api("/api/telemetry", token)
    telemetry = json.loads(body)
    assert status == 200 and telemetry["summary"]["total_instances"] >= 1
    assert any(row["id"] == "persist:api" for row in telemetry["instances"])
    assert up.api("/api/instances?nope=1", token)[0] == 400
    assert up.api("/api/logs?proces=persist", token)[0] == 400  # a typo is not ignored
    up.stopped("persist:api")
    assert "persist:api: deregistered" in up.ours("deregister", "persist:api")
    assert "persist:api" not in up.rows()


def test_our_ten_speaks_upstreams_verbs_too(up: Upstream, tmp_path: Path) -> None:
    """Our `ten`: --version, the token file (no TENEMENT_TOKEN here), ps --all, config,
    init; its own extras keep working."""
    assert up.ours("--version").startswith("ten ")
    up.spawned("basic:ours")
    up.stopped("basic:ours")
    assert "basic:ours" not in up.ours("ps")  # upstream's ps: only instances with a process
    assert "basic:ours" in up.ours("ps", "--all")
    shown = up.ours("config", "--file", str(up.serve / "tenement.toml"))
    assert "[basic]" in shown and "command: ./simple.sh" in shown
    result = subprocess.run(
        [sys.executable, "-m", "instances.cli", "init", "--name", "demo"],
        capture_output=True,
        text=True,
        timeout=60,
        env=BASE_ENV,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    from instances.config import load_config

    (tmp_path / "app").write_text("#!/bin/sh\n")
    (tmp_path / "app").chmod(0o755)
    config = load_config(tmp_path / "tenement.toml", tmp_path / "data")
    assert config.services["demo"]["command"] == "./app"


# ---- weighted routing, deploy, route (releases) --------------------------------------------


def ids_seen(up: Upstream, host: str, n: int) -> dict[str, int]:
    """e2e.sh's loop: n requests to the weighted host, counted by the id that answered."""
    seen = {"a": 0, "b": 0}
    for _ in range(n):
        status, body = up.get(host)
        if status != 200:
            continue  # `|| continue`, as the script does
        match = re.search(r"id=(\w+)", body)
        if match:
            seen[match[1]] = seen.get(match[1], 0) + 1
    return seen


def test_weighted_multi_instance(up: Upstream) -> None:
    up.spawned("weighted:a")
    up.spawned("weighted:b")
    up.until("weighted:a serving", lambda: up.serving("a.weighted"), 15)
    up.until("weighted:b serving", lambda: up.serving("b.weighted"), 15)
    seen = ids_seen(up, "weighted", 40)
    assert seen["a"] > 0 and seen["b"] > 0, seen
    up.ten("weight", "weighted:a", "0")
    up.ten("weight", "weighted:b", "100")
    skew = ids_seen(up, "weighted", 20)
    assert skew["a"] == 0 and skew["b"] > 0, skew
    up.stopped("weighted:a")
    up.stopped("weighted:b")


def test_weighted_reselect(up: Upstream) -> None:
    # Upstream's ids are wr_a and wr_b: '_' is not allowed in a DNS label (our ids become
    # host names), so ours drop it.
    up.spawned("weighted:wra")
    up.spawned("weighted:wrb")
    up.until("wra serving", lambda: up.serving("wra.weighted"), 15)
    up.until("wrb serving", lambda: up.serving("wrb.weighted"), 15)
    pid = int(re.search(r"pid=(\d+)", up.get("wra.weighted")[1])[1])  # type: ignore[index]
    up.app_pids.add(pid)
    os.kill(pid, signal.SIGKILL)
    fails = sum(1 for _ in range(15) if up.get("weighted", timeout=5)[0] != 200)
    assert fails == 0, f"{fails}/15 weighted requests failed after killing one backend"
    up.stopped("weighted:wra")
    up.stopped("weighted:wrb")


def test_deploy_route(up: Upstream) -> None:
    up.ten("deploy", "bg:v1", "--weight", "100", "--timeout", "30")
    up.until("bg:v1 in ps", lambda: up.in_ps("bg:v1"), 15)
    up.until("v1 serving", lambda: up.serving("v1.bg"), 15)
    up.ten("deploy", "bg:v2", "--weight", "0", "--timeout", "30")
    up.until("v2 serving", lambda: up.serving("v2.bg"), 15)
    pre = [up.get("bg")[1] for _ in range(10)]
    assert any("id=v1" in r for r in pre) and not any("id=v2" in r for r in pre), pre
    up.ten("route", "bg", "--from", "v1", "--to", "v2")
    post = [up.get("bg")[1] for _ in range(10)]
    assert not any("id=v1" in r for r in post) and any("id=v2" in r for r in post), post
    up.stopped("bg:v1")
    up.stopped("bg:v2")
