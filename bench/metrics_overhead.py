"""Metrics overhead: our proxy with metrics on vs off, in one run; and /metrics at 1,000 tenants.

    python bench/metrics_overhead.py [--seconds 10] [--repeat 5] [--no-ten] [--no-cardinality]

Throughput: two `manage.py runsupervisor` processes, identical but for TENEMENT_METRICS
(1 and 0), each proxying to one running bench/apps/fast_app.py tenant; upstream `ten`
0.2.2 (its metrics always on) for context. `wrk -t2 -c32` against each in turn, the order
alternating every round, --repeat rounds; medians and the on/off ratio are printed. The
idle peers wait on their event loops and cost the measured one nothing measurable.

Cardinality: 1,000 registered tenants (loadconfig into a fresh data dir), then one process
per mode (TENEMENT_METRICS_PER_INSTANCE 0 and 1) that feeds every tenant through the real
recorders (one 2xx request, one 4xx, one ok wake, one idle stop, one crash restart, stdout
and stderr log lines, one open HTTP connection) and renders /metrics with the real
collectors: series count and bytes. Uptime series (per instance: one per running tenant)
are counted for 100 running tenants.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
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

from proxy import FAST_APP, wait_http, wrk

TENANTS = 1000
RUNNING = 100

CARDINALITY = """
import os, sqlite3, sys
import django
django.setup()
from django.utils import timezone
from instances import metrics
from instances.ids import InstanceKey
from instances.models import Instance
running = Instance.objects.order_by("pk").values_list("pk", flat=True)[:{running}]
Instance.objects.filter(pk__in=list(running)).update(state="running", started_at=timezone.now())
keys = [InstanceKey("app", i) for i in Instance.objects.values_list("instance_id", flat=True)]
record = metrics.request_recorder()
for key in keys:
    record(key, 200, 0.002)
    record(key, 404, 0.001)
    metrics.wake_finished(key, "ok", 0.05)
    metrics.idle_stopped(key)
    metrics.restarted(key, "crash")
    metrics.log_line_counter(key, "stdout")()
    metrics.log_line_counter(key, "stderr")()
metrics.open_connections().publish([(k, 1) for k in keys], {{}})
text = metrics.exposition().decode()
series = [l for l in text.splitlines() if l and not l.startswith("#")]
ours = [l for l in series if l.startswith("tenement_")]
print(len(series), len(ours), len(text.encode()))
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10, help="length of each wrk run")
    parser.add_argument("--repeat", type=int, default=5, help="rounds (medians; default 5)")
    parser.add_argument("--no-ten", action="store_true", help="skip upstream ten")
    parser.add_argument("--no-cardinality", action="store_true", help="skip the 1,000 tenants")
    parser.add_argument("--ten", help="upstream ten (default bench/.ten-venv/bin/ten)")
    args = parser.parse_args()
    if args.repeat < 1 or args.seconds < 1:
        parser.error("--repeat and --seconds must be at least 1")
    return args


