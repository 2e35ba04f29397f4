"""A tenant app whose misbehaviour the tests choose through environment variables.

TESTAPP_START_DELAY  seconds to wait before listening
TESTAPP_HEALTH       "ok" (default), "fail" (always 500),
                     or "file" (500 while $DATA_DIR/unhealthy exists)
TESTAPP_IGNORE_TERM  "1": ignore SIGTERM
TESTAPP_EXIT_AFTER   seconds after start to exit with TESTAPP_EXIT_CODE (default 3)
TESTAPP_LINES        print this many numbered lines to stdout at start
TESTAPP_LONG_LINE    print one line of this many bytes, then "after the long line"
TESTAPP_ALSO_PORT    "1": also serve on 127.0.0.1:$PORT
"""

from __future__ import annotations

import json
import os
import signal
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler

ENV = os.environ


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def address_string(self) -> str:
        return "unix"

    def log_message(self, format: str, *args: object) -> None:
        print(f"{self.command} {self.path}", flush=True)

    def do_GET(self) -> None:
        route = self.path.split("?")[0]
        if route == "/health":
            self.send(500 if unhealthy() else 200, b"ok\n")
        elif route == "/env":
            self.send(200, json.dumps(dict(os.environ)).encode())
        elif route == "/count":
            self.send(200, str(bump_counter()).encode())
        elif route == "/hold":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b"x")
            self.wfile.flush()
            time.sleep(3600)  # the test closes the connection or stops the app
        elif route == "/stderr":
            print("to stderr", file=sys.stderr, flush=True)
            self.send(200, b"ok")
        else:
            self.send(404, b"not found")

    def send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def unhealthy() -> bool:
    mode = ENV.get("TESTAPP_HEALTH", "ok")
    if mode == "file":
        return os.path.exists(os.path.join(ENV["DATA_DIR"], "unhealthy"))
    return mode == "fail"


def bump_counter() -> int:
    path = os.path.join(ENV["DATA_DIR"], "count")
    n = int(open(path).read()) + 1 if os.path.exists(path) else 1
    with open(path, "w") as f:
        f.write(str(n))
    return n


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def main() -> None:
    if ENV.get("TESTAPP_IGNORE_TERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    for i in range(int(ENV.get("TESTAPP_LINES", "0"))):
        print(f"line {i}", flush=True)
    if long_line := int(ENV.get("TESTAPP_LONG_LINE", "0")):
        print("L" * long_line + "\nafter the long line", flush=True)
    if exit_after := ENV.get("TESTAPP_EXIT_AFTER"):
        code = int(ENV.get("TESTAPP_EXIT_CODE", "3"))
        threading.Timer(float(exit_after), lambda: os._exit(code)).start()
    time.sleep(float(ENV.get("TESTAPP_START_DELAY", "0")))
    path = ENV["SOCKET_PATH"]
    if os.path.exists(path):
        os.unlink(path)
    server = Server(path, Handler)
    if ENV.get("TESTAPP_ALSO_PORT") == "1":
        tcp = socketserver.ThreadingTCPServer(("127.0.0.1", int(ENV["PORT"])), Handler)
        threading.Thread(target=tcp.serve_forever, daemon=True).start()
    print(f"listening on {path}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
