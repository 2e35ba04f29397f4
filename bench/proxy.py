"""Proxy benchmark: Debian's nginx, upstream `ten` 0.2.2 and ours, side by side in one run.

    python bench/proxy.py [--seconds 10] [--repeat 3] [--only PEER,...,MEASUREMENT,...]

Every peer proxies to the same app, bench/apps/fast_app.py (stdlib asyncio, HTTP/1.1
keep-alive, `200 ok`), run by the same interpreter. Load goes to 127.0.0.1 only.

  nginx  Debian's nginx, 1 worker, `proxy_pass` to one fast_app on a Unix socket through an
         `upstream` block with `keepalive 64` (HTTP/1.1, `Connection ""`). It cannot wake
         anything, so it has no wake figures.
  ten    upstream tenement 0.2.2 (Rust), `pip install tenement==0.2.2` into bench/.ten-venv
         (its own venv, installed on first use; never a dependency of ours), run as
         `ten serve --port P --domain localhost` in a folder holding its tenement.toml.
  ours   `manage.py runsupervisor --bind 127.0.0.1:P --data-dir D` (with `--config X` for
         the 1-tenant run; the 1,000-tenant run registers them with `loadconfig` first).

Measurements (medians over --repeat runs):
  warm      req/s with `wrk -t2 -c32`; p50/p99 with `wrk -t1 -c1 --latency`; running tenant
  cold      stop a tenant (`ten stop` / `manage.py stop`), time one request; also as a
            multiple of fast_app's own spawn-to-first-200 on a socket (median of --starts)
  burst     500 concurrent requests to one sleeping tenant: copies of the app started
            (each start appends to a spawn log), errors, p50 and max latency
  many      100 sleeping tenants, one request each, all at once: p95 latency, errors
  registry  req/s (wrk -c32) with 1,000 registered tenants against 1 registered (ours)
A sleeping tenant is, for ours, registered and stopped; for ten, one never started (the
state `ten stop` leaves too: it forgets the instance). --keep keeps the logs.

How upstream ten 0.2.2 works (found by running it, `ten --help`, the README in its wheel's
METADATA and the config keys in its binary):
- Verbs: serve (-p/--port, default 8080, binds 0.0.0.0; -d/--domain, default localhost;
  --tls), spawn/stop/restart/health SERVICE:ID, weight SERVICE:ID 0-100, ps, logs [-f],
  deploy, route --from --to, init, config, token-gen, install/uninstall (systemd), caddy.
  The verbs are REST clients of `serve` (--server URL; token from DATA_DIR/api_token, which
  `ten token-gen` writes into the database directly).
- Config: ./tenement.toml. [settings] data_dir, health_check_interval, max_restarts,
  restart_window, backoff_base_ms, backoff_max_ms, [settings.tls]; [service.NAME] command,
  socket, health, env, workdir, restart, isolation, idle_timeout, startup_timeout,
  request_timeout, memory_limit_mb, cpu_shares, storage_persist (and VM keys: kernel,
  rootfs, memory_mb, vcpus, vsock_port); [routing]; [instances]. Unknown keys: ignored.
- Routing: Host `{id}.{service}.{domain}` on the serve port, to the instance's TCP port.
  Each start takes the next port from 30000 up and passes it as PORT (it also sets
  SOCKET_PATH=/tmp/tenement/{name}-{id}.sock, unused for proxying, hence fast_app --tcp),
  with ten's whole environment.
- No registry: a request for any id of a configured service that is not running spawns it
  and waits until its port accepts a connection (not until `health` passes), then
  forwards; no port within startup_timeout (10 s): 503. `ten stop` removes the instance;
  the next request spawns it again. idle_timeout stops it after that many idle seconds,
  checked coarsely (an idle_timeout of 2 s stopped it 14-20 s after the last request).
  So "1,000 registered" cannot be expressed without 1,000 running processes: no registry row.
- Default isolation on Linux is "namespace" (the app unshares a PID namespace, so Python
  then fails to start threads or fork); we set isolation = "process", like ours. Without
  `health`, ten restarted our TCP-only app every ~8 s (it seems to probe SOCKET_PATH); we
  set health = "/health".
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import http.client
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from common import (
    MANAGE,
    PYTHON,
    REPO,
    become_subreaper,
    ensure_ten,
    free_port,
    kill_descendants,
    log,
    process_group,
    register_ours,
)

FAST_APP = REPO / "bench" / "apps" / "fast_app.py"
PEERS = ("nginx", "ten", "ours")
MEASUREMENTS = ("warm", "cold", "burst", "many", "registry")
BURST = 500
MANY = 100
REGISTERED = 1000
REQUEST_TIMEOUT = 60.0

NGINX_CONF = """\
{user}worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {root}/nginx-body;
  proxy_temp_path {root}/nginx-proxy;
  upstream app {{ server unix:{sock}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For $remote_addr;
    }}
  }}
}}
"""


class PeerError(RuntimeError):
    """A peer could not be set up or measured; the others still run."""


@dataclass
class Run:
    args: argparse.Namespace
    root: Path
    spawn_log: Path
    peers: list[str]
    measurements: list[str]
    results: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def record(self, peer: str, key: str, value: float) -> None:
        self.results.setdefault(peer, {}).setdefault(key, []).append(value)

    def wants(self, *measurements: str) -> bool:
        return any(m in self.measurements for m in measurements)

    def spawns(self, tag: str) -> int:
        if not self.spawn_log.exists():
            return 0
        return sum(line.split()[0] == tag for line in self.spawn_log.read_text().splitlines())

    def app_command(self, *extra: str) -> str:
        return " ".join([PYTHON, str(FAST_APP), *extra, "--spawn-log", str(self.spawn_log)])


def host(tenant: str) -> str:
    return f"{tenant}.app.localhost"


# ---- clients ---------------------------------------------------------------------------


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


APP_BODY = b"ok\n"


def get(conn: http.client.HTTPConnection, host_header: str) -> tuple[int, bytes]:
    conn.request("GET", "/", headers={"Host": host_header})
    response = conn.getresponse()
    return response.status, response.read()


def app_answered(conn: http.client.HTTPConnection, host_header: str) -> bool:
    """The app's own `200 ok`, not just any 200 (a control page would also be one)."""
    return get(conn, host_header) == (200, APP_BODY)


