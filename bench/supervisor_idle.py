"""Supervisor footprint at idle, side by side with upstream `ten` 0.2.2, in one run.

ours:     runsupervisor with 1,000 registered tenants, 20 of them running
upstream: `ten serve` with 20 running instances (it has no registered-but-stopped tenants)

Both run the same kind of stdlib Python app with health checks every 10 s. We report the
supervisor process's RSS and its CPU use while nothing happens (median of several
windows), and how long a start takes to pass the readiness gate.

    python bench/supervisor_idle.py [--windows 3] [--window-seconds 10] [--ten PATH]

`ten` is looked up at $TEN, then bench/.ten-venv/bin/ten; it is installed there with
`python3 -m venv bench/.ten-venv && bench/.ten-venv/bin/pip install tenement==0.2.2`
(a separate project, never a dependency of ours).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import signal
import sqlite3
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
from common import MANAGE, PYTHON, REPO, find_ten, log, register_ours, running_count, wait_for

APP = REPO / "examples" / "apps" / "counter.py"
TCP_APP = REPO / "bench" / "apps" / "tcp_app.py"
TENANTS = 1000
RUNNING = 20


def idle_cpu(proc: psutil.Process, windows: int, seconds: float) -> tuple[float, float]:
    """Median CPU % of one core over `windows` windows, and the RSS in MiB after them."""
    samples = []
    for i in range(windows):
        before = sum(proc.cpu_times()[:2])
        time.sleep(seconds)
        samples.append((sum(proc.cpu_times()[:2]) - before) / seconds * 100)
        log(f"  window {i + 1}/{windows}: {samples[-1]:.2f}% CPU")
    return statistics.median(samples), proc.memory_info().rss / 2**20


@contextlib.contextmanager
def ours(root: Path, isolation: str) -> Iterator[tuple[psutil.Process, list[float]]]:
    root.mkdir()
    data = root / "data"
    config = root / "tenement.toml"
    ids = [f"t{i:04d}" for i in range(TENANTS)]
    config.write_text(
        f'[service.app]\ncommand = "{PYTHON} {APP}"\nhealth = "/health"\n'
        f'isolation = "{isolation}"\n[instances]\napp = {json.dumps(ids)}\n'
    )
    config.chmod(0o600)  # tenants under isolation = "process" could read it otherwise
    manage = MANAGE
    log(f"ours: registering {TENANTS} tenants")
    register_ours(config, data, ids[:RUNNING])
    proc = subprocess.Popen(
        [*manage, "runsupervisor", "--no-http", "--data-dir", str(data)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for("20 running", lambda: running_count(data) == RUNNING)
        yield psutil.Process(proc.pid), lambda: sequential_starts(manage, data, ids)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def sequential_starts(manage: list[str], data: Path, ids: list[str]) -> list[float]:
    """Start 10 sleeping tenants one at a time; the supervisor's spawn-to-ready times."""
    started = ids[RUNNING : RUNNING + 10]
    for instance_id in started:
        subprocess.run(
            [*manage, "spawn", f"app:{instance_id}", "--data-dir", str(data)],
            check=True,
            capture_output=True,
        )
    with contextlib.closing(sqlite3.connect(data / "tenement.sqlite3", timeout=10)) as conn:
        rows = conn.execute(
            "SELECT e.message FROM instances_event e JOIN instances_instance i "
            "ON i.id = e.instance_id WHERE e.kind='ready' AND i.instance_id IN "
            f"({','.join('?' * len(started))})",
            started,
        ).fetchall()
    return [float(re.search(r"ready in (\d+) ms", m).group(1)) for (m,) in rows]


@contextlib.contextmanager
def upstream(root: Path, ten: str) -> Iterator[tuple[psutil.Process, list[float]]]:
    (root / "tenement.toml").write_text(
        f'[settings]\ndata_dir = "{root}/data"\n'
        f'[service.app]\ncommand = "{PYTHON} {TCP_APP}"\nhealth = "/health"\n'
        # ten's Linux default, "namespace", unshares a PID namespace in which the threaded
        # tcp_app cannot start threads; its health checks would then fail.
        'idle_timeout = 0\nisolation = "process"\n'
    )
    server = ["--server", "http://127.0.0.1:18089"]
    proc = subprocess.Popen(
        [ten, "serve", "--port", "18089", "--domain", "localhost"],
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1.5)
        subprocess.run([ten, "token-gen"], cwd=root, check=True, capture_output=True)
        spawn_times = []
        for i in range(RUNNING):
            started = time.monotonic()
            subprocess.run(
                [ten, *server, "spawn", f"app:t{i:04d}"], cwd=root, check=True, capture_output=True
            )
            spawn_times.append((time.monotonic() - started) * 1000)
        yield psutil.Process(proc.pid), lambda: spawn_times
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--window-seconds", type=float, default=10)
    parser.add_argument("--ten", help="path to the upstream ten binary")
    parser.add_argument(
        "--isolation",
        default="namespace",
        choices=["process", "namespace"],
        help="our tenants' isolation level (default namespace, our default)",
    )
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="tb", dir="/tmp") as tmp:
        Path(tmp).chmod(0o711)  # tenants' own uids pass through to their data dirs
        with ours(Path(tmp) / "ours", args.isolation) as (proc, starts):
            log("ours: settling 3 s, then measuring")
            time.sleep(3)
            cpu, rss = idle_cpu(proc, args.windows, args.window_seconds)
            log("ours: 10 sequential starts")
            ready = statistics.median(starts())
            results["ours"] = (
                cpu,
                rss,
                ready,
                f"{TENANTS} registered, {RUNNING} running, isolation {args.isolation}",
            )
        ten = find_ten(args.ten)
        if ten:
            (Path(tmp) / "up").mkdir()
            with upstream(Path(tmp) / "up", ten) as (proc, spawns):
                log("upstream: settling 3 s, then measuring")
                time.sleep(3)
                cpu, rss = idle_cpu(proc, args.windows, args.window_seconds)
                results["upstream ten 0.2.2"] = (
                    cpu,
                    rss,
                    statistics.median(spawns()),
                    f"{RUNNING} running",
                )
        else:
            log("upstream ten not found; install it (see --help) for the side-by-side row")
    print(
        "| supervisor | tenants | idle CPU (median, % of one core) | RSS (MiB) | start to ready "
        "(median ms) |"
    )
    print("|---|---|---|---|---|")
    for name, (cpu, rss, ready_ms, tenants) in results.items():
        print(f"| {name} | {tenants} | {cpu:.2f} | {rss:.0f} | {ready_ms:.0f} |")
    if len(results) == 2:
        o, u = results["ours"], results["upstream ten 0.2.2"]
        cpu_ratio = f"{o[0] / u[0]:.1f}x" if u[0] > 0 else "n/a (upstream rounds to 0)"
        print(f"\nratio ours/upstream: RSS {o[1] / u[1]:.2f}x, idle CPU {cpu_ratio}")
    print(
        "\nstart to ready: ours is the supervisor's spawn-to-first-healthy-check time for 10 "
        "tenants started one at a time; upstream's is the wall time of `ten spawn` (which may "
        "return before the app is healthy), so the two are not directly comparable. The "
        "like-for-like cold-wake comparison belongs to the proxy benchmark."
    )


if __name__ == "__main__":
    main()
