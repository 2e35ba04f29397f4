"""Edge hardening figures: what a refused 64 MiB header costs, and a neighbour's latency
while 2,000 slowloris connections are open.

One runsupervisor serves bench/apps/fast_app.py as two tenants, alice (attacked) and bob
(the neighbour). Figures, medians of several rounds in one run:

- CPU seconds of the supervisor process (user + system, psutil) per 64 MiB header sent as
  fast as the socket takes it, refused at TENEMENT_MAX_HEADER_KB (mean of the rounds);
  with --unlimited also one round with the limits raised past 64 MiB, the cost before.
- bob's p50 for a fresh-connection GET, alone and while 2,000 connections each hold a
  partial request head (a slowloris from one address; the per-address cap is raised so
  they are all admitted).

    python bench/edge.py [--rounds 7] [--unlimited]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
from common import MANAGE, PYTHON, REPO, ensure_ten, free_port, log, process_group, wait_for

APP = REPO / "bench" / "apps" / "fast_app.py"
MIB = 1024 * 1024
HEAD = b"GET / HTTP/1.1\r\nHost: alice.fast.localhost\r\nX-Big: "


def get_ms(port: int, host: str) -> float:
    """One GET on a fresh connection; milliseconds until the whole response is read."""
    began = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    if not data.startswith(b"HTTP/1.1 200"):
        raise SystemExit(f"neighbour request failed: {data[:100]!r}")
    return (time.perf_counter() - began) * 1000


def send_header(port: int, total: int) -> bytes:
    """Send a head with one `total`-byte header until the server answers; its status line."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.sendall(HEAD)
        block, sent = b"a" * MIB, 0
        s.setblocking(False)
        while sent < total:
            try:
                if s.recv(1, socket.MSG_PEEK):
                    break
            except BlockingIOError:
                pass
            try:
                sent += s.send(block)
            except BlockingIOError:
                time.sleep(0.0005)
            except (BrokenPipeError, ConnectionResetError):
                break
        if sent >= total:
            s.setblocking(True)
            s.sendall(b"\r\n\r\n")
        s.settimeout(120)
        return s.recv(200).split(b"\r\n")[0]


def cpu_of(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def header_cost(port: int, proc: psutil.Process, rounds: int) -> float:
    """CPU seconds per header: the total over all rounds (the clock-tick resolution of
    CPU times is 10 ms, longer than one refusal takes) divided by the rounds."""
    began = cpu_of(proc)
    for _ in range(rounds):
        status = send_header(port, 64 * MIB)
        log(f"  64 MiB header: {status.decode(errors='replace')}")
    return (cpu_of(proc) - began) / rounds


def p50_of(port: int, samples: int) -> tuple[float, int]:
    """bob's p50 over the requests that succeeded, and how many failed."""
    times, failed = [], 0
    for _ in range(samples):
        try:
            times.append(get_ms(port, "bob.fast.localhost"))
        except (OSError, SystemExit):
            failed += 1
    return (statistics.median(times) if times else float("nan")), failed


def slowloris_p50(port: int, connections: int, samples: int) -> tuple[float, float, int]:
    """bob's p50 alone, then with `connections` partial heads open to alice (and how many
    of those requests failed)."""
    alone, _ = p50_of(port, samples)
    held = []
    try:
        for _ in range(connections):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"GET / HTTP/1.1\r\nHost: alice.fast.localhost\r\nX-A: ")
            held.append(s)
        time.sleep(0.5)
        during, failed = p50_of(port, samples)
        dropped = sum(1 for s in held if _closed(s))
    finally:
        for s in held:
            s.close()
    if dropped:
        log(f"  {dropped} of the {connections} slowloris connections were refused")
    return alone, during, failed