def fetch(port: int, tenant: str, timeout: float = REQUEST_TIMEOUT) -> tuple[int, bytes] | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        return get(conn, host(tenant))
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def wait_http(port: int, tenant: str, timeout: float, what: str) -> None:
    """Until the app answers through the peer; give up early on 20 s of other answers."""
    deadline = time.monotonic() + timeout
    wrong_since = None
    while (answer := fetch(port, tenant, timeout=5)) != (200, APP_BODY):
        now = time.monotonic()
        wrong_since = (wrong_since or now) if answer else None
        if now > deadline or (wrong_since and now - wrong_since > 20):
            got = f"{answer[0]} {answer[1][:40]!r}" if answer else "no answer"
            raise PeerError(
                f"{what}: Host {host(tenant)} on 127.0.0.1:{port} does not reach the app "
                f"(last answer: {got})"
            )
        time.sleep(0.2)


def timed_get(port: int, tenant: str) -> tuple[float, bool]:
    """One request on a fresh connection: (milliseconds, answered 200)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT)
    started = time.perf_counter()
    try:
        ok = app_answered(conn, host(tenant))
    except (OSError, http.client.HTTPException):
        ok = False
    finally:
        conn.close()
    return (time.perf_counter() - started) * 1000, ok


def concurrent_gets(port: int, tenants: list[str]) -> tuple[list[float], int]:
    """One request per entry, all sent at once (connect first, then a barrier).

    Returns the milliseconds of the successful ones and the number of errors.
    """
    barrier = threading.Barrier(len(tenants), timeout=REQUEST_TIMEOUT)

    def one(tenant: str) -> float | None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT)
        try:
            conn.connect()
            barrier.wait()
            started = time.perf_counter()
            if app_answered(conn, host(tenant)):
                return (time.perf_counter() - started) * 1000
            return None
        except (OSError, http.client.HTTPException, threading.BrokenBarrierError):
            barrier.abort()  # the others must not wait for a connection that failed
            return None
        finally:
            conn.close()

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(tenants)) as pool:
        outcomes = list(pool.map(one, tenants, timeout=3 * REQUEST_TIMEOUT))
    times = [t for t in outcomes if t is not None]
    return times, len(outcomes) - len(times)


def wrk(port: int, tenant: str, connections: int, seconds: float) -> dict[str, float]:
    threads = 2 if connections > 1 else 1
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s"]
    cmd += ["--latency", "-H", f"Host: {host(tenant)}", f"http://127.0.0.1:{port}/"]
    out = subprocess.run(
        cmd, capture_output=True, text=True, check=True, timeout=seconds + 60
    ).stdout
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    errors = int(non_2xx.group(1)) if non_2xx else 0
    errors += sum(map(int, socket_errors.groups())) if socket_errors else 0
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50": _latency_ms(out, "50%"),
        "p99": _latency_ms(out, "99%"),
        "errors": errors,
    }


def _latency_ms(out: str, percentile: str) -> float:
    value, unit = re.search(rf"{percentile}\s+([\d.]+)(us|ms|s)\b", out).groups()
    return float(value) * {"us": 0.001, "ms": 1, "s": 1000}[unit]


# ---- measurements ----------------------------------------------------------------------


def measure_warm(run: Run, peer: str, port: int, key: str = "") -> None:
    """wrk at 32 connections (and, unless `key`, at 1 for latency), --repeat times."""
    log(f"{peer}: warm-up")
    wrk(port, "alice", 32, 2)
    for i in range(run.args.repeat):
        loaded = wrk(port, "alice", 32, run.args.seconds)
        run.record(peer, f"rps{key}", loaded["rps"])
        run.record(peer, f"warm_errors{key}", loaded["errors"])
        line = f"{peer}{key}: run {i + 1}: {loaded['rps']:.0f} req/s"
        if not key:
            single = wrk(port, "alice", 1, run.args.seconds)
            run.record(peer, "p50", single["p50"])
            run.record(peer, "p99", single["p99"])
            run.record(peer, "warm_errors", single["errors"])
            line += f", p50 {single['p50']:.3f} ms, p99 {single['p99']:.2f} ms at 1 connection"
        log(line + f", errors {loaded['errors']}")


def measure_cold(run: Run, peer: str, port: int, stop: Callable[[str], None]) -> None:
    wait_http(port, "cold", REQUEST_TIMEOUT, peer)
    for i in range(run.args.repeat):
        stop("cold")
        time.sleep(0.5)
        ms, ok = timed_get(port, "cold")
        if ok:
            run.record(peer, "cold_ms", ms)
        else:
            run.record(peer, "cold_errors", 1)
        log(f"{peer}: cold wake {i + 1}: {ms:.0f} ms{'' if ok else ' (FAILED)'}")


def measure_burst(run: Run, peer: str, port: int) -> None:
    for i in range(run.args.repeat):
        tenant = f"burst{i}"
        # The spawn log is shared by every peer (they use the same tenant names): count
        # only the starts this burst caused.
        before = run.spawns(tenant)
        times, errors = concurrent_gets(port, [tenant] * BURST)
        time.sleep(1)  # a late duplicate start would log itself within this second
        spawns = run.spawns(tenant) - before
        run.record(peer, "burst_spawns", spawns)
        run.record(peer, "burst_errors", errors)
        if times:
            run.record(peer, "burst_p50", statistics.median(times))
            run.record(peer, "burst_max", max(times))
        log(f"{peer}: burst {i + 1}: {BURST} requests, {spawns} starts, {errors} errors")


def measure_many(run: Run, peer: str, port: int) -> None:
    for i in range(run.args.repeat):
        times, errors = concurrent_gets(port, many_tenants(i))
        run.record(peer, "many_errors", errors)
        if len(times) >= 2:
            run.record(peer, "many_p95", statistics.quantiles(times, n=20)[18])
        p95 = f"p95 {statistics.quantiles(times, n=20)[18]:.0f} ms" if len(times) >= 2 else ""
        log(f"{peer}: {MANY} tenants at once {i + 1}: {p95}, {errors} errors")


def many_tenants(repeat: int) -> list[str]:
    return [f"m{repeat}-{j:03d}" for j in range(MANY)]


def raw_start(run: Run) -> None:
    """fast_app alone, --starts times in a row: spawn on a socket, time the first 200."""
    for i in range(run.args.starts):
        proc, ms = start_app(run.root / f"raw{i}.sock", poll=0.001)
        _stop(proc)
        run.record("app", "raw_start_ms", ms)
    median = statistics.median(run.results["app"]["raw_start_ms"])
    log(f"app alone: start to first 200, median {median:.0f} ms")


def raw_many(run: Run) -> None:
    """fast_app alone, MANY copies started at once: the floor for the `many` figure."""
    paths = [run.root / f"many{i}.sock" for i in range(MANY)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=MANY) as pool:
        started = list(pool.map(lambda path: start_app(path, poll=0.005), paths, timeout=120))
    for proc, _ in started:
        _stop(proc)
    p95 = statistics.quantiles([ms for _, ms in started], n=20)[18]
    run.record("app", "raw_many_p95", p95)
    log(f"app alone: {MANY} started at once, start to first 200 p95 {p95:.0f} ms")


def start_app(path: Path, poll: float) -> tuple[subprocess.Popen[bytes], float]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SOCKET_PATH": str(path)}
    started = time.perf_counter()
    proc = subprocess.Popen([PYTHON, str(FAST_APP)], env=env, start_new_session=True)
    while not _answers(path):
        if proc.poll() is not None or time.perf_counter() - started > 60:
            _stop(proc)
            raise PeerError("fast_app did not start on its own")
        time.sleep(poll)
    return proc, (time.perf_counter() - started) * 1000


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _answers(path: Path) -> bool:
    conn = UnixHTTPConnection(str(path), timeout=1)
    try:
        return app_answered(conn, "localhost")
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


# ---- peers -----------------------------------------------------------------------------


def bench_nginx(run: Run) -> None:
    if not run.wants("warm"):
        return
    root = run.root / "nginx"
    root.mkdir()
    sock, port = root / "app.sock", free_port()
    user = "user root;\n" if os.getuid() == 0 else ""
    conf = root / "nginx.conf"
    conf.write_text(NGINX_CONF.format(user=user, root=root, sock=sock, port=port))
    env = {"PATH": os.environ.get("PATH", ""), "SOCKET_PATH": str(sock)}
    app = [PYTHON, str(FAST_APP)]
    with (
        process_group(app, env=env),
        process_group([find_tool("nginx"), "-c", str(conf), "-p", str(root)]),
    ):
        wait_http(port, "alice", 15, "nginx")
        measure_warm(run, "nginx", port)


def bench_ten(run: Run) -> None:
    ten = ensure_ten(run.args.ten)
    root = run.root / "ten"
    root.mkdir()
    port = free_port()
    command = run.app_command("--tcp", "--tag", "{id}")
    (root / "tenement.toml").write_text(
        f"[settings]\ndata_dir = {json.dumps(str(root / 'data'))}\n\n"
        f'[service.app]\ncommand = {json.dumps(command)}\nhealth = "/health"\n'
        'isolation = "process"\nidle_timeout = 3600\n'
    )
    server = f"http://127.0.0.1:{port}"

    def stop(tenant: str) -> None:
        cli = [ten, "--server", server, "stop", f"app:{tenant}"]
        subprocess.run(cli, cwd=root, check=True, capture_output=True, timeout=30)

    serve = [ten, "serve", "--port", str(port), "--domain", "localhost"]
    with process_group(serve, cwd=root, log_file=root / "serve.log", grace=30):
        wait_http(port, "alice", 30, "ten")
        subprocess.run([ten, "token-gen"], cwd=root, check=True, capture_output=True, timeout=30)
        peer_measurements(run, "ten", port, stop)


def bench_ours(run: Run) -> None:
    if run.wants("warm", "registry"):
        ours_one_tenant(run)
    if run.wants("registry", "cold", "burst", "many"):
        ours_many_tenants(run)


def ours_config(run: Run, tenants: list[str]) -> str:
    command = run.app_command("--tag", "{id}")
    return (
        f'[service.app]\ncommand = {json.dumps(command)}\nhealth = "/health"\n'
        # The wake's own mechanics, like ten's "process" run; bench/isolation.py has the rest.
        'isolation = "process"\n'
        f"idle_timeout = 3600\n\n[instances]\napp = {json.dumps(tenants)}\n"
    )


@contextlib.contextmanager
def supervisor(run: Run, root: Path, *extra: str) -> Iterator[int]:
    port = free_port()
    cmd = [
        *MANAGE,
        "runsupervisor",
        "--bind",
        f"127.0.0.1:{port}",
        "--data-dir",
        str(root / "data"),
    ]
    log_file = root / "runsupervisor.log"
    with process_group([*cmd, *extra], cwd=REPO, log_file=log_file, grace=120):
        try:
            wait_http(port, "alice", 120, "ours (runsupervisor)")
        except PeerError:
            tail = log_file.read_text(errors="replace").splitlines()[-15:]
            log("ours: last lines of runsupervisor's output:\n  " + "\n  ".join(tail))
            raise
        yield port


def ours_one_tenant(run: Run) -> None:
    root = run.root / "ours-1"
    root.mkdir()
    (root / "tenement.toml").write_text(ours_config(run, ["alice"]))
    with supervisor(run, root, "--config", str(root / "tenement.toml")) as port:
        measure_warm(run, "ours", port)


def ours_many_tenants(run: Run) -> None:
    root = run.root / "ours-1000"
    root.mkdir()
    wakes = ["cold"] + [f"burst{i}" for i in range(run.args.repeat)]
    wakes += [t for i in range(run.args.repeat) for t in many_tenants(i)]
    fillers = [f"f{i:04d}" for i in range(max(0, REGISTERED - 1 - len(wakes)))]
    tenants = ["alice", *wakes, *fillers]
    (root / "tenement.toml").write_text(ours_config(run, tenants))
    log(f"ours: registering {len(tenants)} tenants (only alice running)")
    register_ours(root / "tenement.toml", root / "data", ["alice"])
    data = str(root / "data")

    def stop(tenant: str) -> None:
        cli = [*MANAGE, "stop", f"app:{tenant}", "--data-dir", data]
        subprocess.run(cli, cwd=REPO, check=True, capture_output=True, timeout=60)

    # No --config here: it would start every [instances] tenant; they are registered already.
    with supervisor(run, root) as port:
        if run.wants("registry"):
            measure_warm(run, "ours", port, key="_1000")
        peer_measurements(run, "ours", port, stop, warm=False)


def peer_measurements(
    run: Run, peer: str, port: int, stop: Callable[[str], None], warm: bool = True
) -> None:
    if warm and run.wants("warm"):
        measure_warm(run, peer, port)
    if run.wants("cold"):
        measure_cold(run, peer, port, stop)
    if run.wants("burst"):
        measure_burst(run, peer, port)
    if run.wants("many"):  # last: it leaves 100 x --repeat apps running
        measure_many(run, peer, port)


# ---- report ----------------------------------------------------------------------------


@dataclass
class Row:
    label: str
    key: str
    fmt: str
    agg: Callable[[list[float]], float] = statistics.median


def rows(run: Run) -> list[Row]:
    raw = run.results.get("app", {}).get("raw_start_ms")
    raw_label = f"{statistics.median(raw):.0f} ms" if raw else "not measured"
    many = run.results.get("app", {}).get("raw_many_p95")
    many_label = (
        f"{MANY} direct starts at once: p95 {statistics.median(many):.0f} ms"
        if many
        else "not measured"
    )
    return [
        Row("warm req/s (wrk -t2 -c32)", "rps", "{:.0f}"),
        Row("warm p50 ms (wrk -c1)", "p50", "{:.3f}"),
        Row("warm p99 ms (wrk -c1)", "p99", "{:.2f}"),
        Row("warm errors (non-2xx + socket, all runs)", "warm_errors", "{:.0f}", sum),
        Row("cold wake ms (stop, then one request)", "cold_ms", "{:.0f}"),
        Row(f"cold wake ÷ app's own start ({raw_label})", "cold_x_raw", "{:.2f}"),
        Row("cold wake errors (all runs)", "cold_errors", "{:.0f}", sum),
        Row(
            f"burst: app starts for {BURST} concurrent requests (worst run)",
            "burst_spawns",
            "{:.0f}",
            max,
        ),
        Row("burst: errors (all runs)", "burst_errors", "{:.0f}", sum),
        Row("burst: p50 ms", "burst_p50", "{:.0f}"),
        Row("burst: max ms", "burst_max", "{:.0f}"),
        Row(f"{MANY} sleeping tenants at once: p95 ms", "many_p95", "{:.0f}"),
        Row(f"{MANY} at once: p95 ÷ the app's own ({many_label})", "many_x_raw", "{:.2f}"),
        Row(f"{MANY} sleeping tenants at once: errors (all runs)", "many_errors", "{:.0f}", sum),
        Row(f"req/s with {REGISTERED:,} registered (wrk -c32)", "rps_1000", "{:.0f}"),
        Row(f"errors with {REGISTERED:,} registered (all runs)", "warm_errors_1000", "{:.0f}", sum),
        Row(f"req/s with {REGISTERED:,} registered ÷ with 1", "registry_x", "{:.2f}"),
    ]


def derive(run: Run) -> None:
    """Figures computed from others: multiples of the app's own start, registry ratio."""
    raw = run.results.get("app", {}).get("raw_start_ms")
    many_floor = run.results.get("app", {}).get("raw_many_p95")
    for res in run.results.values():
        if many_floor and res.get("many_p95"):
            res["many_x_raw"] = [statistics.median(res["many_p95"]) / statistics.median(many_floor)]
        if raw and res.get("cold_ms"):
            res["cold_x_raw"] = [statistics.median(res["cold_ms"]) / statistics.median(raw)]
        if res.get("rps_1000") and res.get("rps"):
            res["registry_x"] = [statistics.median(res["rps_1000"]) / statistics.median(res["rps"])]


