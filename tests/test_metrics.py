"""/metrics end to end: real runsupervisor processes, real apps, real wakes and crashes.

Every figure is read over HTTP and parsed with prometheus_client's own parser; tests assert
exact deltas between two scrapes.
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
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect as ws_connect

from tests.conftest import REPO, TENANT_PYTHON, TENANT_UVICORN, TESTAPP
from tests.harness import Deployment, free_port, http_request, listening

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

APP = f"{TENANT_PYTHON} {TESTAPP}"
CONFIG = f"""
[settings]
health_check_interval = 1
backoff_base_ms = 100
backoff_max_ms = 400

[service.web]
command = "{APP}"
health = "/health"
idle_timeout = 2
wake_timeout = 10
env = {{ TESTAPP_LINES = "3" }}

[service.steady]
command = "{APP}"
health = "/health"
env = {{ TESTAPP_HEALTH = "file" }}

[instances]
web = ["alice"]
steady = ["a", "b", "c"]
"""

UVICORN = [sys.executable, "-m", "uvicorn", "tenement_site.asgi:application", "--lifespan", "off"]
UVICORN += ["--host", "127.0.0.1", "--log-level", "warning"]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Metered(Deployment):
    """A deployment serving HTTP on a free loopback port, with /metrics helpers."""

    def __init__(
        self, root: Path, env: dict[str, str] | None = None, bind: str = "", config: str = CONFIG
    ) -> None:
        super().__init__(root, config)
        self.port = free_port()
        self.env.update(env or {})
        self.proc = self.start(
            "--config",
            str(self.config),
            "--bind",
            f"{bind or '127.0.0.1'}:{self.port}",
            http=True,
        )

    def request(
        self, host: str, path: str = "/", headers: dict[str, str] | None = None, port: int = 0
    ) -> tuple[http.client.HTTPResponse, bytes]:
        return http_request(port or self.port, host, path, headers=headers)

    def restart_supervisor(self) -> None:
        """Stop runsupervisor (SIGTERM, as systemd does) and start it again on the same port."""
        self.proc.terminate()
        self.proc.wait(30)
        self.proc = self.start(
            "--config", str(self.config), "--bind", f"127.0.0.1:{self.port}", http=True
        )
        wait_until("the new supervisor to serve", lambda: answers(self.port), timeout=60)

    def post_json(self, path: str, payload: Any, token: str) -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        response, body = http_request(
            self.port,
            f"127.0.0.1:{self.port}",
            path,
            method="POST",
            body=json.dumps(payload),
            headers=headers,
        )
        return response.status, body

    def scrape_text(self, port: int = 0, headers: dict[str, str] | None = None) -> str:
        """The supervisor's /metrics over its --metrics-bind socket (no token); another
        process's (port) over TCP with a read token, as Prometheus would."""
        if not port and headers is None:
            wait_until("the metrics listener", self.metrics_socket.exists, timeout=60)
            status, _, raw = self.private_get("/metrics")
            assert status == 200, (status, raw)
            return raw.decode()
        if headers is None:
            headers = {"Authorization": f"Bearer {self.reader()}"}
        response, body = self.request(f"127.0.0.1:{port or self.port}", "/metrics", headers, port)
        assert response.status == 200, (response.status, body)
        return body.decode()

    def reader(self) -> str:
        """A fleet-wide read token, made once."""
        if not getattr(self, "_reader", None):
            self._reader = create_token(self, "scraper", "read")
        return self._reader

    def scrape(self, port: int = 0) -> Samples:
        return parse(self.scrape_text(port))

    def db(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with contextlib.closing(sqlite3.connect(self.data / "tenement.sqlite3", timeout=10)) as db:
            return db.execute(query, params).fetchall()


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when there are none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def wait_until(what: str, check: Callable[[], bool], timeout: float = 30) -> None:
    """Poll another process (no event crosses the process boundary), with a deadline."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def metered(short_tmp: Path) -> Iterator[Metered]:
    d = Metered(short_tmp)
    try:
        d.wait_states({"web:alice": "running", "steady:a": "running"})
        yield d
    finally:
        d.cleanup()


# ---- requests, wakes, idle stops, log lines, state -----------------------------------------


def test_requests_wakes_and_idle_stops_are_counted_exactly(metered: Metered) -> None:
    before = metered.scrape()
    for _ in range(7):
        response, _ = metered.request("alice.web.localhost", "/health")
        assert response.status == 200
        assert response.getheader("X-Tenement-Wake") is None  # it was running
    response, _ = metered.request("alice.web.localhost", "/nope")
    assert response.status == 404
    after = metered.scrape()
    assert delta(before, after, "tenement_proxy_requests_total", service="web", code="2xx") == 7
    assert delta(before, after, "tenement_proxy_requests_total", service="web", code="4xx") == 1
    count = "tenement_proxy_request_duration_seconds_count"
    assert delta(before, after, count, service="web") == 8
    assert delta(before, after, "tenement_wakes_total") == 0

    # Idle for 2 s: stopped, and counted once.
    metered.wait_states({"web:alice": "stopped"}, timeout=20)
    stopped = metered.scrape()
    assert delta(after, stopped, "tenement_idle_stops_total", service="web") == 1

    # A cold wake: one wake, one histogram observation, and the header on that response only.
    response, _ = metered.request("alice.web.localhost", "/health")
    assert response.status == 200
    assert int(response.getheader("X-Tenement-Wake")) >= 0
    response, _ = metered.request("alice.web.localhost", "/health")
    assert response.getheader("X-Tenement-Wake") is None
    woken = metered.scrape()
    assert delta(stopped, woken, "tenement_wakes_total", service="web", outcome="ok") == 1
    assert delta(stopped, woken, "tenement_wakes_total") == 1
    assert delta(stopped, woken, "tenement_wake_duration_seconds_count", service="web") == 1
    assert delta(stopped, woken, "tenement_hibernation_wakes_total", process="web") == 1

    # A burst of 40 concurrent requests to a sleeping tenant: exactly one wake.
    metered.wait_states({"web:alice": "stopped"}, timeout=20)
    quiet = metered.scrape()
    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        statuses = list(
            pool.map(
                lambda _: metered.request("alice.web.localhost", "/health")[0].status, range(40)
            )
        )
    assert statuses == [200] * 40
    burst = metered.scrape()
    assert delta(quiet, burst, "tenement_wakes_total", service="web", outcome="ok") == 1
    assert delta(quiet, burst, "tenement_wake_duration_seconds_count", service="web") == 1
    assert delta(quiet, burst, "tenement_proxy_requests_total", code="2xx") == 40
    assert_aliases_equal(burst)


def assert_aliases_equal(m: Samples, services: tuple[str, ...] = ("web", "steady")) -> None:
    for service in services:
        assert value(m, "tenement_requests_total", process=service) == value(
            m, "tenement_proxy_requests_total", service=service
        )
        assert value(m, "tenement_instance_restarts_total", process=service) == value(
            m, "tenement_restarts_total", service=service
        )
        woke = value(m, "tenement_wakes_total", service=service)
        rejected = value(m, "tenement_wakes_total", service=service, outcome="rejected")
        assert value(m, "tenement_hibernation_wakes_total", process=service) == woke - rejected
    running = value(m, "tenement_instances", state="running")
    assert value(m, "tenement_instances_up") == running
    assert value(m, "tenement_instances_running") == running


def test_log_lines_and_instance_states_match_the_database(metered: Metered) -> None:
    response, _ = metered.request("a.steady.localhost", "/stderr")
    assert response.status == 200

    def logs_match() -> bool:
        m = metered.scrape()
        stored = dict(
            metered.db(
                "SELECT l.stream, count(*) FROM instances_logline l JOIN instances_instance i "
                "ON l.instance_id = i.id JOIN instances_service s ON i.service_id = s.id "
                "WHERE s.name = 'steady' GROUP BY l.stream"
            )
        )
        counted = {
            stream: value(m, "tenement_log_lines_total", service="steady", stream=stream)
            for stream in ("stdout", "stderr")
        }
        return counted == {"stdout": stored.get("stdout", 0), "stderr": stored.get("stderr", 0)}

    # Lines are stored in batches (every 250 ms) and the apps keep logging health checks.
    wait_until("log line counts equal to the stored lines", logs_match)
    m = metered.scrape()
    assert value(m, "tenement_log_lines_total", service="steady", stream="stderr") >= 1

    def states_match() -> bool:
        m = metered.scrape()
        counts = collections.Counter(
            (key.split(":")[0], row["state"]) for key, row in metered.rows().items()
        )
        shown = {
            (dict(ls)["service"], dict(ls)["state"]): v
            for (n, ls), v in m.items()
            if n == "tenement_instances" and v
        }
        return shown == dict(counts)

    wait_until("tenement_instances equal to the database", states_match)
    m = metered.scrape()
    assert value(m, "tenement_instances_registered", service="steady") == 3
    assert value(m, "tenement_instances_registered", service="web") == 1
    assert value(m, "tenement_instance_uptime_seconds", service="steady") > 0
    assert_aliases_equal(m)


# ---- restarts by reason ------------------------------------------------------------------


def test_restart_reasons_crash_health_and_manual(metered: Metered) -> None:
    rows = metered.wait_states({f"steady:{i}": "running" for i in "abc"})
    before = metered.scrape()

    # Crash: SIGKILL the app.
    os.kill(rows["steady:a"]["pid"], signal.SIGKILL)
    wait_until(
        "a crash restart",
        lambda: delta(before, metered.scrape(), "tenement_restarts_total", reason="crash") == 1,
    )
    metered.wait_states({"steady:a": "running"})

    # Health: the app answers 500 on /health while this file exists.
    unhealthy = metered.data / "steady" / "b" / "unhealthy"
    unhealthy.touch()
    try:
        wait_until(
            "a health restart",
            lambda: (
                delta(before, metered.scrape(), "tenement_restarts_total", reason="health") == 1
            ),
        )
    finally:
        unhealthy.unlink()
    metered.wait_states({"steady:b": "running"})
    m = metered.scrape()
    assert delta(before, m, "tenement_health_check_failures_total", service="steady") >= 3

    # Manual: `manage.py restart`.
    result = metered.manage("restart", "steady:c")
    assert result.returncode == 0, result.stderr
    after = metered.scrape()
    assert delta(before, after, "tenement_restarts_total", service="steady", reason="crash") == 1
    assert delta(before, after, "tenement_restarts_total", service="steady", reason="health") == 1
    assert delta(before, after, "tenement_restarts_total", service="steady", reason="manual") == 1
    assert_aliases_equal(after)


# ---- wakes that time out, fail or are rejected; open WebSockets ------------------------------

WS_APP = f"{TENANT_UVICORN} --app-dir {REPO} tests.apps.proxyapp:app --uds {{socket}}"
# slow listens 4 s after it starts, past its 1 s wake_timeout; crashy exits at once, and
# with max_restarts = 1 its second failed start makes it `failed`.
WAKES_CONFIG = f"""
[settings]
health_check_interval = 1
backoff_base_ms = 100
backoff_max_ms = 400
max_restarts = 1

[service.slow]
command = "{APP}"
health = "/health"
wake_timeout = 1
startup_timeout = 30
env = {{ TESTAPP_START_DELAY = "4" }}

[service.crashy]
command = "{APP}"
health = "/health"
wake_timeout = 20
env = {{ TESTAPP_EXIT_AFTER = "0", TESTAPP_EXIT_CODE = "1" }}

[service.ws]
command = "{WS_APP} --log-level warning"
health = "/health"

[instances]
ws = ["w"]
"""
WAKE_FIGURES = ("ok", "timeout", "failed", "rejected")


@pytest.fixture
def wakes(short_tmp: Path) -> Iterator[Metered]:
    d = Metered(short_tmp, config=WAKES_CONFIG)
    try:
        d.wait_states({"ws:w": "running"})
        yield d
    finally:
        d.cleanup()


def register_stopped(d: Metered, key: str) -> None:
    """Register a tenant without starting it, over the REST API, so a request must wake it.
    Done before the first tenant request: the proxy loads its routing table then."""
    token = create_token(d, f"writer-{key.replace(':', '-')}", "write")
    service, instance_id = key.split(":")
    payload = {"service": service, "instance_id": instance_id, "start": False}
    status, body = d.post_json("/api/instances/", payload, token)
    assert status == 201, body
    assert d.rows()[key]["state"] == "stopped"


def outcomes(before: Samples, after: Samples, service: str) -> dict[str, float]:
    return {
        outcome: delta(before, after, "tenement_wakes_total", service=service, outcome=outcome)
        for outcome in WAKE_FIGURES
    }


def test_a_wake_past_wake_timeout_counts_one_timeout_and_no_duration(wakes: Metered) -> None:
    register_stopped(wakes, "slow:s")
    before = wakes.scrape()
    response, body = wakes.request("s.slow.localhost", "/health")
    assert response.status == 503, body
    assert response.getheader("Retry-After") == "5"
    assert b"did not become ready within 1s" in body and b"Traceback" not in body
    timed_out = wakes.scrape()
    assert outcomes(before, timed_out, "slow") == {
        "ok": 0,
        "timeout": 1,
        "failed": 0,
        "rejected": 0,
    }
    assert delta(before, timed_out, "tenement_wake_duration_seconds_count", service="slow") == 0
    assert (
        delta(before, timed_out, "tenement_proxy_requests_total", service="slow", code="5xx") == 1
    )

    # The app does come up later (and the supervisor's own wake wait ends before that): the
    # wake that timed out is not counted a second time as ok or failed, nor observed.
    wakes.wait_states({"slow:s": "running"})
    later = wakes.scrape()
    assert outcomes(before, later, "slow") == {"ok": 0, "timeout": 1, "failed": 0, "rejected": 0}
    assert delta(before, later, "tenement_wake_duration_seconds_count") == 0
    assert delta(before, later, "tenement_hibernation_wakes_total", process="slow") == 1


def test_a_failed_wake_then_requests_rejected_while_failed(wakes: Metered) -> None:
    register_stopped(wakes, "crashy:c")
    before = wakes.scrape()
    response, body = wakes.request("c.crashy.localhost", "/health")
    assert response.status == 503, body
    assert response.getheader("Retry-After") == "30"
    assert b"Traceback" not in body
    failed = wakes.scrape()
    assert outcomes(before, failed, "crashy") == {"ok": 0, "timeout": 0, "failed": 1, "rejected": 0}
    assert delta(before, failed, "tenement_wake_duration_seconds_count") == 0
    assert delta(before, failed, "tenement_hibernation_wakes_total", process="crashy") == 1
    assert delta(before, failed, "tenement_restarts_total", service="crashy", reason="crash") == 1
    wakes.wait_states({"crashy:c": "failed"})

    # Failed: each request is refused at once, without a wake, and counted as rejected.
    for _ in range(3):
        started = time.monotonic()
        response, body = wakes.request("c.crashy.localhost", "/health")
        assert response.status == 503 and b"crash loop" in body, body
        assert response.getheader("Retry-After") == "30"
        assert time.monotonic() - started < 5  # not held for the 20 s wake_timeout
    rejected = wakes.scrape()
    assert outcomes(failed, rejected, "crashy") == {
        "ok": 0,
        "timeout": 0,
        "failed": 0,
        "rejected": 3,
    }
    assert delta(failed, rejected, "tenement_hibernation_wakes_total") == 0
    assert delta(failed, rejected, "tenement_proxy_requests_total", service="crashy") == 3
    assert wakes.rows()["crashy:c"]["state"] == "failed"  # no start was attempted
    assert_aliases_equal(rejected, ("crashy",))

    # A new supervisor (and proxy) does not know yet that it is failed: it asks for a wake,
    # the supervisor refuses without trying, and that is still a rejection.
    wakes.restart_supervisor()
    for _ in range(2):
        response, body = wakes.request("c.crashy.localhost", "/health")
        assert response.status == 503 and b"crash loop" in body, body
    after_restart = wakes.scrape()  # a new process: its counters start at zero
    assert outcomes({}, after_restart, "crashy") == {
        "ok": 0,
        "timeout": 0,
        "failed": 0,
        "rejected": 2,
    }
    assert wakes.rows()["crashy:c"]["state"] == "failed"


def test_open_websockets_are_a_live_gauge(wakes: Metered) -> None:
    def websockets_open() -> float:
        return value(wakes.scrape(), "tenement_open_connections", service="ws", kind="websocket")

    sock = socket.create_connection(("127.0.0.1", wakes.port), timeout=10)
    with ws_connect("ws://w.ws.localhost/ws", sock=sock, open_timeout=15) as ws:
        ws.send("hello")
        assert ws.recv(timeout=5) == "hello"
        # Published every 250 ms, in the proxy's activity batches.
        wait_until("1 open WebSocket", lambda: websockets_open() == 1)
        m = wakes.scrape()
        assert value(m, "tenement_open_connections", service="ws", kind="http") == 0
        ws.send("still open")
        assert ws.recv(timeout=5) == "still open"
    wait_until("0 open WebSockets", lambda: websockets_open() == 0)
    m = wakes.scrape()
    assert value(m, "tenement_open_connections", service="ws") == 0


# ---- access, format, per-instance labels -------------------------------------------------------


def own_address() -> str | None:
    """This machine's non-loopback address, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def status_of(host: str, port: int, headers: dict[str, str]) -> tuple[int, bytes]:
    response, body = http_request(port, headers["Host"], "/metrics", headers=headers, address=host)
    return response.status, body


def test_access_rules_and_promtool(short_tmp: Path) -> None:
    d = Metered(short_tmp, bind="0.0.0.0", env={"TENEMENT_METRICS_PER_INSTANCE": "1"})
    try:
        d.wait_states({"web:alice": "running"})
        read = create_token(d, "reader", "read")
        assert d.request("alice.web.localhost", "/health")[0].status == 200

        # Loopback is no credential (tenants share it): a token is needed there too.
        host = {"Host": f"127.0.0.1:{d.port}"}
        assert status_of("127.0.0.1", d.port, host)[0] == 401
        # The --metrics-bind socket (0600, out of tenants' reach): open.
        assert d.metrics_socket.stat().st_mode & 0o777 == 0o600
        text = d.scrape_text()
        m = parse(text)
        labels = {"service": "web", "instance": "alice", "code": "2xx"}
        assert value(m, "tenement_proxy_requests_total", **labels) == 1
        assert value(m, "tenement_requests_total", process="web", instance="alice") == 1
        assert value(m, "tenement_instance_uptime_seconds", service="web", instance="alice") > 0
        assert value(m, "django_http_requests_total_by_method_total") >= 1  # django-prometheus
        check_with_promtool(text)

        # From a non-loopback address: a read token is needed.
        if (address := own_address()) is not None:
            assert status_of(address, d.port, host)[0] == 401
            authorized = {**host, "Authorization": f"Bearer {read}"}
            assert status_of(address, d.port, authorized)[0] == 200
    finally:
        d.cleanup()


def test_opening_metrics_on_loopback_is_refused_with_a_reason(short_tmp: Path) -> None:
    d = Deployment(short_tmp, "")
    d.env["TENEMENT_METRICS_REQUIRE_TOKEN"] = "0"
    out = d.manage("ps")
    assert out.returncode == 1
    assert "TENEMENT_METRICS_REQUIRE_TOKEN=0 is no longer supported" in out.stderr
    assert "--metrics-bind" in out.stderr and "Traceback" not in out.stderr


def test_require_token_setting_applies_to_loopback_too(short_tmp: Path) -> None:
    d = Metered(short_tmp, env={"TENEMENT_METRICS_REQUIRE_TOKEN": "1"})
    try:
        d.wait_states({"web:alice": "running"})
        read = create_token(d, "reader", "read")
        tenant_token = create_token(d, "alice-only", "read", "--tenant", "alice")
        host = {"Host": f"127.0.0.1:{d.port}"}
        status, body = status_of("127.0.0.1", d.port, host)
        assert (status, body) == (401, b"a bearer token with read scope is required\n")
        wrong = {**host, "Authorization": "Bearer ten_000000000000_" + "x" * 43}
        status, body = status_of("127.0.0.1", d.port, wrong)
        assert (status, body) == (401, b"invalid, expired or revoked token\n")
        assert status_of("127.0.0.1", d.port, {**host, "Authorization": "Basic eDp5"})[0] == 401
        restricted = {**host, "Authorization": f"Bearer {tenant_token}"}
        assert status_of("127.0.0.1", d.port, restricted)[0] == 403
        status, body = status_of("127.0.0.1", d.port, {**host, "Authorization": f"Bearer {read}"})
        assert status == 200
        assert b"tenement_instances_registered" in body
    finally:
        d.cleanup()


def create_token(d: Deployment, name: str, scope: str, *extra: str) -> str:
    result = d.manage("createtoken", "--name", name, "--scope", scope, *extra)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def check_with_promtool(text: str) -> None:
    """`promtool check metrics` exits 1 on a parse error and 3 on any lint finding (a
    counter without _total, a missing HELP, a unit in the wrong place...): we allow none,
    since Prometheus conventions are part of the contract."""
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---- several processes ---------------------------------------------------------------------


def test_multiprocess_sums_counters_and_live_gauges_without_double_counting(
    short_tmp: Path,
) -> None:
    multiproc = short_tmp / "prom"
    multiproc.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(multiproc)}
    d = Metered(short_tmp, env=env)
    worker_port = free_port()
    try:
        d.wait_states({"steady:a": "running", "steady:b": "running", "web:alice": "running"})
        # A second proxy process on the same data dir (scaled mode's extra worker). It
        # reaches running instances through the routing snapshot.
        worker = subprocess.Popen(
            [*UVICORN, "--port", str(worker_port)],
            cwd=REPO,
            env={**d.env, "TENEMENT_DATA_DIR": str(d.data)},
            start_new_session=True,
        )
        d.others.append(worker)
        wait_until("the worker to serve", lambda: answers(worker_port), timeout=60)
        before = d.scrape()
        for port, n in ((d.port, 5), (worker_port, 3)):
            for _ in range(n):
                response, _ = d.request("a.steady.localhost", "/health", port=port)
                assert response.status == 200
        for port in (d.port, worker_port):  # every process's /metrics shows the same sums
            m = d.scrape(port)
            assert delta(before, m, "tenement_proxy_requests_total", code="2xx") == 8
            assert delta(before, m, "tenement_proxy_request_duration_seconds_count") == 8
            running = len([r for r in d.rows().values() if r["state"] == "running"])
            assert value(m, "tenement_instances", state="running") == running  # not doubled
            assert value(m, "tenement_instances_registered") == 4

        # Open connections: one request held open in each process -> the live sum is 2.
        with held("a.steady.localhost", d.port), held("a.steady.localhost", worker_port):
            wait_until("2 open connections", lambda: open_http(d.scrape()) == 2)
        wait_until("0 open connections", lambda: open_http(d.scrape()) == 0)

        # The worker exits: its counts stay summed, its live gauges go.
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
        m = d.scrape()
        # 8, plus the two held requests (answered 200, ended when the client left).
        assert delta(before, m, "tenement_proxy_requests_total", code="2xx") == 10
        assert not list(multiproc.glob(f"gauge_livesum_{worker.pid}.db"))
    finally:
        d.cleanup()


