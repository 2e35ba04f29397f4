"""TCP apps against Unix-socket apps: ours both ways, and upstream `ten` 0.2.2, in one run.

    python bench/tcp.py [--seconds 5] [--repeat 5] [--ten PATH] [--keep]

The app is bench/apps/fast_app.py for every peer:
  ours-unix  runsupervisor, the app on $SOCKET_PATH (listen = "auto" finds the socket)
  ours-tcp   runsupervisor, the same app with --tcp: on 127.0.0.1:$PORT only (listen =
             "auto" finds the port); the proxy pools TCP connections to it
  ten        upstream ten serve, the app with --tcp (ten proxies to TCP only)
All run with isolation = "process" (the wake's own mechanics; bench/isolation.py has the
sandbox's cost). Measurements, medians over --repeat: warm req/s (`wrk -t2 -c32`), p50 at
one connection (`wrk -t1 -c1`), and the cold wake (stop the tenant, time one request).
The machine is shared: read the ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import MANAGE, PYTHON, REPO, become_subreaper, kill_descendants, log

# bench/proxy.py by path: on sys.path, `proxy` is also tenement's proxy package.
_spec = importlib.util.spec_from_file_location("bench_proxy", Path(__file__).with_name("proxy.py"))
bp = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
sys.modules["bench_proxy"] = bp
_spec.loader.exec_module(bp)  # type: ignore[union-attr]

PEERS = ("ours-unix", "ours-tcp", "ten")


def ours_config(run: bp.Run, tcp: bool) -> str:
    # No --spawn-log: tenants run as their own uids and may not write into our folder.
    command = " ".join([PYTHON, str(bp.FAST_APP), *(["--tcp"] if tcp else [])])
    return (
        f'[service.app]\ncommand = {json.dumps(command)}\nhealth = "/health"\n'
        'isolation = "process"\nidle_timeout = 3600\n\n[instances]\napp = ["alice", "cold"]\n'
    )


def bench_ours(run: bp.Run, peer: str, tcp: bool) -> None:
    root = run.root / peer
    root.mkdir()
    (root / "tenement.toml").write_text(ours_config(run, tcp))
    (root / "tenement.toml").chmod(0o600)  # as an operator would: tenants could read it
    data = str(root / "data")

    def stop(tenant: str) -> None:
        cli = [*MANAGE, "stop", f"app:{tenant}", "--data-dir", data]
        subprocess.run(cli, cwd=REPO, check=True, capture_output=True, timeout=60)

    with bp.supervisor(run, root, "--config", str(root / "tenement.toml")) as port:
        where = subprocess.run(
            [*MANAGE, "ps", "--json", "--data-dir", data],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        log(f"{peer}: upstream of app:alice: {socket_of(where)}")
        bp.peer_measurements(run, peer, port, stop)


def socket_of(ps_json: str) -> str:
    try:
        rows = json.loads(ps_json)
    except ValueError:
        return "?"
    return next((r.get("upstream") or "?" for r in rows if r.get("instance") == "app:alice"), "?")


def report(run: bp.Run) -> None:
    def med(peer: str, key: str) -> float | None:
        values = run.results.get(peer, {}).get(key)
        return statistics.median(values) if values else None

    rows = [
        ("warm req/s (c32)", "rps"),
        ("p50 at 1 connection (ms)", "p50"),
        ("cold wake (ms)", "cold_ms"),
    ]
    print("\n| measurement | " + " | ".join(PEERS) + " | tcp ÷ unix | tcp ÷ ten |")
    print("|---" * (len(PEERS) + 3) + "|")
    for label, key in rows:
        values = {p: med(p, key) for p in PEERS}
        cells = [
            f"{v:,.3f}" if v is not None and v < 10 else f"{v:,.0f}" if v else "-"
            for v in values.values()
        ]
        unix, tcp, ten = values["ours-unix"], values["ours-tcp"], values["ten"]
        ratio = f"{tcp / unix:.2f}" if tcp and unix else "-"
        vs_ten = f"{tcp / ten:.2f}" if tcp and ten else "-"
        print(f"| {label} | " + " | ".join(cells) + f" | {ratio} | {vs_ten} |")
    errors = {
        p: sum(sum(v) for k, v in run.results.get(p, {}).items() if "error" in k) for p in PEERS
    }
    print(f"\nerrors: {errors}; medians of {run.args.repeat} runs; noisy, shared 2-core machine")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--ten", help="upstream ten (default bench/.ten-venv/bin/ten)")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    if not bp.find_tool("wrk"):
        raise SystemExit("missing wrk: run scripts/system-deps.sh bench")
    become_subreaper()
    root = Path(tempfile.mkdtemp(prefix="ttc", dir="/tmp"))
    root.chmod(0o711)  # tenants' own uids pass through to their folders
    run = bp.Run(args, root, root / "spawns.log", list(PEERS), ["warm", "cold"])
    try:
        for peer in PEERS:
            log(f"--- {peer}")
            try:
                if peer == "ten":
                    bp.bench_ten(run)
                else:
                    bench_ours(run, peer, tcp=peer == "ours-tcp")
            except (bp.PeerError, OSError, subprocess.SubprocessError) as e:
                log(f"{peer}: FAILED: {e}")
            finally:
                kill_descendants()
    finally:
        kill_descendants()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    report(run)


if __name__ == "__main__":
    main()