def value(run: Run, peer: str, row: Row) -> float | None:
    values = run.results.get(peer, {}).get(row.key)
    return row.agg(values) if values else None


def report(run: Run) -> None:
    derive(run)
    peers = [p for p in PEERS if p in run.peers]
    names = {"nginx": "nginx (Debian)", "ten": "ten 0.2.2", "ours": "ours"}
    ratios = [p for p in ("nginx", "ten") if p in peers and "ours" in peers]
    head = ["measurement", *(names[p] for p in peers), *(f"ours ÷ {p}" for p in ratios)]
    print(
        f"\nMedians of {run.args.repeat} runs of {run.args.seconds:g} s; 2-core shared machine.\n"
    )
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows(run):
        cells = [value(run, p, row) for p in peers]
        if all(c is None for c in cells):
            continue
        text = [
            row.fmt.format(c) if c is not None else _missing(p, row)
            for p, c in zip(peers, cells, strict=True)
        ]
        ours = value(run, "ours", row)
        for p in ratios:
            other = value(run, p, row)
            text.append(f"{ours / other:.2f}" if ours is not None and other else "-")
        print(f"| {row.label} | " + " | ".join(text) + " |")
    if not run.results:
        print("(no figures: every selected peer failed; see the messages above)")
    print()
    for line in summary(run):
        print(line)


