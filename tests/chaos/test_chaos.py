"""Chaos: runsupervisor killed, signalled and starved of its database under load.

Each test prints its figures (run with -s to see them); the README quotes them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.faults import APP, FullDisk, Site, can_mount, locked_database
from tests.harness import http_request, listening

pytestmark = [pytest.mark.e2e, pytest.mark.chaos, pytest.mark.timeout(240)]

TENANTS = ["app:t1", "app:t2", "app:t3", "app:t4"]
CONFIG = f"""
[settings]
health_check_interval = 0.5
backoff_base_ms = 100
backoff_max_ms = 400

[service.app]
command = "{APP}"
health = "/health"
stop_timeout = 2
wake_timeout = 10

[service.slow]
command = "{APP}"
health = "/health"
stop_timeout = 2
wake_timeout = 10
env = {{ TESTAPP_START_DELAY = "3" }}

[instances]
app = ["t1", "t2", "t3", "t4"]
"""
DRAIN = 1.0
STOP_TIMEOUT = 2.0


@pytest.fixture
def site(short_tmp: Path) -> Iterator[Site]:
    s = Site(short_tmp, CONFIG, TENEMENT_DRAIN_TIMEOUT=str(DRAIN))
    try:
        yield s
        s.assert_legal_transitions()
    finally:
        s.cleanup()


def figure(name: str, **values: object) -> None:
    shown = " ".join(
        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
    )
    print(f"\nCHAOS {name}: {shown}")


def get(site: Site, key: str, path: str = "/health", timeout: float = 5) -> tuple[int, str]:
    service, instance_id = key.split(":")
    response, body = http_request(
        site.port, f"{instance_id}.{service}.localhost", path, timeout=timeout
    )
    return response.status, body.decode(errors="replace")


@dataclass
class Load:
    """Clients requesting the tenants in a loop, each noting when it succeeded or not."""

    site: Site
    clients: int = 20
    stop: threading.Event = field(default_factory=threading.Event)
    results: list[tuple[float, bool]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> Load:
        self.threads = [
            threading.Thread(target=self.loop, args=(i,), name=f"client-{i}", daemon=True)
            for i in range(self.clients)
        ]
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)

    def loop(self, i: int) -> None:
        while not self.stop.is_set():
            ok = False
            try:
                ok = get(self.site, TENANTS[i % len(TENANTS)], timeout=3)[0] == 200
            except (OSError, http.client.HTTPException):
                pass  # a response cut by the kill (e.g. IncompleteRead) is a failed request
            with self.lock:
                self.results.append((time.monotonic(), ok))
            if not ok:
                self.stop.wait(0.02)  # a refused connect returns at once: do not spin

    def first_ok_after(self, t: float) -> float | None:
        with self.lock:
            oks = [at for at, ok in self.results if ok and at > t]
        return min(oks) - t if oks else None


@dataclass
class CopyWatch:
    """Samples the tenant processes all along: the most copies of one instance ever seen."""

    site: Site
    stop: threading.Event = field(default_factory=threading.Event)
    most: int = 0
    seen: dict[str, list[int]] = field(default_factory=dict)

    def __enter__(self) -> CopyWatch:
        self.thread = threading.Thread(target=self.loop, name="copy-watch", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)

    def loop(self) -> None:
        while not self.stop.wait(0.05):
            tenants = self.site.tenants(apps_only=True)
            for pids in tenants.values():
                if len(pids) > self.most:
                    self.most = len(pids)
                    self.seen = tenants


def test_kill_9_under_load_five_times(site: Site) -> None:
    proc = site.serve()
    site.wait_states(dict.fromkeys(TENANTS, "running"))
    back, back_listening, orphans = [], [], 0
    with Load(site) as load, CopyWatch(site) as copies:
        time.sleep(1)
        for _ in range(5):
            before = {pid for pids in site.tenants().values() for pid in pids}
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            restarted = time.monotonic()
            proc = site.start(
                "--config", str(site.config), "--bind", f"127.0.0.1:{site.port}", http=True
            )
            site.wait_for("the server to listen", lambda: listening(site.port), timeout=30)
            listened = time.monotonic()
            site.wait_for(
                "a request to succeed",
                lambda at=listened: load.first_ok_after(at) is not None,
                30,
            )
            back.append(load.first_ok_after(restarted))
            back_listening.append(load.first_ok_after(listened))
            # Recovery runs before anything starts: the old copies are gone by now.
            orphans += len(before & {p for ps in site.tenants().values() for p in ps})
            time.sleep(1.5)  # under load for a while before the next kill
        ok = sum(1 for _, good in load.results if good)
    took = site.stop_within(proc, limit=DRAIN + STOP_TIMEOUT + 2)
    figure(
        "kill-9 x5 under 20 clients",
        requests=len(load.results),
        ok=ok,
        orphans=orphans,
        most_copies=copies.most,
        back_after_restart_max_s=max(back),
        back_after_listening_max_s=max(back_listening),
        sigterm_exit_s=took,
    )
    assert orphans == 0
    assert copies.most == 1, copies.seen
    assert max(back_listening) <= 2.0
    assert site.tenants() == {}


@pytest.mark.parametrize("fault", ["locked-database", "full-disk", "streaming-client"])
def test_sigterm_under_a_fault_is_bounded(short_tmp: Path, fault: str) -> None:
    disk = None
    if fault == "full-disk":
        if not can_mount():
            pytest.skip("needs root to mount a small tmpfs")
        disk = FullDisk(short_tmp / "data")
    site = Site(short_tmp, CONFIG, TENEMENT_DRAIN_TIMEOUT=str(DRAIN))
    try:
        proc = site.serve()
        site.wait_states(dict.fromkeys(TENANTS, "running"))
        with contextlib.ExitStack() as faults, Load(site, clients=5):
            time.sleep(0.5)
            if fault == "locked-database":
                faults.enter_context(locked_database(site))
            elif disk is not None:
                disk.fill()
            else:
                faults.enter_context(contextlib.closing(stream(site, "app:t1")))
            took = site.stop_within(proc, limit=DRAIN + STOP_TIMEOUT + 2)
        figure(f"SIGTERM with {fault}", exit_s=took, code=proc.returncode)
        assert proc.returncode == 0
        assert site.tenants() == {}
    finally:
        site.cleanup()
        if disk is not None:
            disk.unmount()


def stream(site: Site, key: str) -> object:
    import socket

    service, instance_id = key.split(":")
    conn = socket.create_connection(("127.0.0.1", site.port), timeout=10)
    conn.sendall(f"GET /hold HTTP/1.1\r\nHost: {instance_id}.{service}.localhost\r\n\r\n".encode())
    assert conn.recv(4096).startswith(b"HTTP/1.1 200")
    return conn


OUTAGE = 30.0


def test_sqlite_locked_for_30s(site: Site) -> None:
    proc = site.serve()
    site.wait_states(dict.fromkeys(TENANTS, "running"))
    site.register("slow:w1", "slow:w2")
    with Load(site, clients=4) as load:
        with locked_database(site):
            began = time.monotonic()
            woken = [wake_timed(site, "slow:w1")]
            # A log line during the outage, from a tenant the load does not flood (the
            # load's request lines would push it past log retention soon after).
            assert get(site, "slow:w1", "/stderr")[0] == 200
            time.sleep(OUTAGE / 2)
            woken.append(wake_timed(site, "slow:w2"))
            time.sleep(max(0.0, OUTAGE - (time.monotonic() - began)))
            during = [ok for at, ok in load.results if began <= at]
        unlocked = time.monotonic()
        caught_up = site.wait_for(
            "the mirror to catch up",
            lambda: all(
                site.rows()[k]["state"] == "running" for k in ["slow:w1", "slow:w2", *TENANTS]
            ),
            timeout=30,
        )
        site.wait_for("the outage's log line", lambda: logged(site, "slow:w1", "to stderr"), 30)
    figure(
        "SQLite locked 30 s",
        requests=len(during),
        ok_share=sum(during) / max(1, len(during)),
        wakes=",".join(f"{s}:{t:.2f}s" for s, t in woken),
        mirror_caught_up_s=caught_up,
    )
    assert during and all(during)
    assert all(status == 200 for status, _ in woken)
    assert time.monotonic() - unlocked < 30
    site.stop_within(proc, limit=DRAIN + STOP_TIMEOUT + 2)
    assert site.tenants() == {}


def logged(site: Site, key: str, text: str) -> bool:
    service, instance_id = key.split(":")
    rows = site.query(
        "SELECT COUNT(*) FROM instances_logline l JOIN instances_instance i ON i.id ="
        " l.instance_id JOIN instances_service s ON s.id = i.service_id WHERE s.name = ?"
        " AND i.instance_id = ? AND l.text = ?",
        service,
        instance_id,
        text,
    )
    return rows[0][0] > 0


def wake_timed(site: Site, key: str) -> tuple[int, float]:
    began = time.monotonic()
    status, _ = get(site, key, timeout=15)
    return status, time.monotonic() - began


Answer = tuple[int, str, float]


def hold_many(site: Site, key: str, n: int) -> list[concurrent.futures.Future[Answer]]:
    pool = concurrent.futures.ThreadPoolExecutor(n)

    def one() -> Answer:
        began = time.monotonic()
        try:
            status, body = get(site, key, timeout=20)
        except OSError as e:
            status, body = 0, repr(e)
        return status, body, time.monotonic() - began

    futures = [pool.submit(one) for _ in range(n)]
    pool.shutdown(wait=False)
    return futures


@pytest.mark.parametrize("race", ["operator-stop", "deregistration", "supervisor-restart"])
def test_wake_racing(site: Site, race: str) -> None:
    proc = site.serve()
    site.register("slow:w")
    held = hold_many(site, "slow:w", 10)
    site.wait_states({"slow:w": "starting"}, timeout=20)
    if race == "operator-stop":
        assert site.manage("stop", "slow:w", "--no-wait").returncode == 0
    elif race == "deregistration":
        site.sql(
            "DELETE FROM instances_instance WHERE instance_id = 'w' AND service_id ="
            " (SELECT id FROM instances_service WHERE name = 'slow')"
        )
    else:
        site.stop_within(proc, limit=DRAIN + STOP_TIMEOUT + 2)
        proc = site.serve()
    answers = [f.result(timeout=30) for f in held]
    figure(
        f"wake racing {race}",
        answers=",".join(sorted({str(s) for s, _, _ in answers})),
        slowest_s=max(t for _, _, t in answers),
    )
    for status, body, took in answers:
        assert took < 10  # wake_timeout
        if race == "supervisor-restart":
            assert status in (200, 503) or status == 0  # 0: cut by the restart
        else:
            assert status == 503 and (
                "stopped by the operator" in body
                or "deregistered" in body
                or "not registered" in body
            ), body
    if race == "operator-stop":
        time.sleep(2)
        assert site.rows()["slow:w"]["state"] == "stopped"
        assert "slow:w" not in site.tenants()
    elif race == "deregistration":
        site.wait_for("no process", lambda: "slow:w" not in site.tenants(), timeout=10)
    else:
        site.wait_for("one copy", lambda: len(site.tenants().get("slow:w", [])) <= 1, 10)


def test_postgresql_stopped_for_30s(short_tmp: Path) -> None:
    try:
        from tests import postgres

        pg = postgres.controllable_cluster()
        cluster = pg.__enter__()
    except RuntimeError as e:
        pytest.skip(str(e))
    site = Site(short_tmp, CONFIG, TENEMENT_DRAIN_TIMEOUT=str(DRAIN))
    try:
        url = postgres.create_database(cluster.url, "tenement_chaos")
        site.env["DATABASE_URL"] = url
        proc = site.serve()
        site.register("slow:w1")
        site.wait_for("all running", lambda: pg_states(url, TENANTS) == ["running"] * 4, 30)
        with Load(site, clients=4) as load:
            site.wait_for("requests to succeed", lambda: load.first_ok_after(0) is not None)
            cluster.stop_immediately()
            began = time.monotonic()
            woken = wake_timed(site, "slow:w1")
            time.sleep(max(0.0, OUTAGE - (time.monotonic() - began)))
            during = [ok for at, ok in load.results if began <= at]
            cluster.start()
            try:
                caught_up = site.wait_for(
                    "the mirror to catch up",
                    lambda: pg_states(url, ["slow:w1", *TENANTS]) == ["running"] * 5,
                    timeout=30,
                )
            except AssertionError:
                states = pg_states(url, ["slow:w1", *TENANTS])
                raise AssertionError(f"wake: {woken}, states: {states}") from None
        figure(
            "PostgreSQL stopped 30 s",
            requests=len(during),
            ok_share=sum(during) / max(1, len(during)),
            wake=f"{woken[0]}:{woken[1]:.2f}s",
            mirror_caught_up_s=caught_up,
        )
        assert during and all(during)
        assert woken[0] == 200
        site.stop_within(proc, limit=DRAIN + STOP_TIMEOUT + 2)
        assert site.tenants() == {}
    finally:
        site.cleanup()
        pg.__exit__(None, None, None)


def pg_states(url: str, keys: list[str]) -> list[str]:
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=2) as conn:
            rows = dict(
                conn.execute(
                    "SELECT s.name || ':' || i.instance_id, i.state FROM instances_instance i"
                    " JOIN instances_service s ON s.id = i.service_id"
                ).fetchall()
            )
    except psycopg.Error:
        return []
    return [rows.get(k, "") for k in keys]
