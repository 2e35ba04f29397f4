"""Spike for the proxy: which forwarding design is fast enough? Measured, side by side.

Not product code. Each candidate forwards HTTP/1.1 from TCP to one Unix-socket upstream
(nginx answering `200 ok`, so the upstream is never the bottleneck) over pooled keep-alive
connections, adds X-Forwarded-For, and buffers the (tiny) response whole; real streaming,
errors and wakes are out of scope here. Candidates:

  nginx      proxy_pass to the same socket (the peer; C)
  raw        asyncio.Protocol server + httptools parsers, stock asyncio loop
  raw-uvloop the same on uvloop (if installed)
  asgi       uvicorn (httptools) + a minimal ASGI app using the same upstream pool

    python bench/proxy_candidates.py [--seconds 8] [--repeat 3]

Needs Debian's nginx and wrk. Prints req/s at 32 connections and p50/p99 at 1 connection,
medians over --repeat runs.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httptools

HERE = Path(__file__).resolve()


# ---- the shared upstream client -----------------------------------------------------


class UpstreamConn(asyncio.Protocol):
    """One keep-alive connection to the Unix-socket upstream; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.done: asyncio.Future[tuple[int, list[tuple[bytes, bytes]], bytes]] | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done and not self.done.done():
            self.done.set_exception(ConnectionError("upstream closed"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        assert self.done is not None
        self.done.set_result((self.parser.get_status_code(), self.headers, b"".join(self.body)))

    async def request(self, head: bytes, body: bytes):
        self.headers, self.body = [], []
        self.done = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.transport.write(head + body)
        return await self.done


class Pool:
    def __init__(self, path: str) -> None:
        self.path = path
        self.idle: collections.deque[UpstreamConn] = collections.deque()

    async def forward(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        client: str,
    ):
        conn = self.idle.pop() if self.idle else await self.connect()
        lines = [method + b" " + target + b" HTTP/1.1"]
        lines += [n + b": " + v for n, v in headers if n.lower() not in HOP]
        lines.append(b"X-Forwarded-For: " + client.encode())
        lines.append(b"Content-Length: " + str(len(body)).encode())
        result = await conn.request(b"\r\n".join(lines) + b"\r\n\r\n", body)
        self.idle.append(conn)
        return result

    async def connect(self) -> UpstreamConn:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_unix_connection(UpstreamConn, self.path)
        return conn


PENDING: set[asyncio.Future[None]] = set()
HOP = {
    b"connection",
    b"keep-alive",
    b"content-length",
    b"transfer-encoding",
    b"upgrade",
    b"proxy-connection",
    b"te",
    b"trailer",
}


def response_bytes(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    lines = [b"HTTP/1.1 %d OK" % status]
    lines += [n + b": " + v for n, v in headers if n.lower() not in HOP]
    lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# ---- candidate: raw protocol server ------------------------------------------------------


class RawProxy(asyncio.Protocol):
    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.parser = httptools.HttpRequestParser(self)
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.url = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.client = transport.get_extra_info("peername")[0]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        headers, body, url = self.headers, b"".join(self.body), self.url
        self.headers, self.body = [], []
        task = asyncio.ensure_future(self.respond(method, url, headers, body))
        PENDING.add(task)
        task.add_done_callback(PENDING.discard)

    async def respond(
        self, method: bytes, url: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> None:
        status, rheaders, rbody = await self.pool.forward(method, url, headers, body, self.client)
        self.transport.write(response_bytes(status, rheaders, rbody))


# ---- candidate: uvicorn + ASGI ------------------------------------------------------------


def asgi_app(pool: Pool):
    async def app(scope, receive, send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        target = scope["raw_path"] + (
            b"?" + scope["query_string"] if scope["query_string"] else b""
        )
        status, headers, rbody = await pool.forward(
            scope["method"].encode(), target, scope["headers"], body, scope["client"][0]
        )
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(n, v) for n, v in headers if n.lower() not in HOP],
            }
        )
        await send({"type": "http.response.body", "body": rbody})

    return app


def serve(kind: str, port: int, upstream: str) -> None:
    pool = Pool(upstream)
    if kind in ("asgi", "asgi-uvloop"):
        import uvicorn

        uvicorn.run(
            asgi_app(pool),
            host="127.0.0.1",
            port=port,
            log_level="error",
            access_log=False,
            http="httptools",
            loop="uvloop" if kind == "asgi-uvloop" else "asyncio",
            lifespan="off",
        )
        return
    if kind == "raw-uvloop":
        import uvloop

        uvloop.install()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: RawProxy(pool), "127.0.0.1", port, backlog=2048)
        await server.serve_forever()

    asyncio.run(main())


# ---- the benchmark driver -------------------------------------------------------------------


NGINX_CONF = """
{user}worker_processes 1; daemon off; pid {root}/nginx.pid; error_log {root}/error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  upstream app {{ server unix:{sock}; keepalive 64; }}
  server {{ listen unix:{sock}; location / {{ return 200 "ok\\n"; }} }}
  server {{ listen 127.0.0.1:{port};
    location / {{ proxy_pass http://app; proxy_http_version 1.1;
                 proxy_set_header Connection "";
                 proxy_set_header X-Forwarded-For $remote_addr; }} }}
}}
"""


@contextlib.contextmanager
def running(cmd: list[str], port: int) -> Iterator[None]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while (
            subprocess.run(
                ["curl", "-sf", f"http://127.0.0.1:{port}/"], capture_output=True
            ).returncode
            != 0
        ):
            if time.monotonic() > deadline:
                raise SystemExit(f"{cmd} did not answer on {port}")
            time.sleep(0.1)
        yield
    finally:
        proc.kill()
        proc.wait(10)


def wrk(port: int, connections: int, seconds: float) -> tuple[float, float, float]:
    out = subprocess.run(
        [
            "wrk",
            "-t",
            "2" if connections > 1 else "1",
            "-c",
            str(connections),
            "-d",
            f"{max(1, round(seconds))}s",
            "--latency",
            f"http://127.0.0.1:{port}/",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return rps, _latency(out, "50%"), _latency(out, "99%")


def _latency(out: str, pct: str) -> float:
    value, unit = re.search(rf"{pct}\s+([\d.]+)(us|ms|s)", out).groups()
    return float(value) * {"us": 1, "ms": 1000, "s": 1_000_000}[unit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if not shutil.which("wrk") or not shutil.which("nginx"):
        raise SystemExit("needs Debian's wrk and nginx: apt-get install wrk nginx-light")
    root = tempfile.mkdtemp(prefix="pc", dir="/tmp")
    sock = f"{root}/up.sock"
    (Path(root) / "nginx.conf").write_text(
        NGINX_CONF.format(
            root=root, sock=sock, port=18100, user="user root;\n" if os.getuid() == 0 else ""
        )
    )
    candidates = {"nginx": (None, 18100), "raw": ("raw", 18101), "asgi": ("asgi", 18103)}
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: F401

        candidates["raw-uvloop"] = ("raw-uvloop", 18102)
        candidates["asgi-uvloop"] = ("asgi-uvloop", 18104)
    results: dict[str, list[tuple[float, float, float]]] = {}
    nginx = ["nginx", "-c", f"{root}/nginx.conf", "-p", root]
    with running(nginx, 18100):
        for name, (kind, port) in candidates.items():
            cmd = [sys.executable, str(HERE), "serve", kind, str(port), sock] if kind else None
            with running(cmd, port) if cmd else contextlib.nullcontext():
                for _ in range(args.repeat):
                    rps = wrk(port, 32, args.seconds)[0]
                    _, p50, p99 = wrk(port, 1, args.seconds / 2)
                    results.setdefault(name, []).append((rps, p50, p99))
                    print(
                        f"  {name}: {rps:.0f} req/s, p50 {p50:.0f} us p99 {p99:.0f}",
                        file=sys.stderr,
                    )
    shutil.rmtree(root, ignore_errors=True)
    print(f"| candidate | req/s @32 (median of {args.repeat}) | p50 @1 (µs) | p99 @1 (µs) |")
    print("|---|---|---|---|")
    base = statistics.median(r[0] for r in results["nginx"])
    for name, runs in results.items():
        rps = statistics.median(r[0] for r in runs)
        p50 = statistics.median(r[1] for r in runs)
        p99 = statistics.median(r[2] for r in runs)
        print(f"| {name} | {rps:.0f} ({rps / base:.2f}x nginx) | {p50:.0f} | {p99:.0f} |")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        main()
