"""Blue-green switch latency: from the command to all new traffic on the new version.

Side by side in one run, with the same stdlib app (bench/apps/fast_app.py --say, which
answers which version it is):

    ours: release switch   100 tenants of one service, 10 of them active under steady
                           load (one keep-alive client each), 90 asleep; `switch` to v2,
                           then `rollback` to v1, alternately. Latency: from the API call
                           to the moment every active tenant's answers come from the new
                           release (each tenant is drained, stopped and started again).
    ours: weighted route   upstream's shape, `{service}.{domain}` over instances v1 and v2,
                           `POST /api/route` (weights swap, no restart).
    upstream ten 0.2.2     the same swap with `ten route` on `ten serve`.

Also counted: answers that were not 200 (lost requests) during the switches.

    python bench/releases.py [--rounds 6] [--ten PATH] [--no-ten]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from common import MANAGE, PYTHON, REPO, ensure_ten, free_port, log, process_group, wait_for

APP = REPO / "bench" / "apps" / "fast_app.py"
TENANTS, ACTIVE = 100, 10


class Load:
    """One keep-alive client per host, recording (time, status, body) until stopped."""

    def __init__(self, port: int, hosts: list[str]) -> None:
        self.port = port
        self.stop = threading.Event()
        self.seen: dict[str, list[tuple[float, int, str]]] = {h: [] for h in hosts}
        self.threads = [threading.Thread(target=self.run, args=(h,)) for h in hosts]
        for t in self.threads:
            t.start()

    def run(self, host: str) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self.stop.is_set():
            try:
                conn.request("GET", "/", headers={"Host": host})
                response = conn.getresponse()
                body = response.read().decode().strip()
                self.seen[host].append((time.perf_counter(), response.status, body))
            except (OSError, http.client.HTTPException):
                self.seen[host].append((time.perf_counter(), 0, ""))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.close()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def settled(self, target: str, since: float) -> float | None:
        """When every host had its first answer from `target` after which all were (the
        time a response arrived, so a request held while the new one starts counts)."""
        worst = since
        for answers in list(self.seen.values()):
            after = [(t, body) for t, _, body in list(answers) if t >= since]
            if not after or after[-1][1] != target:
                return None
            first = len(after) - 1
            while first > 0 and after[first - 1][1] == target:
                first -= 1
            worst = max(worst, after[first][0])
        return worst

    def failures(self) -> int:
        return sum(1 for answers in self.seen.values() for _, status, _ in answers if status != 200)


def switch_rounds(
    load: Load, rounds: int, flip: Callable[[str], None], names: tuple[str, str]
) -> list[float]:
    """Alternate between the two versions; ms from the command to all traffic moved."""
    out = []
    for r in range(rounds):
        target = names[(r + 1) % 2]
        time.sleep(1.0)  # steady traffic on the old version first
        began = time.perf_counter()
        flip(target)
        deadline = began + 60
        while (done := load.settled(target, began)) is None or time.perf_counter() < done + 0.3:
            if time.perf_counter() > deadline:
                raise SystemExit(f"traffic never settled on {target}")
            time.sleep(0.02)
        out.append((done - began) * 1000)
        log(f"  round {r + 1}/{rounds} -> {target}: {out[-1]:.0f} ms")
    return out


def api(port: int, token: str, method: str, path: str, body: object = None) -> object:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Host": "localhost", "Authorization": f"Bearer {token}"}
    data = None
    if body is not None:
        headers["Content-Type"] = "application/json"
        data = json.dumps(body)
    try:
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        raw = response.read()
        if response.status >= 300:
            raise SystemExit(f"{method} {path}: {response.status} {raw[:300]!r}")
        return json.loads(raw) if raw else None
    finally:
        conn.close()


def ok(port: int, host: str) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/", headers={"Host": host})
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def ours(root: Path, rounds: int) -> dict[str, tuple[list[float], int]]:
    app = f"{PYTHON} {APP} --say RELEASE"
    api_app = f"{PYTHON} {APP} --say INSTANCE_ID"
    config = root / "tenement.toml"
    config.write_text(
        f'[service.notes]\ncommand = "{app}"\nhealth = "/health"\nisolation = "process"\n'
        f'idle_timeout = 3600\nenv = {{ RELEASE = "v1" }}\n\n'
        f'[service.api]\ncommand = "{api_app}"\nhealth = "/health"\nisolation = "process"\n'
        f"idle_timeout = 3600\n\n"
        '[instances]\napi = ["v1", "v2"]\n'
    )
    config.chmod(0o600)
    data, port = root / "data", free_port()
    made = subprocess.run(
        [*MANAGE, "createtoken", "--name", "bench", "--scope", "admin", "--data-dir", str(data)],
        capture_output=True,
        text=True,
        check=True,
    )
    token = made.stdout.strip().splitlines()[-1]
    cmd = [*MANAGE, "runsupervisor", "--config", str(config), "--bind", f"127.0.0.1:{port}"]
    results: dict[str, tuple[list[float], int]] = {}
    with process_group(
        [*cmd, "--data-dir", str(data)], cwd=REPO, log_file=root / "ours.log", grace=60
    ):
        wait_for("ours", lambda: ok(port, "v1.api.localhost"), 120)
        for i in range(TENANTS):  # 90 registered but asleep: only the active ten start
            tenant = {"service": "notes", "instance_id": f"t{i}", "start": i < ACTIVE}
            api(port, token, "POST", "/api/instances/", tenant)
        hosts = [f"t{i}.notes.localhost" for i in range(ACTIVE)]
        wait_for("ours", lambda: all(ok(port, h) for h in [*hosts, "v1.api.localhost"]), 120)
        release = {"name": "v2", "env": {"RELEASE": "v2"}}
        api(port, token, "POST", "/api/services/notes/releases", release)
        load = Load(port, hosts)
        try:

            def flip(target: str) -> None:
                path = f"/api/services/notes/releases/{target}/switch"
                api(port, token, "POST", path)

            times = switch_rounds(load, rounds, flip, ("v1", "v2"))
        finally:
            load.finish()
        results["ours: release switch (10 active of 100)"] = (times, load.failures())
        api(port, token, "PUT", "/api/instances/api:v2/weight", {"weight": 0})
        load = Load(port, ["api.localhost"])
        try:

            def route(target: str) -> None:
                source = "v1" if target == "v2" else "v2"
                api(
                    port,
                    token,
                    "POST",
                    "/api/route",
                    {"process": "api", "from": source, "to": target},
                )

            times = switch_rounds(load, rounds, route, ("v1", "v2"))
        finally:
            load.finish()
        results["ours: weighted host, POST /api/route"] = (times, load.failures())
    return results


def upstream(root: Path, rounds: int, ten: str) -> dict[str, tuple[list[float], int]]:
    (root / "tenement.toml").write_text(
        f'[settings]\ndata_dir = "{root}/data"\n\n'
        f'[service.api]\ncommand = "{PYTHON} {APP} --tcp --say INSTANCE_ID"\nhealth = "/health"\n'
        'isolation = "process"\nidle_timeout = 3600\n[service.api.env]\nINSTANCE_ID = "{id}"\n'
    )
    port = free_port()
    server = ["--server", f"http://127.0.0.1:{port}"]

    def ten_cli(*args: str) -> None:
        subprocess.run([ten, *server, *args], cwd=root, capture_output=True, timeout=30)

    with process_group(
        [ten, "serve", "--port", str(port), "--domain", "localhost"],
        cwd=root,
        log_file=root / "ten.log",
        grace=30,
    ):
        wait_for("ten", lambda: ok(port, "localhost") or True, timeout=30)
        time.sleep(1)
        subprocess.run([ten, "token-gen"], cwd=root, capture_output=True, timeout=30)
        ten_cli("spawn", "api:v1")
        ten_cli("spawn", "api:v2")
        wait_for("ten apps", lambda: ok(port, "v1.api.localhost") and ok(port, "v2.api.localhost"))
        ten_cli("weight", "api:v2", "0")
        load = Load(port, ["api.localhost"])
        try:

            def route(target: str) -> None:
                source = "v1" if target == "v2" else "v2"
                ten_cli("route", "api", "--from", source, "--to", target)

            times = switch_rounds(load, rounds, route, ("v1", "v2"))
        finally:
            load.finish()
    return {"upstream ten 0.2.2: ten route": (times, load.failures())}


def report(results: dict[str, tuple[list[float], int]]) -> None:
    print("\n| switch | p50 (ms) | min | max | not-200 answers | n |")
    print("|---|---|---|---|---|---|")
    for name, (values, failures) in results.items():
        print(
            f"| {name} | {statistics.median(values):.0f} | {min(values):.0f} | "
            f"{max(values):.0f} | {failures} | {len(values)} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--ten", help="path to upstream ten (default: installed into a venv)")
    parser.add_argument("--no-ten", action="store_true", help="skip the upstream row")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tb", dir="/tmp") as tmp:
        root = Path(tmp)
        root.chmod(0o711)
        (root / "ours").mkdir()
        log("ours: 100 tenants, 10 active")
        results = ours(root / "ours", args.rounds)
        if not args.no_ten:
            (root / "ten").mkdir()
            log("upstream ten 0.2.2")
            results.update(upstream(root / "ten", args.rounds, ensure_ten(args.ten)))
    report(results)


if __name__ == "__main__":
    main()
