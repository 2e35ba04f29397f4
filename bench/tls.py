"""HTTPS benchmark: ours against Debian's nginx, both with the same certificate and key.

Each peer serves one bench/apps/fast_app.py on a Unix socket, over plain HTTP and over
HTTPS (TLS 1.3, HTTP/1.1 by ALPN). Figures per peer, medians of --rounds:

  http req/s        wrk -t2 -c32, keep-alive, plain HTTP
  https req/s       the same over TLS (handshakes amortised over keep-alive)
  handshakes/s      wrk -t2 -c32 with `Connection: close`: one full TLS handshake, and
                    one request, per connection

Ours is runsupervisor with [settings.tls] cert_file/key_file (no ACME: the handshake cost,
not the CA, is measured), and on_demand off; nginx runs 1 worker, as ours is one process.

    python bench/tls.py [--rounds 3] [--seconds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import re
import shutil
import statistics
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from common import MANAGE, PYTHON, REPO, free_port, log, process_group, wait_for
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DOMAIN = "tenement.bench"
HOST = f"alice.app.{DOMAIN}"
FAST_APP = REPO / "bench" / "apps" / "fast_app.py"

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
    listen 127.0.0.1:{http_port};
    listen 127.0.0.1:{https_port} ssl;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {{
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
"""


def make_certificate(root: Path) -> tuple[Path, Path]:
    """One P-256 certificate for the control host and the service's tenants."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DOMAIN)])
    now = datetime.datetime.now(datetime.UTC)
    san = x509.SubjectAlternativeName([x509.DNSName(DOMAIN), x509.DNSName(f"*.app.{DOMAIN}")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(san, critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = root / "cert.pem", root / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def wrk(url: str, seconds: int, close: bool = False) -> float:
    cmd = ["wrk", "-t2", "-c32", f"-d{seconds}s", "-H", f"Host: {HOST}"]
    if close:
        cmd += ["-H", "Connection: close"]
    out = subprocess.run(
        [*cmd, url], capture_output=True, text=True, check=True, timeout=seconds + 60
    ).stdout
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        log(f"  warning: {errors.group(1)} non-2xx responses from {url}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


def answers(url: str) -> bool:
    result = subprocess.run(
        ["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}", "-H", f"Host: {HOST}", url],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return result.stdout == "200"


def measure(peer: str, http_port: int, https_port: int, args: argparse.Namespace) -> dict:
    plain, secure = f"http://127.0.0.1:{http_port}/", f"https://127.0.0.1:{https_port}/"
    wait_for(f"{peer} over HTTPS", lambda: answers(secure), timeout=120)
    wrk(secure, 1)  # warm-up
    figures: dict[str, list[float]] = {"http": [], "https": [], "handshakes": []}
    for _ in range(args.rounds):
        figures["http"].append(wrk(plain, args.seconds))
        figures["https"].append(wrk(secure, args.seconds))
        figures["handshakes"].append(wrk(secure, args.seconds, close=True))
    medians = {k: statistics.median(v) for k, v in figures.items()}
    log(f"{peer}: " + ", ".join(f"{k} {v:.0f}" for k, v in medians.items()))
    return medians


@contextlib.contextmanager
def nginx(root: Path, cert: Path, key: Path) -> Iterator[tuple[int, int]]:
    root.mkdir()
    sock, http_port, https_port = root / "app.sock", free_port(), free_port()
    user = "user root;\n" if os.getuid() == 0 else ""
    conf = root / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            user=user,
            root=root,
            sock=sock,
            http_port=http_port,
            https_port=https_port,
            cert=cert,
            key=key,
        )
    )
    env = {"PATH": os.environ.get("PATH", ""), "SOCKET_PATH": str(sock)}
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    with (
        process_group([PYTHON, str(FAST_APP)], env=env),
        process_group([binary, "-c", str(conf), "-p", str(root)]),
    ):
        yield http_port, https_port


@contextlib.contextmanager
def ours(root: Path, cert: Path, key: Path) -> Iterator[tuple[int, int]]:
    root.mkdir()
    http_port, https_port = free_port(), free_port()
    config = root / "tenement.toml"
    config.write_text(
        f"""
[settings.tls]
enabled = true
cert_file = "{cert}"
key_file = "{key}"
on_demand = false
https_port = {https_port}

[service.app]
command = "{PYTHON} {FAST_APP}"
health = "/health"
isolation = "process"

[instances]
app = ["alice"]
"""
    )
    config.chmod(0o600)  # tenants under isolation = "process" must not read it
    cmd = [
        *MANAGE,
        "runsupervisor",
        "--config",
        str(config),
        "--bind",
        f"127.0.0.1:{http_port}",
        "--https-bind",
        f"127.0.0.1:{https_port}",
        "--data-dir",
        str(root / "data"),
    ]
    env = {**os.environ, "TENEMENT_DOMAIN": DOMAIN, "TENEMENT_METRICS": "0"}
    log_file = root / "runsupervisor.log"
    with process_group(cmd, cwd=REPO, log_file=log_file, env=env, grace=60):
        try:
            yield http_port, https_port
        except BaseException:
            tail = log_file.read_text(errors="replace").splitlines()[-15:]
            log("ours: last lines of runsupervisor's output:\n  " + "\n  ".join(tail))
            raise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    for tool in ("wrk", "curl"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing: run scripts/system-deps.sh bench")
    with tempfile.TemporaryDirectory(prefix="tenement-bench-tls-") as tmp:
        root = Path(tmp)
        root.chmod(0o711)  # tenants (their own uids) pass through to their data dirs
        cert, key = make_certificate(root)
        results = {}
        with nginx(root / "nginx", cert, key) as ports:
            results["nginx"] = measure("nginx", *ports, args)
        with ours(root / "ours", cert, key) as ports:
            results["ours"] = measure("ours", *ports, args)
    print(f"{'':16}{'nginx':>10}{'ours':>10}{'ours/nginx':>12}")
    for key_, label in (
        ("http", "http req/s"),
        ("https", "https req/s"),
        ("handshakes", "handshakes/s"),
    ):
        a, b = results["nginx"][key_], results["ours"][key_]
        print(f"{label:16}{a:>10.0f}{b:>10.0f}{b / a:>12.2f}")
    for peer in ("nginx", "ours"):
        r = results[peer]
        print(f"{peer}: https/http {r['https'] / r['http']:.2f}")


if __name__ == "__main__":
    main()