def ours(root: Path, metrics_on: bool) -> tuple[list[str], dict[str, str]]:
    """The command and environment of one supervisor with metrics on or off."""
    folder = root / ("on" if metrics_on else "off")
    folder.mkdir()
    command = f"{PYTHON} {FAST_APP}"
    (folder / "tenement.toml").write_text(
        f'[service.app]\ncommand = {json.dumps(command)}\nhealth = "/health"\n'
        'idle_timeout = 3600\n\n[instances]\napp = ["alice"]\n'
    )
    cmd = [*MANAGE, "runsupervisor", "--config", str(folder / "tenement.toml")]
    cmd += ["--data-dir", str(folder / "data"), "--bind"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TENEMENT_", "PROMETHEUS_"))}
    env["TENEMENT_METRICS"] = "1" if metrics_on else "0"
    return cmd, env


def ten_config(root: Path) -> Path:
    folder = root / "ten"
    folder.mkdir()
    command = f"{PYTHON} {FAST_APP} --tcp"
    (folder / "tenement.toml").write_text(
        f"[settings]\ndata_dir = {json.dumps(str(folder / 'data'))}\n\n"
        f'[service.app]\ncommand = {json.dumps(command)}\nhealth = "/health"\n'
        'isolation = "process"\nidle_timeout = 3600\n'
    )
    return folder


def throughput(args: argparse.Namespace, root: Path) -> dict[str, list[float]]:
    ports = {"on": free_port(), "off": free_port()}
    results: dict[str, list[float]] = {name: [] for name in ports}
    on_cmd, on_env = ours(root, True)
    off_cmd, off_env = ours(root, False)
    with (
        process_group([*on_cmd, f"127.0.0.1:{ports['on']}"], env=on_env, cwd=REPO, grace=60),
        process_group([*off_cmd, f"127.0.0.1:{ports['off']}"], env=off_env, cwd=REPO, grace=60),
    ):
        for name, port in ports.items():
            wait_http(port, "alice", 120, f"ours ({name})")
        if not args.no_ten:
            ten = ensure_ten(args.ten)
            folder = ten_config(root)
            ports["ten"] = free_port()
            results["ten"] = []
            serve = [ten, "serve", "--port", str(ports["ten"]), "--domain", "localhost"]
            with process_group(serve, cwd=folder, grace=30):
                wait_http(ports["ten"], "alice", 60, "ten")
                rounds(args, ports, results)
        else:
            rounds(args, ports, results)
    return results


def rounds(
    args: argparse.Namespace, ports: dict[str, int], results: dict[str, list[float]]
) -> None:
    for port in ports.values():
        wrk(port, "alice", 32, 2)  # warm-up: pools, caches, the app's first requests
    names = list(ports)
    for i in range(args.repeat):
        order = names if i % 2 == 0 else names[::-1]  # alternate, so drift hits both sides
        for name in order:
            rps = wrk(ports[name], "alice", 32, args.seconds)["rps"]
            results[name].append(rps)
            log(f"round {i + 1}: {name}: {rps:.0f} req/s")


def cardinality(root: Path) -> dict[str, tuple[int, int, int]]:
    tenants = [f"t{i:04d}" for i in range(TENANTS)]
    (root / "many.toml").write_text(
        f'[service.app]\ncommand = "{PYTHON} {FAST_APP}"\n\n[instances]\n'
        f"app = {json.dumps(tenants)}\n"
    )
    out = {}
    for per_instance in ("0", "1"):
        data = root / f"many-{per_instance}"
        register_ours(root / "many.toml", data, [])
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("TENEMENT_", "PROMETHEUS_"))
        }
        env |= {"TENEMENT_DATA_DIR": str(data), "TENEMENT_METRICS_PER_INSTANCE": per_instance}
        env["DJANGO_SETTINGS_MODULE"] = "tenement_site.settings"
        script = CARDINALITY.format(running=RUNNING)
        done = subprocess.run(
            [sys.executable, "-c", script],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        series, ours_series, size = map(int, done.stdout.split())
        out["per instance" if per_instance == "1" else "per service"] = (series, ours_series, size)
    return out


def report(results: dict[str, list[float]], sizes: dict[str, tuple[int, int, int]]) -> None:
    print("\nproxy throughput, wrk -t2 -c32, medians (req/s):")
    medians = {name: statistics.median(values) for name, values in results.items() if values}
    for name, median in medians.items():
        runs = ", ".join(f"{v:.0f}" for v in results[name])
        print(f"  {name:<4} {median:8.0f}   ({runs})")
    if medians.get("off"):
        ratio = medians["on"] / medians["off"]
        print(f"  metrics on / off: {ratio:.3f} (cost {100 * (1 - ratio):.1f}% of throughput)")
        # Rounds ran back to back, so a per-round ratio cancels slow drifts in machine load.
        paired = statistics.median(
            [a / b for a, b in zip(results["on"], results["off"], strict=True)]
        )
        print(f"  median of per-round on/off ratios: {paired:.3f}")
    if medians.get("ten"):
        print(f"  ours (metrics on) / ten: {medians['on'] / medians['ten']:.2f}x")
    if sizes:
        print(f"\n/metrics with {TENANTS:,} tenants, each served, woken, idle-stopped, crashed:")
        for mode, (series, ours_series, size) in sizes.items():
            print(f"  {mode:<12} {series:6d} series ({ours_series} tenement_*), {size:,} bytes")


def main() -> None:
    args = parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("missing wrk: run scripts/system-deps.sh bench")
    become_subreaper()
    root = Path(tempfile.mkdtemp(prefix="tmb", dir="/tmp"))
    try:
        sizes = {} if args.no_cardinality else cardinality(root)
        results = throughput(args, root)
    finally:
        kill_descendants()
        shutil.rmtree(root, ignore_errors=True)
    report(results, sizes)


if __name__ == "__main__":
    main()
