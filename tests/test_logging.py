"""tenement's own log lines: plain and JSON formats, the instance key and request id."""

from __future__ import annotations

import http.client
import json
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from instances.ids import InstanceKey
from tenement_site import logging as tlog
from tests.conftest import REPO, TENANT_PYTHON, TESTAPP
from tests.harness import Deployment, free_port, http_request

BADAPP = REPO / "tests" / "apps" / "badupstream.py"
CONFIG = f"""
[settings]
health_check_interval = 1

[service.web]
command = "{TENANT_PYTHON} {TESTAPP}"
health = "/health"
idle_timeout = 60

[service.bad]
command = "{TENANT_PYTHON} {BADAPP}"
health = ""

[instances]
bad = ["dan"]
web = ["alice"]
"""
PLAIN_LINE = re.compile(
    r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+ .*msg="
)


# ---- formatters, in process ------------------------------------------------------------


def record(message: str, **extra: Any) -> logging.LogRecord:
    logger = logging.getLogger("tenement.test")
    rec = logger.makeRecord("tenement.test", logging.WARNING, __file__, 1, message, (), None)
    for name, value in extra.items():
        setattr(rec, name, value)
    return rec


def test_plain_is_one_logfmt_line_even_with_newlines_and_exceptions() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        rec = record("two\nlines", event="state", instance=InstanceKey("web", "alice"), pid=7)
        rec.exc_info = sys.exc_info()
    tlog.ContextFilter().filter(rec)
    line = tlog.PlainFormatter().format(rec)
    assert "\n" not in line
    assert PLAIN_LINE.match(line)
    assert " WARNING tenement.test event=state instance=web:alice pid=7 " in line
    assert 'msg="two\\nlines"' in line
    assert 'exc="Traceback' in line and "ValueError: boom\\nsecond line" in line


def test_json_carries_time_level_logger_message_and_fields() -> None:
    rec = record("hello", event="state", instance=InstanceKey("web", "alice"))
    tlog.ContextFilter().filter(rec)
    out = json.loads(tlog.JsonLineFormatter().format(rec))
    assert out["level"] == "WARNING" and out["logger"] == "tenement.test"
    assert out["message"] == "hello" and out["event"] == "state"
    assert out["instance"] == "web:alice"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", out["time"])
    assert "request_id" not in out  # only where there is one


def test_bound_context_reaches_records_and_is_undone() -> None:
    tokens = tlog.bind(b"req-1", InstanceKey("web", "bob"))
    try:
        rec = record("x")
        tlog.ContextFilter().filter(rec)
    finally:
        tlog.unbind(tokens)
    assert (rec.request_id, rec.instance) == ("req-1", "web:bob")
    after = record("y")
    tlog.ContextFilter().filter(after)
    assert not hasattr(after, "request_id") and not hasattr(after, "instance")


def test_config_levels_and_overrides() -> None:
    config = tlog.config("json", "debug", "tenement.proxy=WARNING, django = info")
    assert config["loggers"]["tenement"]["level"] == "DEBUG"
    assert config["loggers"]["tenement.proxy"] == {"level": "WARNING"}
    assert config["loggers"]["django"]["level"] == "INFO"
    assert config["formatters"]["line"]["()"].endswith("JsonLineFormatter")


@pytest.mark.parametrize(
    ("fmt", "level", "overrides", "error"),
    [
        ("xml", "INFO", "", "TENEMENT_LOG_FORMAT: 'xml'"),
        ("plain", "LOUD", "", "TENEMENT_LOG_LEVEL: unknown log level 'LOUD'"),
        ("plain", "INFO", "tenement.proxy", "'tenement.proxy' is not LOGGER=LEVEL"),
        ("plain", "INFO", "django=chatty", "TENEMENT_LOG_LEVELS (django): unknown log level"),
    ],
)
def test_bad_settings_are_clear_errors(fmt: str, level: str, overrides: str, error: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=re.escape(error)):
        tlog.config(fmt, level, overrides)


def test_a_bad_setting_stops_manage_py_with_the_message(short_tmp: Path) -> None:
    d = Deployment(short_tmp, "")
    d.env["TENEMENT_LOG_FORMAT"] = "yaml"
    result = d.manage("check")
    assert result.returncode != 0
    assert "TENEMENT_LOG_FORMAT: 'yaml' is not 'plain' or 'json'" in result.stderr


# ---- a real runsupervisor ----------------------------------------------------------------


