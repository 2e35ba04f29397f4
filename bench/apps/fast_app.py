"""The benchmarks' tenant app: a fast stdlib HTTP/1.1 keep-alive server on asyncio.Protocol.

`GET /` and `GET /health` answer 200 "ok"; any other path 404. Requests may be pipelined;
`Connection: close` (or HTTP/1.0 without keep-alive) closes after the response.

Listens on $SOCKET_PATH if set, else on TCP 127.0.0.1:$PORT; `--tcp` forces TCP (upstream
`ten` sets both variables but proxies to the port). `--spawn-log FILE --tag NAME` appends
"NAME PID" to FILE at start, so a benchmark can count how many copies a wake started.
`--say VAR` makes `GET /` answer $VAR's value instead of "ok" (which release answered).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n"
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\n\r\nnot found\n"
BAD = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
MAX_HEAD = 64 * 1024
SAY = b""  # set by --say


def say(value: str) -> bytes:
    body = value.encode() + b"\n"
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )


class HttpProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.skip = 0  # body bytes of the current request still to discard

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        out = []
        while self.transport is not None:
            if self.skip:
                dropped = min(self.skip, len(self.buffer))
                self.buffer, self.skip = self.buffer[dropped:], self.skip - dropped
                if self.skip:
                    break
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                if len(self.buffer) > MAX_HEAD:
                    out.append(BAD)
                    self.close(out)
                break
            self.buffer = rest
            response, keep_alive, self.skip = self.respond(head)
            out.append(response)
            if not keep_alive:
                self.close(out)
                return
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    def respond(self, head: bytes) -> tuple[bytes, bool, int]:
        """(response, keep the connection open?, request body length to discard)."""
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return BAD, False, 0
        method, target, version = parts
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        try:
            length = int(headers.get(b"content-length", b"0"))
        except ValueError:
            return BAD, False, 0
        connection = headers.get(b"connection", b"")
        keep_alive = connection != b"close" and (
            version == b"HTTP/1.1" or connection == b"keep-alive"
        )
        path = target.partition(b"?")[0]
        found = method in (b"GET", b"HEAD") and path in (b"/", b"/health")
        answer = SAY if path == b"/" and SAY else OK
        return (answer if found else NOT_FOUND), keep_alive, length

    def close(self, out: list[bytes]) -> None:
        assert self.transport is not None
        self.transport.write(b"".join(out))
        self.transport.close()
        self.transport = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(tcp: bool) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    socket_path = os.environ.get("SOCKET_PATH")
    if socket_path and not tcp:
        server = await loop.create_unix_server(HttpProtocol, socket_path, backlog=2048)
    else:
        port = int(os.environ["PORT"])
        server = await loop.create_server(HttpProtocol, "127.0.0.1", port, backlog=2048)
    async with server:
        await stop.wait()
    if socket_path and not tcp:
        os.unlink(socket_path)  # Python 3.11's server.close() leaves it behind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tcp", action="store_true", help="listen on $PORT even if $SOCKET_PATH")
    parser.add_argument("--spawn-log", help="append 'TAG PID' to this file at start")
    parser.add_argument("--tag", default="-", help="the TAG for --spawn-log")
    parser.add_argument("--say", metavar="VAR", help="GET / answers $VAR's value")
    args = parser.parse_args()
    if args.say:
        global SAY
        SAY = say(os.environ.get(args.say, ""))
    if args.spawn_log:
        fd = os.open(args.spawn_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, f"{args.tag} {os.getpid()}\n".encode())
        os.close(fd)
    asyncio.run(serve(args.tcp))


if __name__ == "__main__":
    main()
