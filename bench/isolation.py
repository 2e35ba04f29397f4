"""Cold wake by isolation level, side by side in one run, as a ratio of `process`.

One runsupervisor serves the same stdlib app (bench/apps/fast_app.py) as four services:

    process       own uid (setpriv), no namespaces
    namespace     bubblewrap: PID, mount, IPC, UTS namespaces, hidden data root (default)
    ns-netnone    namespace plus network = "none"
    ns-limits     namespace plus memory_limit_mb, cpu_shares and pids_max (a cgroup)

Each round stops every tenant, then times one request through the proxy per level (in a
rotating order, so no level always goes first). Upstream `ten` 0.2.2 runs the same app
with its `process` and `namespace` isolation for the side-by-side row.

    python bench/isolation.py [--rounds 15] [--ten PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from common import (
    MANAGE,
    PYTHON,
    REPO,
    ensure_ten,
    free_port,
    log,
    process_group,
    wait_for,
)

APP = REPO / "bench" / "apps" / "fast_app.py"
LEVELS = {
    "process": 'isolation = "process"',
    "namespace": 'isolation = "namespace"',
    "ns-netnone": 'isolation = "namespace"\nnetwork = "none"',
    "ns-limits": "memory_limit_mb = 256\ncpu_shares = 100\npids_max = 64",
}


def get(port: int, host: str, timeout: float = 30) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/", headers={"Host": host})
        response = conn.getresponse()
        response.read()
        return response.status
    except OSError:
        return 0
    finally:
        conn.close()


def timed(port: int, host: str) -> float | None:
    started = time.perf_counter()
    ok = get(port, host) == 200
    return (time.perf_counter() - started) * 1000 if ok else None


def measure(
    rounds: int, port: int, hosts: dict[str, str], stop: Callable[[str], None]
) -> dict[str, list[float]]:
    """Per level, `rounds` cold wakes (ms); levels rotate their order each round."""
    names = list(hosts)
    results: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            stop(name)
        time.sleep(0.5)  # let the stops settle (sockets removed, cgroups gone)
        for name in order:
            ms = timed(port, hosts[name])
            if ms is None:
                log(f"  {name}: round {r + 1} FAILED")
            else:
                results[name].append(ms)
        log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {results[n][-1]:.0f}" for n in order))
    return results


def ours(root: Path, rounds: int) -> dict[str, list[float]]:
    services = "\n".join(
        f'[service.{name.replace("-", "")}]\ncommand = "{PYTHON} {APP}"\nhealth = "/health"\n'
        f"idle_timeout = 3600\n{extra}\n"
        for name, extra in LEVELS.items()
    )
    instances = ", ".join(f'{name.replace("-", "")} = ["w"]' for name in LEVELS)
    config = root / "tenement.toml"
    config.write_text(f"{services}\n[instances]\n{instances.replace(', ', chr(10))}\n")
    config.chmod(0o600)
    data, port = root / "data", free_port()
    cmd = [*MANAGE, "runsupervisor", "--config", str(config), "--bind", f"127.0.0.1:{port}"]
    hosts = {name: f"w.{name.replace('-', '')}.localhost" for name in LEVELS}

    def stop(name: str) -> None:
        key = f"{name.replace('-', '')}:w"
        subprocess.run(
            [*MANAGE, "stop", key, "--data-dir", str(data)], check=True, capture_output=True
        )

    with process_group(
        [*cmd, "--data-dir", str(data)], cwd=REPO, log_file=root / "ours.log", grace=60
    ):
        wait_for("ours", lambda: all(get(port, h, 5) == 200 for h in hosts.values()))
        return measure(rounds, port, hosts, stop)


def upstream(root: Path, rounds: int, ten: str) -> dict[str, list[float]]:
    services = "".join(
        f'[service.{name}]\ncommand = "{PYTHON} {APP} --tcp"\nhealth = "/health"\n'
        f'isolation = "{name}"\nidle_timeout = 3600\n\n'
        for name in ("process", "namespace")
    )
    (root / "tenement.toml").write_text(f'[settings]\ndata_dir = "{root}/data"\n\n{services}')
    port = free_port()
    server = ["--server", f"http://127.0.0.1:{port}"]
    hosts = {name: f"w.{name}.localhost" for name in ("process", "namespace")}

    def ten_cli(*args: str) -> None:
        subprocess.run([ten, *server, *args], cwd=root, capture_output=True, timeout=30)

    with process_group(
        [ten, "serve", "--port", str(port), "--domain", "localhost"],
        cwd=root,
        log_file=root / "ten.log",
        grace=30,
    ):
        wait_for("ten", lambda: get(port, "localhost", 2) != 0, timeout=30)
        subprocess.run([ten, "token-gen"], cwd=root, capture_output=True, timeout=30)
        for name in hosts:
            ten_cli("spawn", f"{name}:w")
        with contextlib.suppress(SystemExit):
            wait_for("ten apps", lambda: all(get(port, h, 5) == 200 for h in hosts.values()), 30)
        return measure(rounds, port, hosts, lambda name: ten_cli("stop", f"{name}:w"))


def report(title: str, results: dict[str, list[float]]) -> None:
    base = statistics.median(results["process"]) if results.get("process") else None
    print(f"\n{title}\n| level | cold wake p50 (ms) | min | max | vs process | n |")
    print("|---|---|---|---|---|---|")
    for name, values in results.items():
        if not values:
            print(f"| {name} | failed | | | | 0 |")
            continue
        med = statistics.median(values)
        ratio = f"{med / base:.2f}x" if base else "n/a"
        print(
            f"| {name} | {med:.1f} | {min(values):.1f} | {max(values):.1f} | {ratio} | "
            f"{len(values)} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--ten", help="path to upstream ten (default: installed into a venv)")
    parser.add_argument("--no-ten", action="store_true", help="skip the upstream row")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bi", dir="/tmp") as tmp:
        root = Path(tmp)
        root.chmod(0o711)  # tenants' uids pass through to their data dirs
        (root / "ours").mkdir(mode=0o711)
        log("ours: one runsupervisor, four isolation levels")
        mine = ours(root / "ours", args.rounds)
        theirs = None
        if not args.no_ten:
            (root / "ten").mkdir()
            log("upstream ten 0.2.2: process and namespace")
            theirs = upstream(root / "ten", args.rounds, ensure_ten(args.ten))
    report("ours (runsupervisor)", mine)
    if theirs is not None:
        report("upstream ten 0.2.2", theirs)


if __name__ == "__main__":
    main()