class Server(Deployment):
    """runsupervisor with HTTP, its stderr kept apart from stdout."""

    def __init__(self, root: Path, log_format: str) -> None:
        super().__init__(root, CONFIG)
        self.port = free_port()
        self.env["TENEMENT_LOG_FORMAT"] = log_format
        self.stderr_path = root / "stderr.log"
        with open(self.stderr_path, "wb") as err, open(root / "stdout.log", "wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    str(REPO / "manage.py"),
                    "runsupervisor",
                    "--config",
                    str(self.config),
                    "--bind",
                    f"127.0.0.1:{self.port}",
                    "--data-dir",
                    str(self.data),
                ],
                stdout=out,
                stderr=err,
                env=self.env,
                cwd=REPO,
                start_new_session=True,
            )
        self.supervisors.append(self.proc)

    def get(self, host: str, path: str = "/") -> http.client.HTTPResponse:
        return http_request(self.port, host, path)[0]

    def lines(self) -> list[str]:
        return self.stderr_path.read_text().splitlines()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def serve(short_tmp: Path, log_format: str) -> Iterator[Server]:
    server = Server(short_tmp, log_format)
    try:
        server.wait_states({"bad:dan": "running", "web:alice": "running"}, timeout=60)
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def json_server(short_tmp: Path) -> Iterator[Server]:
    yield from serve(short_tmp, "json")


@pytest.fixture
def plain_server(short_tmp: Path) -> Iterator[Server]:
    yield from serve(short_tmp, "plain")


def put_alice_to_sleep(server: Server) -> None:
    result = server.manage("stop", "web:alice")
    assert result.returncode == 0, result.stderr
    server.wait_states({"web:alice": "stopped"})


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_json_lines_with_instance_and_request_id(json_server: Server) -> None:
    put_alice_to_sleep(json_server)
    woken = json_server.get("alice.web.localhost", "/health")
    assert woken.status == 200 and woken.getheader("x-tenement-wake") is not None
    bad = json_server.get("dan.bad.localhost", "/anything")
    assert bad.status == 502
    rid = bad.getheader("x-request-id")
    json_server.stop()

    records = [json.loads(line) for line in json_server.lines()]  # every line is JSON
    assert len(records) >= 5
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    states = [r for r in records if r.get("event") == "state" and r.get("instance") == "web:alice"]
    moves = [(r["from"], r["to"]) for r in states]
    # Started from the config, put to sleep, then woken by the request.
    awake = [("stopped", "starting"), ("starting", "running")]
    assert moves[:6] == [*awake, ("running", "stopping"), ("stopping", "stopped"), *awake]
    assert all(isinstance(r["pid"], int) for r in states)
    errors = [r for r in records if r.get("event") == "proxy_error"]
    assert len(errors) == 1
    assert errors[0]["request_id"] == rid
    assert errors[0]["instance"] == "bad:dan" and errors[0]["status"] == 502


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_plain_lines_one_per_event(plain_server: Server) -> None:
    put_alice_to_sleep(plain_server)
    assert plain_server.get("alice.web.localhost", "/health").status == 200
    bad = plain_server.get("dan.bad.localhost", "/")
    plain_server.stop()

    lines = plain_server.lines()
    assert lines and all(PLAIN_LINE.match(line) for line in lines), lines
    assert any(
        " INFO tenement.supervisor event=state instance=web:alice from=stopped to=starting pid="
        in line
        for line in lines
    )
    rid = bad.getheader("x-request-id")
    assert any(f"instance=bad:dan request_id={rid} status=502" in line for line in lines)


STALLED_WRITER = """
import logging, logging.config, time
from tenement_site import logging as tlog
logging.config.dictConfig(tlog.config("plain", "INFO"))
log = logging.getLogger("tenement.proxy")
started = time.monotonic()
for i in range(50_000):
    log.warning("upstream refused %d", i, extra={"event": "bad_gateway"})
print(f"logged in {time.monotonic() - started:.3f}s", flush=True)
"""


@pytest.mark.timeout(60)
def test_a_stalled_stderr_never_blocks_the_logging_thread() -> None:
    """Nobody reads the process's stderr (a stuck journald): logging still returns at
    once, the excess is dropped and counted, and what was queued is written at exit."""
    with subprocess.Popen(
        [sys.executable, "-c", STALLED_WRITER],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            # stdout answers while stderr is still unread: the loop did not wait for it.
            done = proc.stdout.readline()
            assert done.startswith("logged in"), done
            assert float(done.split()[2].rstrip("s")) < 10
            err = proc.stderr.read()
            assert proc.wait(30) == 0
        finally:
            proc.kill()
    lines = err.splitlines()
    assert "event=bad_gateway" in lines[0] and 'msg="upstream refused 0"' in lines[0]
    assert 1_000 < len(lines) < 50_000  # the pipe plus the queue's worth, not everything
    assert any("event=log_lines_dropped" in line for line in lines)