def answers(port: int) -> bool:
    return listening(port)


def open_http(m: Samples) -> float:
    return value(m, "tenement_open_connections", service="steady", kind="http")


@contextlib.contextmanager
def held(host: str, port: int) -> Iterator[None]:
    """A request whose response never ends (the test app's /hold) while inside."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/hold", headers={"Host": host})
        response = conn.getresponse()
        assert response.status == 200
        yield
    finally:
        conn.close()


# ---- the view's refusals, in process (no supervisor needed) -------------------------------


def test_metrics_off_answers_404(client: Any, settings: Any) -> None:
    settings.TENEMENT_METRICS = False
    response = client.get("/metrics")
    assert response.status_code == 404
    assert response.content == b"metrics are off (TENEMENT_METRICS=0)\n"


@pytest.mark.django_db
def test_a_remote_client_needs_a_read_token_without_a_tenant(client: Any) -> None:
    from instances import tokens

    remote = {"REMOTE_ADDR": "203.0.113.9"}
    response = client.get("/metrics", **remote)
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == 'Bearer realm="tenement"'
    assert b"Traceback" not in response.content
    tenant = tokens.mint("alice-reader", "read", tenant="alice").secret
    response = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {tenant}", **remote)
    assert response.status_code == 403
    for _ in range(12):  # past TENEMENT_AUTH_FAILURE_LIMIT (10): the API's limit applies
        response = client.get("/metrics", HTTP_AUTHORIZATION="Bearer ten_nope", **remote)
    assert response.status_code == 429
    assert response["Retry-After"] == "60"