def _closed(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        s.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True


@contextlib.contextmanager
def serving(root: Path, env_extra: dict[str, str]) -> Iterator[tuple[psutil.Process, int]]:
    """runsupervisor with alice and bob running; (its process, its port)."""
    root.mkdir(mode=0o711)
    config = root / "tenement.toml"
    config.write_text(
        f'[service.fast]\ncommand = "{PYTHON} {APP}"\nhealth = "/health"\n'
        'idle_timeout = 3600\n\n[instances]\nfast = ["alice", "bob"]\n'
    )
    port = free_port()
    # All 2,000 slowloris connections come from one address: admit them.
    env = {**os.environ, "TENEMENT_MAX_CONNECTIONS_PER_ADDRESS": "10000", **env_extra}
    cmd = [*MANAGE, "runsupervisor", "--config", str(config), "--bind", f"127.0.0.1:{port}"]
    with process_group(
        [*cmd, "--data-dir", str(root / "data")], cwd=REPO, env=env, log_file=root / "log"
    ) as sup:
        hosts = ("alice.fast.localhost", "bob.fast.localhost")
        wait_for("both tenants", lambda: all(_ok(port, h) for h in hosts))
        yield psutil.Process(sup.pid), port


@contextlib.contextmanager
def serving_ten(root: Path, ten: str) -> Iterator[tuple[psutil.Process, int]]:
    """Upstream `ten` 0.2.2 serving the same app (over TCP, as it proxies) for alice, bob."""
    root.mkdir(mode=0o711)
    (root / "tenement.toml").write_text(
        f'[settings]\ndata_dir = "{root}/data"\n\n[service.fast]\n'
        f'command = "{PYTHON} {APP} --tcp"\nhealth = "/health"\nidle_timeout = 3600\n'
    )
    port = free_port()
    server = ["--server", f"http://127.0.0.1:{port}"]
    cmd = [ten, "serve", "--port", str(port), "--domain", "localhost"]
    with process_group(cmd, cwd=root, log_file=root / "ten.log", grace=30) as proc:
        wait_for("ten", lambda: _status(port, "localhost") != 0, timeout=30)
        subprocess.run([ten, "token-gen"], cwd=root, capture_output=True, timeout=30)
        for tenant in ("alice", "bob"):
            subprocess.run([ten, *server, "spawn", f"fast:{tenant}"], cwd=root, timeout=30)
        hosts = ("alice.fast.localhost", "bob.fast.localhost")
        wait_for("ten's tenants", lambda: all(_ok(port, h) for h in hosts), timeout=60)
        yield psutil.Process(proc.pid), port


def _status(port: int, host: str) -> int:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            return int(s.recv(100)[9:12] or 0)
    except (OSError, ValueError):
        return 0


def _ok(port: int, host: str) -> bool:
    try:
        get_ms(port, host)
    except (OSError, SystemExit):
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument(
        "--unlimited", action="store_true", help="also one round with the limits raised"
    )
    parser.add_argument("--ten", help="path to upstream ten (default: installed into a venv)")
    parser.add_argument("--no-ten", action="store_true", help="skip the upstream row")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 2,000 client sockets
    with tempfile.TemporaryDirectory(prefix="be", dir="/tmp") as tmp:
        Path(tmp).chmod(0o711)
        with serving(Path(tmp) / "limited", {}) as (proc, port):
            log("refused 64 MiB headers:")
            costs = header_cost(port, proc, args.rounds)
            log(f"slowloris of {args.connections}:")
            rounds = [slowloris_p50(port, args.connections, args.samples) for _ in range(3)]
        peer = None
        if not args.no_ten:
            with serving_ten(Path(tmp) / "ten", ensure_ten(args.ten)) as (proc, port):
                log("upstream ten, 64 MiB headers:")
                peer_cost = header_cost(port, proc, 3)
                log(f"upstream ten, slowloris of {args.connections}:")
                peer = (peer_cost, slowloris_p50(port, args.connections, args.samples))
        unlimited = None
        if args.unlimited:
            raised = {"TENEMENT_MAX_HEADER_KB": "131072", "TENEMENT_MAX_HEADER_LINE_KB": "131072"}
            with serving(Path(tmp) / "unlimited", raised) as (proc, port):
                log("64 MiB header with the limits raised past it:")
                unlimited = header_cost(port, proc, 1)
    print("\n| figure | median | rounds |\n|---|---|---|")
    print(f"| CPU s per refused 64 MiB header (mean) | {costs:.4f} | {args.rounds} |")
    if unlimited is not None:
        print(f"| CPU s per 64 MiB header, limits raised (before) | {unlimited:.2f} | 1 |")
    alone = statistics.median(r[0] for r in rounds)
    during = statistics.median(r[1] for r in rounds)
    failed = sum(r[2] for r in rounds)
    print(f"| bob p50 ms, alone | {alone:.2f} | {len(rounds)} x {args.samples} |")
    print(
        f"| bob p50 ms, {args.connections} slowloris open | {during:.2f} "
        f"({during / alone:.2f}x), {failed} failed | {len(rounds)} x {args.samples} |"
    )
    if peer is not None:
        cost, (alone, during, failed) = peer
        print(f"| upstream ten: CPU s per 64 MiB header (mean) | {cost:.3f} | 3 |")
        both = f"{alone:.2f} / {during:.2f}, {failed} failed"
        print(f"| upstream ten: bob p50 ms alone / with slowloris | {both} | {args.samples} |")


if __name__ == "__main__":
    main()
