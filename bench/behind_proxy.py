"""Throughput of one warm tenant with a reverse proxy in front, side by side in one run.

  ours        wrk straight to `runsupervisor` (plain HTTP)
  via-nginx   wrk to nginx (TLS, keep-alive), the server block of `ten nginx`: nginx
              passes every request to tenement
  direct      wrk to nginx (TLS), `ten nginx --direct`: nginx serves the tenant from its
              socket after an auth_request to tenement's wake hook

The same stdlib app (bench/apps/fast_app.py) serves all three; rounds alternate so a
noisy neighbour hits every peer alike. Prints medians and ratios; asserts nothing.

    python bench/behind_proxy.py [--rounds 5] [--seconds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import MANAGE, PYTHON, REPO, free_port, log, process_group, wait_for

DOMAIN = "bench.test"
TENANT = f"alice.app.{DOMAIN}"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def listening(port: int) -> bool:
    import socket

    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
        return True
    return False


def certificate(root: Path) -> tuple[Path, Path]:
    cert, key = root / "cert.pem", root / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"),
            *("-nodes", "-days", "1", "-subj", f"/CN={DOMAIN}", "-addext"),
            *(f"subjectAltName=DNS:{DOMAIN},DNS:*.app.{DOMAIN}", "-keyout", str(key)),
            *("-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


@contextlib.contextmanager
def nginx(
    root: Path, name: str, upstream: int, tls: tuple[Path, Path], *extra: str
) -> Iterator[int]:
    port = free_port()
    folder = root / name
    (folder / "temp").mkdir(parents=True, mode=0o777)
    (folder / "temp").chmod(0o777)
    block = subprocess.run(
        [
            *(*MANAGE[:1], "-m", "instances.cli", "nginx", "--domain", DOMAIN, *extra),
            *("--upstream", f"127.0.0.1:{upstream}", "--listen", f"127.0.0.1:{port}"),
            *("--http-listen", "", "--cert", str(tls[0]), "--key", str(tls[1])),
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        timeout=30,
    ).stdout
    (folder / "tenement.conf").write_text(block)
    (folder / "nginx.conf").write_text(
        f"worker_processes 2;\npid {folder}/nginx.pid;\nerror_log {folder}/error.log;\n"
        "events { worker_connections 1024; }\n"
        f"http {{ access_log off; client_body_temp_path {folder}/temp/body; "
        f"proxy_temp_path {folder}/temp/proxy; include {folder}/tenement.conf; }}\n"
    )
    with process_group([NGINX, "-c", str(folder / "nginx.conf"), "-g", "daemon off;"]):
        wait_for(name, lambda: listening(port), 30)
        yield port


def wrk(url: str, seconds: int) -> tuple[float, int]:
    cmd = ["wrk", "-t2", "-c32", f"-d{seconds}s", "-H", f"Host: {TENANT}", url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + 60)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out.stdout)[1])
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out.stdout)
    return rps, int(bad[1]) if bad else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="tb", dir="/tmp"))
    root.chmod(0o711)
    try:
        run(root, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(root: Path, args: argparse.Namespace) -> None:
    config = root / "tenement.toml"
    app = f"{PYTHON} {REPO}/bench/apps/fast_app.py"
    # user = nobody: nginx's workers (nobody, as their master is root) open the socket.
    config.write_text(
        f'[service.app]\ncommand = "{app}"\nhealth = "/health"\nisolation = "process"\n'
        'user = "nobody"\nidle_timeout = 3600\n\n[instances]\napp = ["alice"]\n'
    )
    config.chmod(0o600)  # isolation = process: tenants must not read it
    port = free_port()
    cmd = [*MANAGE, "runsupervisor", "--bind", f"127.0.0.1:{port}", "--domain", DOMAIN]
    cmd += ["--data-dir", str(root / "data"), "--config", str(config)]
    env = {**os.environ, "TENEMENT_TRUSTED_PROXIES": "127.0.0.1"}
    tls = certificate(root)
    with (
        process_group(cmd, cwd=REPO, env=env, log_file=root / "ours.log", grace=60),
        nginx(root, "via-nginx", port, tls) as via,
        nginx(root, "direct", port, tls, "--direct") as direct,
    ):
        wait_for("tenement", lambda: listening(port), 120)
        probe = subprocess.run(
            ["curl", "-s", "-i", "-H", f"Host: {TENANT}", f"http://127.0.0.1:{port}/"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if " 200 " not in probe.stdout.split("\n", 1)[0]:
            ours_log = (root / "ours.log").read_text()[-3000:]
            log(f"the tenant does not answer 200:\n{probe.stdout}\n{ours_log}")
            raise SystemExit(1)
        peers = {
            "ours": f"http://127.0.0.1:{port}/",
            "via-nginx": f"https://127.0.0.1:{via}/",
            "direct": f"https://127.0.0.1:{direct}/",
        }
        results: dict[str, list[float]] = {name: [] for name in peers}
        for url in peers.values():
            wrk(url, 2)  # warm-up
        for i in range(args.rounds):
            for name, url in peers.items():
                rps, bad = wrk(url, args.seconds)
                results[name].append(rps)
                log(f"round {i + 1}: {name} {rps:.0f} req/s, {bad} non-2xx")
        base = statistics.median(results["ours"])
        print("\n| peer | median req/s (wrk -t2 -c32) | ÷ ours |\n|---|---|---|")
        for name, values in results.items():
            median = statistics.median(values)
            print(f"| {name} | {median:,.0f} | {median / base:.2f} |")


if __name__ == "__main__":
    main()
