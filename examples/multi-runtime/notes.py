#!/usr/bin/env python3
"""Multi-runtime example: a per-tenant notes API with its own bearer token, in Python.

Stdlib only (Python 3.11+). notes.js is the same program in Node; the two answer the same
requests with the same status codes and JSON shapes, only "runtime" differs.

Environment (set by the supervisor):
    SOCKET_PATH   Unix socket to listen on (required)
    DATA_DIR      this tenant's private directory, already created 0700 (required)
    INSTANCE_ID   tenant id, e.g. "alice" (required)
    SERVICE_NAME  service name from the config, e.g. "notes-py"

Files in DATA_DIR: api_token (created on first start, mode 0600, reused afterwards) and
notes.json (rewritten atomically on every new note).
"""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import os
import re
import secrets
import signal
import socketserver
import stat
import sys
import tempfile
import threading
import traceback
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

RUNTIME = "python"
MAX_BODY = 64 * 1024
DISCARD_LIMIT = 1024 * 1024
# A rejected body up to this size is read and discarded so the keep-alive connection
# survives; anything bigger (or chunked) closes the connection instead.
DRAIN_LIMIT = 1024 * 1024
# Above the 60 s idle timeout of common proxies' upstream pools, so the app is never
# the side that closes a pooled connection just as a request is sent on it.
IDLE_TIMEOUT = 65
BEARER = re.compile(r"Bearer +([A-Za-z0-9\-._~+/]+=*)", re.IGNORECASE)
CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,8}")


@dataclass(frozen=True)
class Config:
    socket_path: str
    data_dir: Path
    instance_id: str
    service: str


