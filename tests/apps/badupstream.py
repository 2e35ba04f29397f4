"""A tenant app that accepts connections but answers every request with garbage.

With `health = ""` (connect-only readiness) it counts as running, and every request the
proxy forwards to it ends in 502: the log-line and header tests need a real one.
"""

from __future__ import annotations

import os
import signal
import socketserver


class Garbage(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.rfile.readline()  # the request line: then answer something that is not HTTP
        self.wfile.write(b"this is not HTTP\r\n\r\n")


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    path = os.environ["SOCKET_PATH"]
    if os.path.exists(path):
        os.unlink(path)
    Server(path, Garbage).serve_forever()


if __name__ == "__main__":
    main()