def _missing(peer: str, row: Row) -> str:
    if peer == "nginx" and row.key not in ("rps", "p50", "p99", "warm_errors"):
        return "n/a"
    if peer == "ten" and row.key in ("rps_1000", "warm_errors_1000", "registry_x"):
        return "n/a (no registry)"
    return "-"


def summary(run: Run) -> list[str]:
    def m(peer: str, key: str, agg: Callable[[list[float]], float] = statistics.median) -> float:
        return value(run, peer, Row("", key, "", agg)) or 0.0

    def ours_vs(key: str) -> str:
        ratios = [f"{m('ours', key) / m(p, key):.2f}x {p}" for p in ("nginx", "ten") if m(p, key)]
        return f" (ours = {', '.join(ratios)})" if m("ours", key) and ratios else ""

    lines = []
    warm = [f"{p} {m(p, 'rps'):.0f} req/s, p99 {m(p, 'p99'):.2f} ms" for p in PEERS if m(p, "rps")]
    if warm:
        lines.append("- warm: " + "; ".join(warm) + ours_vs("rps") + ".")
    cold = [
        f"{p} {m(p, 'cold_ms'):.0f} ms = {m(p, 'cold_x_raw'):.2f}x"
        for p in PEERS
        if m(p, "cold_ms")
    ]
    if cold:
        raw = m("app", "raw_start_ms")
        lines.append(f"- cold wake vs the app's own start ({raw:.0f} ms): " + "; ".join(cold) + ".")
    burst = [
        f"{p} started the app {m(p, 'burst_spawns', max):.0f} time(s) at worst, "
        f"{m(p, 'burst_errors', sum):.0f} errors"
        for p in PEERS
        if run.results.get(p, {}).get("burst_spawns")
    ]
    if burst:
        lines.append(f"- burst of {BURST} to one sleeping tenant: " + "; ".join(burst) + ".")
    many = [
        f"{p} p95 {m(p, 'many_p95'):.0f} ms = {m(p, 'many_x_raw'):.2f}x, "
        f"{m(p, 'many_errors', sum):.0f} errors"
        for p in PEERS
        if run.results.get(p, {}).get("many_errors")
    ]
    if many:
        floor = f"{MANY} direct starts at once: p95 {m('app', 'raw_many_p95'):.0f} ms"
        lines.append(
            f"- {MANY} sleeping tenants at once (vs {floor}): "
            + "; ".join(many)
            + ours_vs("many_p95")
            + "."
        )
    if m("ours", "registry_x"):
        lines.append(
            f"- registry: ours serves {m('ours', 'rps_1000'):.0f} req/s with {REGISTERED:,} "
            f"registered = {m('ours', 'registry_x'):.2f}x its 1-tenant figure "
            f"({m('ours', 'warm_errors_1000', sum):.0f} errors). ten: not measured, it has no "
            "registry (any id is spawned on demand): 1,000 tenants = 1,000 running processes."
        )
    return lines


