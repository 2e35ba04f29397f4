"""The REST API over urllib: JSON in and out, every failure mapped to a documented exit code."""

from __future__ import annotations

import contextlib
import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from enum import IntEnum
from typing import Any

# The log stream sends a keepalive every 15 s; silence much longer than that is a dead link.
STREAM_IDLE_TIMEOUT = 45.0


class Exit(IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    UNAVAILABLE = 3
    CONNECT = 4
    AUTH = 5
    NOT_FOUND = 6
    CONFLICT = 7
    RATE_LIMITED = 8


class CliError(Exception):
    """A failure reported as one line on stderr, with the exit code scripts rely on."""

    def __init__(self, message: str, code: Exit = Exit.FAILED) -> None:
        super().__init__(message)
        self.code = code


class ApiError(CliError):
    """An HTTP error answer from the API."""

    def __init__(self, status: int, message: str, code: Exit) -> None:
        super().__init__(message, code)
        self.status = status


STATUS_EXITS = {
    400: Exit.USAGE,
    401: Exit.AUTH,
    403: Exit.AUTH,
    404: Exit.NOT_FOUND,
    409: Exit.CONFLICT,
    429: Exit.RATE_LIMITED,
}


def api_path(*parts: str, slash: bool = True) -> str:
    """/api/a/b/ with every part quoted: a token name may hold '/', '?' or '%'."""
    quoted = "/".join(urllib.parse.quote(p, safe="") for p in parts)
    return f"/api/{quoted}/" if slash else f"/api/{quoted}"


def check_server(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise CliError(
            f"invalid server URL {url!r}: expected http://HOST:PORT (--server or TENEMENT_SERVER)",
            Exit.USAGE,
        )
    return url.rstrip("/")


class Client:
    def __init__(self, server: str, token: str | None, timeout: float) -> None:
        self.server = check_server(server)
        self.token = token or None
        self.timeout = timeout

    def call(
        self,
        method: str,
        path: str,
        query: dict[str, Any] | None = None,
        body: dict[str, Any] | None = None,
    ) -> Any:
        """One request; the decoded JSON answer, or None for an empty one (204)."""
        with self._open(method, path, query, body, self.timeout) as response:
            data = self._read(response)
        return self._decode(data) if data.strip() else None

    @contextlib.contextmanager
    def events(
        self, path: str, query: dict[str, Any], last_id: int | None = None
    ) -> Iterator[Iterator[Any]]:
        """A Server-Sent Events stream: the connection is open once this is entered."""
        # JSON too: errors come as JSON, and DRF's content negotiation refuses an Accept
        # that none of the view's renderers produce (406), even for a streamed answer.
        headers = {"Accept": "text/event-stream, application/json"}
        if last_id is not None:
            headers["Last-Event-ID"] = str(last_id)  # the server resumes after this line
        timeout = max(self.timeout, STREAM_IDLE_TIMEOUT)
        with self._open("GET", path, query, None, timeout, headers) as response:
            yield self._event_iter(response)

    def _event_iter(self, response: Iterable[bytes]) -> Iterator[Any]:
        try:
            yield from parse_sse(response)
        except (OSError, http.client.HTTPException) as e:
            message = f"lost the stream from {self.server}: {_reason(e)}"
            raise CliError(message, Exit.CONNECT) from None
        raise CliError(f"the server at {self.server} ended the stream", Exit.CONNECT)

    def _open(
        self,
        method: str,
        path: str,
        query: dict[str, Any] | None,
        body: dict[str, Any] | None,
        timeout: float,
        headers: dict[str, str] | None = None,
    ) -> http.client.HTTPResponse:
        request = self._request(method, path, query, body, headers or {})
        try:
            return urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as e:
            raise self._http_error(e) from None
        except (OSError, http.client.HTTPException) as e:  # URLError and timeouts are OSErrors
            raise self._connect_error(e) from None

    def _request(
        self,
        method: str,
        path: str,
        query: dict[str, Any] | None,
        body: dict[str, Any] | None,
        headers: dict[str, str],
    ) -> urllib.request.Request:
        params = {k: v for k, v in (query or {}).items() if v is not None}
        url = self.server + path + (f"?{urllib.parse.urlencode(params)}" if params else "")
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Accept", "application/json")
        for name, value in headers.items():
            request.add_header(name, value)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            # Unredirected: a redirect to another host must not carry the secret along.
            request.add_unredirected_header("Authorization", f"Bearer {self.token}")
        return request

    def _read(self, response: http.client.HTTPResponse) -> bytes:
        try:
            return response.read()
        except (OSError, http.client.HTTPException) as e:
            raise self._connect_error(e) from None

    def _decode(self, data: bytes) -> Any:
        try:
            return json.loads(data)
        except ValueError:
            raise CliError(
                f"{self.server} did not answer with JSON: is it a tenement server?"
            ) from None

    def _connect_error(self, e: BaseException) -> CliError:
        return CliError(
            f"cannot connect to {self.server} ({_reason(e)}): is the server running? "
            "Check --server or TENEMENT_SERVER",
            Exit.CONNECT,
        )

    def _http_error(self, e: urllib.error.HTTPError) -> ApiError:
        body = b""
        with contextlib.suppress(OSError, http.client.HTTPException):
            body = e.read()
        message = _error_message(body) or f"HTTP {e.code} {e.reason}"
        code = STATUS_EXITS.get(e.code, Exit.FAILED)
        return ApiError(e.code, self._explain(e, message), code)

    def _explain(self, e: urllib.error.HTTPError, message: str) -> str:
        if e.code == 401 and not self.token:
            return "no token: pass --token or set TENEMENT_TOKEN (see manage.py createtoken)"
        if e.code == 401:
            return f"the server refused the token ({message})"
        if e.code == 403 and "scope" not in message and "tenant" not in message:
            return f"not allowed: {message} (the token lacks the scope or tenant for this)"
        if e.code == 403:
            return f"not allowed: {message}"
        if e.code == 429:
            retry = e.headers.get("Retry-After", "?")
            return f"rate limited: {message}; retry after {retry}s"
        if e.code == 404 and message.startswith("HTTP "):
            # Not the API's JSON error: the endpoint itself is missing.
            return f"{e.url} does not exist (HTTP 404): is {self.server} a tenement server?"
        return message


def _error_message(body: bytes) -> str | None:
    """The API's {"error": {"message", "fields"}} as one line, or None if not that shape."""
    try:
        error = json.loads(body)["error"]
        message = str(error["message"])
    except (ValueError, KeyError, TypeError):
        return None
    fields = error.get("fields")
    if isinstance(fields, dict) and fields:
        message += ": " + "; ".join(f"{k}: {_flat(v)}" for k, v in fields.items())
    return message


def _flat(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(_flat(v) for v in value)
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_flat(v)}" for k, v in value.items())
    return str(value)


def _reason(e: BaseException) -> str:
    reason = getattr(e, "reason", None) or e
    if isinstance(reason, TimeoutError) or "timed out" in str(reason):
        return "timed out"
    return getattr(reason, "strerror", None) or str(reason) or type(reason).__name__


def parse_sse(lines: Iterable[bytes]) -> Iterator[Any]:
    """The JSON `data:` of each event; comments (`: keepalive`), id: and event: are skipped."""
    data: list[str] = []
    for raw in lines:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif not line and data:
            try:
                yield json.loads("\n".join(data))
            except ValueError:
                raise CliError("the server sent a malformed event") from None
            data = []


def client_from(args: Any) -> Client:
    """The client for parsed arguments (app.main has resolved the environment defaults)."""
    return Client(args.server, args.token, args.timeout)
