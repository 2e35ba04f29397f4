"""The `ten` CLI end to end: a real runsupervisor serving the API, the CLI as a subprocess."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, TENANT_PYTHON, TESTAPP
from tests.harness import Deployment, free_port, http_request, listening

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

CONFIG = f"""
[settings]
health_check_interval = 0.5
backoff_base_ms = 100
backoff_max_ms = 200

[service.app]
command = "{TENANT_PYTHON} {TESTAPP}"
health = "/health"
stop_timeout = 2
env = {{ TESTAPP_LINES = "3" }}

[service.crashy]
command = "{TENANT_PYTHON} {TESTAPP}"
health = "/health"
env = {{ TESTAPP_EXIT_AFTER = "0", TESTAPP_EXIT_CODE = "1" }}

[instances]
app = ["alice", "bob"]
"""
BASE_ENV = {k: v for k, v in os.environ.items() if not k.startswith("TENEMENT_")}


def ten(
    *args: str, server: str, token: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    env = {**BASE_ENV, "TENEMENT_SERVER": server}
    if token is not None:
        env["TENEMENT_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "instances.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


class Server(Deployment):
    """A deployment serving the API on a free loopback port, and an admin token for it."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, CONFIG)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.start("--config", str(self.config), "--bind", f"127.0.0.1:{self.port}", http=True)

    def ready(self) -> None:
        self.wait_states({"app:alice": "running", "app:bob": "running"})
        self.wait_for("the HTTP listener", self.listening)
        self.admin = self.token("admin", "admin")

    def listening(self) -> bool:
        return listening(self.port)

    def token(self, name: str, scope: str) -> str:
        result = self.manage("createtoken", "--name", name, "--scope", scope)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().splitlines()[-1]

    def ten(
        self, *args: str, token: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return ten(
            *args, server=self.url, token=self.admin if token is None else token, timeout=timeout
        )

    def ok(self, *args: str, token: str | None = None) -> str:
        result = self.ten(*args, token=token)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        return result.stdout

    def ps(self, *flags: str) -> dict[str, dict]:
        return {i["key"]: i for i in json.loads(self.ok("ps", "--json", *flags))}

    def tenant_request(self, host: str, path: str) -> int:
        return http_request(self.port, host, path)[0].status


@pytest.fixture
def server(short_tmp: Path) -> Iterator[Server]:
    s = Server(short_tmp)
    try:
        s.ready()
        yield s
    finally:
        s.cleanup()


def assert_fails(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ten: "), result.stderr  # one line
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)


# ---- instances ---------------------------------------------------------------------------


def test_ps_spawn_stop_restart(server: Server) -> None:
    out = server.ok("ps")
    header, *rows = out.splitlines()
    assert header.split() == [
        "INSTANCE",
        "STATE",
        "PID",
        "UPTIME",
        "IDLE",
        "RESTARTS",
        "HEALTH",
        "RSS",
    ]
    assert [r.split()[:2] for r in rows] == [["app:alice", "running"], ["app:bob", "running"]]
    assert "MiB" in rows[0] and "healthy" in rows[0]
    assert header.index("STATE") == rows[0].index("running")  # aligned columns
    listed = server.ps()
    assert listed["app:alice"]["health_ok"] is True and listed["app:alice"]["pid"] > 0
    # Global options also work before the verb.
    filtered = json.loads(server.ok("--json", "ps", "--state", "stopped"))
    assert filtered == []

    # A new tenant: registered, started, waited for.
    out = server.ok("spawn", "app:carol", "--wait")
    assert "app:carol: running" in out
    carol = server.ps()["app:carol"]
    assert carol["state"] == "running"
    server.app_pids.add(carol["pid"])
    # Spawning what already runs is fine and changes nothing.
    assert "app:carol" in server.ok("spawn", "app:carol", "--wait")
    assert server.ps()["app:carol"]["pid"] == carol["pid"]

    assert "stopped" in server.ok("stop", "app:carol", "--wait")
    # As upstream's ps: a sleeping tenant is listed with --all only.
    assert "app:carol" not in server.ps()
    assert server.ps("--all")["app:carol"]["state"] == "stopped"
    out = server.ok("ps", "--service", "app", "--state", "stopped")
    assert [r.split()[0] for r in out.splitlines()[1:]] == ["app:carol"]

    before = server.ps()["app:alice"]["pid"]
    assert "restarted" in server.ok("restart", "app:alice", "--wait")
    after = server.ps()["app:alice"]
    assert after["state"] == "running" and after["pid"] != before
    server.app_pids.add(after["pid"])

    spawned = json.loads(server.ok("spawn", "app:dave", "--json"))
    assert spawned["key"] == "app:dave" and spawned["desired_state"] == "running"
    server.wait_states({"app:dave": "running"})


def test_unknown_and_invalid_names(server: Server) -> None:
    assert_fails(server.ten("stop", "app:zed"), 6, "app:zed")
    assert_fails(server.ten("health", "app:zed"), 6)
    assert_fails(server.ten("spawn", "nosuch:x"), 6, "nosuch")
    assert "app:zed" not in server.ps()
    # Checked locally: a usage error, the server is never asked.
    for key in ("App:alice", "app", "app:-x", "app:a/b", "app:a:b"):
        result = ten("spawn", key, server="http://127.0.0.1:9")
        assert result.returncode == 2, (key, result.stderr)
        assert "Traceback" not in result.stderr


def test_health_exit_codes(server: Server) -> None:
    out = server.ok("health")
    assert [line.split()[:3] for line in out.splitlines()[1:]] == [
        ["app:alice", "running", "healthy"],
        ["app:bob", "running", "healthy"],
    ]
    server.ok("health", "app:alice")
    assert json.loads(server.ok("health", "app:bob", "--json"))["health_ok"] is True

    # An app that exits at once: it ends in a crash loop, and spawn --wait says so.
    result = server.ten("spawn", "crashy:zed", "--wait", "--wait-timeout", "60")
    assert_fails(result, 1, "crashy:zed")
    server.wait_states({"crashy:zed": "failed"})
    assert_fails(server.ten("health", "crashy:zed"), 1, "unhealthy: crashy:zed")
    result = server.ten("health")
    assert result.returncode == 1
    assert ["crashy:zed", "failed", "unhealthy"] in [
        r.split()[:3] for r in result.stdout.splitlines()
    ]
    server.ok("health", "app:alice")  # the others are still fine


# ---- logs --------------------------------------------------------------------------------


def test_logs_and_search(server: Server) -> None:
    def shown() -> str:
        return server.ok("logs", "app:alice", "--stream", "stdout", "--limit", "1000")

    server.wait_for("alice's start-up lines", lambda: "line 2" in shown())
    out = shown()
    assert "app:alice  stdout  line 0" in out
    assert out.index("line 0") < out.index("line 2")  # oldest first, as tail prints
    assert "app:bob" not in out

    found = server.ok("logs", "--search", '"line 1"')
    assert "app:alice  stdout  line 1" in found and "app:bob  stdout  line 1" in found
    assert "line 0" not in found and "line 2" not in found
    page = json.loads(server.ok("logs", "app:bob", "--search", "line", "--json", "-n", "2"))
    assert len(page) == 2 and all(r["instance"] == "app:bob" for r in page)
    assert_fails(server.ten("logs", "app:zed"), 6)


def test_logs_follow_prints_new_lines_until_ctrl_c(server: Server) -> None:
    env = {**BASE_ENV, "TENEMENT_SERVER": server.url, "TENEMENT_TOKEN": server.admin}
    proc = subprocess.Popen(
        [sys.executable, "-m", "instances.cli", "logs", "app:alice", "--follow"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
        # A shell's background job may inherit SIGINT ignored; Ctrl-C must reach this one.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout])
    reader.start()
    try:
        lines.get(timeout=30)  # the backlog is out: the stream resumes after it
        marker = f"/cli-marker-{uuid.uuid4().hex}"
        assert server.tenant_request("alice.app.localhost", marker) == 404  # the app logs it
        deadline = time.monotonic() + 30
        while marker not in (line := lines.get(timeout=max(0.1, deadline - time.monotonic()))):
            pass
        assert "app:alice" in line
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        reader.join(timeout=10)  # ends at EOF, now that the process is gone
        proc.stdout.close()
        proc.stderr.close()


def test_follow_refuses_search(server: Server) -> None:
    assert_fails(server.ten("logs", "-f", "--search", "x"), 2, "--follow")


# ---- tokens and authorisation ------------------------------------------------------------


def test_tokens_create_list_revoke_and_auth_errors(server: Server) -> None:
    result = server.ten("token", "create", "--name", "ci", "--scope", "read")
    assert result.returncode == 0, result.stderr
    secret = result.stdout.strip().splitlines()[-1]
    assert secret.startswith("ten_") and secret not in result.stderr
    listed = server.ok("token", "list")
    assert any(r.split()[:3] == ["ci", secret.split("_")[1], "read"] for r in listed.splitlines())
    assert secret not in listed
    tokens = {t["name"]: t for t in json.loads(server.ok("token", "list", "--json"))}
    assert tokens["ci"]["revoked_at"] is None and "token" not in tokens["ci"]
    assert_fails(server.ten("token", "create", "--name", "ci"), 7, "already exists")

    # A read token may look but not act.
    assert "app:alice" in server.ok("ps", token=secret)
    assert_fails(server.ten("stop", "app:alice", token=secret), 5, "scope")
    assert_fails(server.ten("token", "list", token=secret), 5)
    assert server.ps()["app:alice"]["desired_state"] == "running"

    assert "revoked" in server.ok("token", "revoke", "ci")
    rows = [r.split() for r in server.ok("token", "list").splitlines()]
    assert [r[4] for r in rows if r[0] == "ci"] == ["revoked"]
    assert_fails(server.ten("ps", token=secret), 5, "refused")
    assert_fails(server.ten("token", "revoke", "ci"), 6)
    assert_fails(server.ten("ps", token="ten_nope"), 5, "refused")
    assert_fails(server.ten("ps", token=""), 5, "no token", "TENEMENT_TOKEN")

    # Brute force: after a few more failures the server answers 429 with Retry-After.
    for _ in range(20):
        result = server.ten("ps", token="ten_wrong")
        if result.returncode != 5:
            break
    assert_fails(result, 8, "retry after")


def test_server_down_says_which_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = ten("ps", server=url, token="ten_x", timeout=30)
    assert_fails(result, 4, url, "--server")
    assert_fails(ten("ps", server="not-a-url"), 2, "not-a-url")


# ---- local verbs -------------------------------------------------------------------------

NO_SERVER = "http://127.0.0.1:9"


def test_config_check(tmp_path: Path) -> None:
    good = ten("config", "check", str(REPO / "examples" / "tenement.toml"), server=NO_SERVER)
    assert good.returncode == 0 and "ok" in good.stdout, good.stderr

    bad = tmp_path / "tenement.toml"
    bad.write_text(
        "[settings]\nhealth_check_intervall = 5\nmax_restarts = -1\n\n"
        '[service.web]\ncomand = "python3 app.py"\nidle_timeout = "5m"\n\n'
        '[instances]\nweb = ["alice", "Bob"]\nwbe = ["carol"]\n'
    )
    result = ten("config", "check", str(bad), server=NO_SERVER)
    assert result.returncode == 1
    problems = result.stdout.splitlines()
    assert all(line.startswith(f"{bad}: ") for line in problems)
    text = result.stdout
    assert (
        "settings.health_check_intervall: unknown key (did you mean 'health_check_interval'?)"
        in text
    )
    assert "service.web.comand: unknown key (did you mean 'command'?)" in text
    assert "service.web.command: missing" in text
    assert "settings.max_restarts: must be 0 to" in text
    assert "service.web.idle_timeout: must be a number of seconds (got '5m')" in text
    assert "instances.web: invalid instance id 'Bob'" in text
    assert "instances.wbe: no [service.wbe] is defined (defined: web; did you mean 'web'?)" in text
    assert "loadconfig --check" in result.stderr

    bad.write_text("[service.web\n")
    result = ten("config", "check", str(bad), server=NO_SERVER)
    assert result.returncode == 1 and "invalid TOML" in result.stdout
    result = ten("config", "check", str(tmp_path / "missing.toml"), server=NO_SERVER)
    assert result.returncode == 1 and "cannot read" in result.stdout


def test_config_check_knows_the_servers_keys() -> None:
    from instances.cli import configcheck
    from instances.config import ConfigTables, ServiceTable, SettingsTable

    assert set(configcheck.TOP) == set(ConfigTables.model_fields)
    assert set(configcheck.SETTINGS) == set(SettingsTable.model_fields)
    assert set(configcheck.SERVICE) == set(ServiceTable.model_fields)


def test_release_verbs_check_their_arguments_before_any_request() -> None:
    for args, words in (
        (("weight", "app:v2", "150"), "from 0 to 100"),
        (("route", "app", "--from", "v1"), "--to"),
        (("release", "create", "app", "Bad_Name"), "invalid name"),
    ):
        result = ten(*args, server=NO_SERVER)  # nothing listens there: never contacted
        assert result.returncode == 2 and words in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_help_on_every_verb_and_exit_codes_documented() -> None:
    result = ten("--help", server=NO_SERVER)
    assert result.returncode == 0
    for code in range(9):
        assert f"\n  {code}  " in result.stdout
    for verb in [
        ["spawn"],
        ["stop"],
        ["restart"],
        ["ps"],
        ["health"],
        ["logs"],
        ["token", "create"],
        ["token", "list"],
        ["token", "revoke"],
        ["config", "check"],
        ["weight"],
        ["deploy"],
        ["route"],
        ["release", "create"],
        ["release", "pin"],
    ]:
        result = ten(*verb, "--help", server=NO_SERVER)
        assert result.returncode == 0 and "--server" in result.stdout, verb
    script = Path(sys.executable).parent / "ten"
    if script.exists():  # the installed console script runs the same main()
        assert (
            "exit codes"
            in subprocess.run(
                [str(script), "--help"], capture_output=True, text=True, timeout=30
            ).stdout
        )


def test_cli_does_not_import_django() -> None:
    code = (
        "import sys, instances.cli.app; "
        "servers = {'django', 'rest_framework', 'pydantic'}; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & servers))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env=BASE_ENV,
    )
    assert result.stdout.strip() == "[]", result.stderr