# ---- main ------------------------------------------------------------------------------


def find_tool(name: str) -> str:
    """On PATH, or in /usr/sbin (Debian's nginx, off a non-root user's PATH)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin") or ""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--seconds", type=float, default=10, help="length of each wrk run (default 10)"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs per measurement; medians are reported (default 3)",
    )
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated subset of peers ({', '.join(PEERS)}) and/or measurements "
        f"({', '.join(MEASUREMENTS)}); default: all",
    )
    parser.add_argument(
        "--starts",
        type=int,
        default=10,
        help="direct starts of the app for the cold-wake baseline (default 10)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work folder (configs, logs, spawn log)"
    )
    parser.add_argument(
        "--ten",
        help="upstream ten (default $TEN, then bench/.ten-venv/bin/ten, installed if missing)",
    )
    args = parser.parse_args()
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = sorted(set(only) - set(PEERS) - set(MEASUREMENTS))
    if unknown:
        parser.error(
            f"--only: unknown {', '.join(unknown)}; choose from {', '.join(PEERS + MEASUREMENTS)}"
        )
    if args.repeat < 1 or args.seconds < 1 or args.starts < 1:
        parser.error("--repeat, --seconds and --starts must be at least 1")
    args.peers = [p for p in PEERS if p in only] or list(PEERS)
    args.measurements = [m for m in MEASUREMENTS if m in only] or list(MEASUREMENTS)
    return args


def main() -> None:
    args = parse_args()
    missing = [tool for tool in ("wrk", "nginx") if not find_tool(tool)]
    if missing:
        raise SystemExit(f"missing {' and '.join(missing)}: run scripts/system-deps.sh bench")
    become_subreaper()
    root = Path(tempfile.mkdtemp(prefix="tpb", dir="/tmp"))
    run = Run(args, root, root / "spawns.log", args.peers, args.measurements)
    try:
        run_all(run)
    finally:
        kill_descendants()
        if args.keep:
            log(f"work folder kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    report(run)


def run_all(run: Run) -> None:
    baselines = [raw_start] * run.wants("cold") + [raw_many] * run.wants("many")
    for baseline in baselines:
        try:
            baseline(run)
        except PeerError as e:
            log(f"app alone: FAILED: {e}")
    benches = {"nginx": bench_nginx, "ten": bench_ten, "ours": bench_ours}
    for peer in run.peers:
        log(f"--- {peer}")
        try:
            benches[peer](run)
        except (PeerError, OSError, subprocess.SubprocessError) as e:
            log(f"{peer}: FAILED: {e}")
        finally:
            if kill_descendants():
                log(f"{peer}: killed processes it left behind")


if __name__ == "__main__":
    main()
