#!/usr/bin/env python3
"""Example tenant app for tenement: a per-tenant visit counter over a Unix socket.

Stdlib only, so it runs under any Python 3.11+ without a virtualenv.

Environment (set by the supervisor):
    SOCKET_PATH   Unix socket to listen on (required)
    DATA_DIR      per-tenant directory that already exists; the counter lives here
    INSTANCE_ID   tenant id, e.g. "alice"
    SERVICE_NAME  service name from the config, e.g. "counter"
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import socketserver
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

RUNTIME = "python"
COUNTER_FILE = "counter.txt"


@dataclass(frozen=True)
class Config:
    """Values read once from the environment at startup."""

    socket_path: str
    data_dir: Path
    instance_id: str
    service: str


def load_config() -> Config:
    socket_path = os.environ.get("SOCKET_PATH", "")
    if not socket_path:
        msg = "counter.py: SOCKET_PATH is required (the Unix socket path to listen on)"
        print(msg, file=sys.stderr)
        sys.exit(2)
    return Config(
        socket_path=socket_path,
        data_dir=Path(os.environ.get("DATA_DIR", ".")),
        instance_id=os.environ.get("INSTANCE_ID", "unknown"),
        service=os.environ.get("SERVICE_NAME", "counter"),
    )


class Counter:
    """A counter persisted as a decimal integer in a text file.

    The lock serialises read-increment-write across request threads; the temp
    file + os.replace makes each write atomic, so a crash never leaves a torn file.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()

    def _read(self) -> int:
        try:
            return int(self._path.read_text().strip() or "0")
        except (FileNotFoundError, ValueError):
            # Missing or corrupt file: start over rather than refuse to serve.
            return 0

    def _write(self, value: int) -> None:
        # The pid makes the temp name unique per process; the lock covers threads.
        tmp = self._path.with_name(f".counter-{os.getpid()}.tmp")
        try:
            tmp.write_text(f"{value}\n")
            os.replace(tmp, self._path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def increment(self) -> int:
        with self._lock:
            value = self._read() + 1
            self._write(value)
            return value


class Handler(http.server.BaseHTTPRequestHandler):
    # HTTP/1.1 keeps connections alive, which the supervisor's proxy relies on;
    # every response must therefore carry Content-Length.
    protocol_version = "HTTP/1.1"
    server: CounterServer

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        cfg = self.server.config
        if path == "/health":
            health = {
                "status": "ok",
                "tenant": cfg.instance_id,
                "service": cfg.service,
                "runtime": RUNTIME,
            }
            # Compact separators so the body is byte-identical to counter.js's JSON.stringify.
            body = json.dumps(health, separators=(",", ":"))
            self._send(200, "application/json", body)
            log(f"GET {path} 200")
        elif path == "/":
            try:
                n = self.server.counter.increment()
            except OSError as exc:
                # e.g. DATA_DIR deleted or disk full: fail this request, keep serving.
                print(f"counter.py: GET {path} failed: {exc!r}", file=sys.stderr, flush=True)
                self._send(500, "text/plain; charset=utf-8", "internal error\n")
                log(f"GET {path} 500")
                return
            body = f"Hello from {cfg.instance_id} on {cfg.service} ({RUNTIME}): visit #{n}\n"
            self._send(200, "text/plain; charset=utf-8", body)
            log(f"GET {path} 200 visit={n}")
        else:
            self._not_found()

    def _not_found(self) -> None:
        # Drain any request body first, or its bytes would be parsed as the next
        # request on this keep-alive connection.
        length = int(self.headers.get("Content-Length") or 0)
        if length > 0:
            self.rfile.read(length)
        self._send(404, "text/plain; charset=utf-8", "not found\n")
        log(f"{self.command} {self.path.split('?', 1)[0]} 404")

    # Every other method is a 404 too (the default would be 501), matching counter.js.
    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _not_found

    def _send(self, status: int, content_type: str, body: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        # HEAD responses carry the headers only; a body would desync keep-alive.
        if self.command != "HEAD":
            self.wfile.write(data)

    def address_string(self) -> str:
        # client_address is "" (not a (host, port) tuple) for AF_UNIX sockets.
        return "unix"

    def log_message(self, format: str, *args: object) -> None:
        # Silence the default stderr access log; do_GET prints its own line.
        pass


class CounterServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True  # don't let a hung keep-alive client block exit

    def __init__(self, config: Config) -> None:
        self.config = config
        self.counter = Counter(config.data_dir / COUNTER_FILE)
        remove_stale_socket(config.socket_path)
        super().__init__(config.socket_path, Handler)


def log(line: str) -> None:
    # Flush every line: stdout is a pipe under the supervisor, so it's block-buffered.
    print(line, flush=True)


def remove_stale_socket(path: str) -> None:
    # A socket file left by a crashed previous run would make bind() fail.
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def install_sigterm(server: CounterServer) -> None:
    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        # shutdown() blocks until serve_forever returns, and serve_forever runs on
        # this (main) thread, so calling it directly here would deadlock.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_sigterm)


def main() -> int:
    config = load_config()
    server = CounterServer(config)
    install_sigterm(server)
    log(f"listening on {config.socket_path}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        remove_stale_socket(config.socket_path)
    log("shut down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
