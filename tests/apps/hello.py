"""A tenant app for the dashboard's browser tests: says hello, prints every request.

HELLO_START_DELAY  seconds to wait before listening (a start a page can watch)

GET /health   200 "ok"
GET /ANYTHING 200 "hello from INSTANCE_ID"; prints "hello-app served /ANYTHING" to stdout
              (a line the log search and the live tail can find)
"""

from __future__ import annotations

import os
import signal
import socketserver
import sys
import time
from http.server import BaseHTTPRequestHandler


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def address_string(self) -> str:
        return "unix"

    def log_message(self, format: str, *args: object) -> None:
        pass  # do_GET prints its own line; health probes stay quiet

    def do_GET(self) -> None:
        if self.path == "/health":
            self.send(b"ok\n")
            return
        print(f"hello-app served {self.path}", flush=True)
        self.send(f"hello from {os.environ['INSTANCE_ID']}\n".encode())

    def send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # A health probe that hangs up early is normal: no traceback in the tenant's log.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    time.sleep(float(os.environ.get("HELLO_START_DELAY", "0")))
    path = os.environ["SOCKET_PATH"]
    if os.path.exists(path):
        os.unlink(path)
    Server(path, Handler).serve_forever()


if __name__ == "__main__":
    main()