class HttpError(Exception):
    """An answer other than success: status, a message for the client, extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def load_config() -> Config:
    missing = [k for k in ("SOCKET_PATH", "DATA_DIR", "INSTANCE_ID") if not os.environ.get(k)]
    if missing:
        fail(f"{', '.join(missing)} must be set (tenement sets them for every instance)")
    return Config(
        socket_path=os.environ["SOCKET_PATH"],
        data_dir=Path(os.environ["DATA_DIR"]),
        instance_id=os.environ["INSTANCE_ID"],
        service=os.environ.get("SERVICE_NAME", "notes-py"),
    )


def fail(message: str) -> NoReturn:
    print(f"notes.py: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def load_or_create_token(data_dir: Path) -> str:
    """This tenant's API token: read it, or create it once (0600) if there is none."""
    path = data_dir / "api_token"
    if not path.exists():
        tmp = data_dir / f".api_token-{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            # link, unlike rename, never replaces a token someone created meanwhile.
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)  # a secret: tighten a copy that was restored with looser bits
    token = path.read_text().strip()
    if not BEARER.fullmatch(f"Bearer {token}"):
        # Never silently replace a secret that clients may hold; let the operator decide.
        fail(f"{path} is empty or malformed; delete it to generate a new token")
    return token


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, None if absent or malformed."""
    match = BEARER.fullmatch(header.strip()) if header else None
    return match.group(1) if match else None


def tokens_match(given: str, expected: str) -> bool:
    # Hashing first gives equal lengths, so the comparison leaks neither content nor length.
    given_hash, expected_hash = (hashlib.sha256(t.encode()).digest() for t in (given, expected))
    return hmac.compare_digest(given_hash, expected_hash)


def parse_note(body: bytes) -> str:
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise HttpError(400, 'body must be JSON like {"text": "..."}') from None
    if not isinstance(data, dict) or not isinstance(data.get("text"), str) or not data["text"]:
        raise HttpError(400, 'body must be a JSON object with a non-empty string "text"')
    return data["text"]


def now_iso() -> str:
    # Same format as JavaScript's Date.toISOString(), so both runtimes store alike.
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class NoteStore:
    """Notes in one JSON file; a lock serialises request threads' read-modify-write."""

    path: Path
    lock: threading.Lock = field(default_factory=threading.Lock)

    def all(self) -> list[dict[str, Any]]:
        try:
            notes = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        # A corrupt file raises (500) rather than being overwritten: stored notes stay.
        if not isinstance(notes, list):
            raise ValueError(f"{self.path}: expected a JSON list")
        return notes

    def add(self, text: str) -> dict[str, Any]:
        with self.lock:
            notes = self.all()
            next_id = max((n["id"] for n in notes), default=0) + 1
            note = {"id": next_id, "text": text, "created_at": now_iso()}
            self._write([*notes, note])
            return note

    def _write(self, notes: list[dict[str, Any]]) -> None:
        # Temp file + fsync + rename: a crash leaves the old file or the new one, never half.
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".notes-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(notes, f, separators=(",", ":"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class Handler(http.server.BaseHTTPRequestHandler):
    # HTTP/1.1 keep-alive: every response carries Content-Length.
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT
    server: NotesServer

    def do_GET(self) -> None:
        self._body_done = False
        try:
            status, payload = self._route()
            headers: dict[str, str] = {}
        except HttpError as err:
            status, payload, headers = err.status, {"error": err.message}, err.headers
        except Exception:
            # Details go to stderr (the supervisor's log), never to the client.
            traceback.print_exc(file=sys.stderr)
            status, payload, headers = 500, {"error": "internal error"}, {}
        self._finish_body()
        self._send_json(status, payload, headers)

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    def _route(self) -> tuple[int, Any]:
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._allow("GET", "HEAD")
            return 200, self.server.health()
        self._authorize()
        if path != "/notes":
            raise HttpError(404, "not found")
        self._allow("GET", "HEAD", "POST")
        if self.command == "POST":
            return 201, self.server.store.add(parse_note(self._read_body()))
        return 200, {"tenant": self.server.config.instance_id, "notes": self.server.store.all()}

    def _allow(self, *methods: str) -> None:
        if self.command not in methods:
            raise HttpError(405, "method not allowed", {"Allow": ", ".join(methods)})

    def _authorize(self) -> None:
        headers = self.headers.get_all("Authorization") or []
        token = bearer_token(headers[0]) if len(headers) == 1 else None
        if token is None:
            challenge = {"WWW-Authenticate": 'Bearer realm="notes"'}
            raise HttpError(401, "missing or malformed bearer token", challenge)
        if not tokens_match(token, self.server.token):
            raise HttpError(403, "invalid token")

    def _read_body(self) -> bytes:
        self._body_done = True
        if self.headers.get("Transfer-Encoding") is not None:
            return self._read_chunked()
        length = self._content_length()
        if length > MAX_BODY:
            self.close_connection = True  # rather than read a body we refuse to store
            if length <= DISCARD_LIMIT:
                # Read and drop a modest body first: closing on unread data makes the
                # kernel send a reset, and the client would never see this 413.
                self.rfile.read(length)
            raise HttpError(413, f"body over {MAX_BODY} bytes")
        return self.rfile.read(length)

    def _content_length(self) -> int:
        values = self.headers.get_all("Content-Length") or ["0"]
        if len(values) != 1 or not values[0].strip().isdigit():
            self.close_connection = True  # the body's end is unknown
            raise HttpError(400, "bad Content-Length")
        return int(values[0])

    def _read_chunked(self) -> bytes:
        # Both framings at once (a smuggling trick) or an unknown coding: refuse and close,
        # since where this body ends is unknown.
        self.close_connection = True
        if self.headers.get("Content-Length") is not None:
            raise HttpError(400, "both Content-Length and Transfer-Encoding")
        if self.headers.get("Transfer-Encoding", "").strip().lower() != "chunked":
            raise HttpError(400, "unsupported Transfer-Encoding")
        self.close_connection = False
        body = bytearray()
        while size := self._chunk_size():
            if len(body) + size > MAX_BODY:
                self.close_connection = True
                raise HttpError(413, f"body over {MAX_BODY} bytes")
            body += self.rfile.read(size)
            self.rfile.readline(64)
        while self.rfile.readline(8192).strip():
            pass  # trailers, up to the blank line
        return bytes(body)

    def _chunk_size(self) -> int:
        line = self.rfile.readline(1024).split(b";", 1)[0].strip()
        if not CHUNK_SIZE.fullmatch(line):
            self.close_connection = True
            raise HttpError(400, "bad chunked body")
        return int(line, 16)

    def _finish_body(self) -> None:
        """Consume an unread request body, or else close: its bytes are not a next request."""
        if self._body_done or self.close_connection:
            return
        if self.headers.get("Transfer-Encoding") is not None:
            self.close_connection = True
            return
        value = (self.headers.get("Content-Length") or "0").strip()
        if value.isdigit() and int(value) <= DRAIN_LIMIT:
            self.rfile.read(int(value))
        else:
            self.close_connection = True

    def _send_json(self, status: int, payload: Any, headers: dict[str, str]) -> None:
        data = json.dumps(payload, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":  # a HEAD body would desync keep-alive
            self.wfile.write(data)

    def address_string(self) -> str:
        return "unix"  # client_address is "" on AF_UNIX sockets

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # http.server's own rejections (bad request line, too many headers...) as JSON too.
        self.close_connection = True
        self._send_json(code, {"error": message or HTTPStatus(code).phrase}, {})

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # Called once per response, send_error's too. The token is never logged.
        path = (getattr(self, "path", "") or "").split("?", 1)[0]
        print(f"{self.command or '-'} {path or '-'} {getattr(code, 'value', code)}", flush=True)

    def log_message(self, format: str, *args: object) -> None:
        pass  # log_request prints the one line per request


class NotesServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True  # an idle keep-alive connection must not delay exit
    request_queue_size = 128  # the default backlog of 5 refuses bursts from the proxy

    def __init__(self, config: Config) -> None:
        self.config = config
        self.token = load_or_create_token(config.data_dir)
        self.store = NoteStore(config.data_dir / "notes.json")
        remove_stale_socket(config.socket_path)
        super().__init__(config.socket_path, Handler)

    def health(self) -> dict[str, str]:
        cfg = self.config
        return {
            "status": "ok",
            "tenant": cfg.instance_id,
            "runtime": RUNTIME,
            "service": cfg.service,
        }


def remove_stale_socket(path: str) -> None:
    """Remove a socket left by a crashed run (bind would fail), but never another file."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        fail(f"{path} exists and is not a socket; refusing to remove it")
    os.unlink(path)


def install_signal_handlers(server: NotesServer) -> None:
    def stop(signum: int, frame: FrameType | None) -> None:
        # shutdown() waits for serve_forever, which runs on this very thread: hand it off.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def main() -> int:
    config = load_config()
    server = NotesServer(config)
    install_signal_handlers(server)
    print(f"listening on {config.socket_path}", flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()
        remove_stale_socket(config.socket_path)
    print("shut down", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
