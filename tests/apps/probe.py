"""A hostile tenant: it tries every escape the isolation tests care about and reports.

GET /health          200
GET /probe?...       JSON: for each attempt, what it could do ("ok: ...") or the error.
                     Query: secret=PATH db=PATH config=PATH other_dir=PATH other_sock=PATH
                            control=HOST:PORT outbound=HOST:PORT
GET /spin            burn CPU for ?seconds=N on this thread, then answer how much it got
GET /hog             allocate ?mb=N megabytes (the memory limit should kill us)
GET /forkbomb        fork until refused; answers how many children it managed
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import sys
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler
from typing import Any


def attempt(fn: Any) -> str:
    try:
        return f"ok: {str(fn())[:200]}"
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def read(path: str) -> str:
    with open(path, "rb") as f:
        return f.read(100).decode("latin-1")


def supervisor_environ() -> str:
    """Find runsupervisor among the processes we can see and read its environment."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = read(f"/proc/{pid}/cmdline")
        except OSError:
            continue
        if "runsupervisor" in cmdline or "pytest" in cmdline:
            return read(f"/proc/{pid}/environ")
    raise LookupError("no supervisor process visible")


def connect_unix(path: str) -> str:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(2)
        s.connect(path)
    return "connected"


def http_get(address: str, path: str) -> str:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=2) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        head = s.recv(200).decode("latin-1")
    status = head.split(" ", 2)[1]
    if not status.startswith("2"):
        raise PermissionError(f"HTTP {status}")
    return f"HTTP {status}"


def tcp_connect(address: str) -> str:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=2):
        return "connected"


def visible_pids() -> list[str]:
    return sorted(p for p in os.listdir("/proc") if p.isdigit())


def probe(q: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "uid": os.getuid(),
        "pids": visible_pids(),
        "supervisor_environ": attempt(supervisor_environ),
        "tmp": sorted(os.listdir("/tmp")),
    }
    for key in ("secret", "db", "config"):
        if q.get(key):
            out[key] = attempt(lambda p=q[key]: read(p))
    if q.get("other_dir"):
        out["other_dir_list"] = attempt(lambda: os.listdir(q["other_dir"]))
        out["other_dir_write"] = attempt(
            lambda: open(os.path.join(q["other_dir"], "pwned"), "w").write("x")
        )
    if q.get("data_root"):
        out["data_root_list"] = attempt(lambda: sorted(os.listdir(q["data_root"])))
    if q.get("other_sock"):
        out["other_sock"] = attempt(lambda: connect_unix(q["other_sock"]))
    if q.get("control"):
        out["metrics"] = attempt(lambda: http_get(q["control"], "/metrics"))
        out["status"] = attempt(lambda: http_get(q["control"], "/status"))
    if q.get("outbound"):
        out["outbound"] = attempt(lambda: tcp_connect(q["outbound"]))
    return out


def spin(seconds: float) -> float:
    """Busy-loop for `seconds` of wall time; return the CPU seconds we actually got."""
    start, cpu = time.monotonic(), time.process_time()
    while time.monotonic() - start < seconds:
        pass
    return time.process_time() - cpu


def forkbomb() -> int:
    children = 0
    try:
        while children < 100_000:
            pid = os.fork()
            if pid == 0:
                time.sleep(30)
                os._exit(0)
            children += 1
    except OSError:
        pass
    return children


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def address_string(self) -> str:
        return "unix"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        q = dict(urllib.parse.parse_qsl(url.query))
        if url.path == "/health":
            body: Any = "ok"
        elif url.path == "/probe":
            body = probe(q)
        elif url.path == "/spin":
            body = {"cpu": spin(float(q.get("seconds", "3")))}
        elif url.path == "/hog":
            hog = [bytearray(2**20) for _ in range(int(q.get("mb", "512")))]
            body = {"held_mb": len(hog)}
        elif url.path == "/forkbomb":
            body = {"children": forkbomb()}
        else:
            body = "not found"
        self.answer(body)

    # POST /hog: not retried by the proxy when the app dies mid-request, as a GET would be.
    do_POST = do_GET

    def answer(self, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def main() -> None:
    path = os.environ["SOCKET_PATH"]
    if os.environ.get("PROBE_ONE_CPU"):
        os.sched_setaffinity(0, {0})  # contend for one core with the other tenant
    with Server(path, Handler) as server:
        print(f"probe listening on {path} as uid {os.getuid()}", flush=True)
        sys.stdout.flush()
        server.serve_forever()


if __name__ == "__main__":
    main()
