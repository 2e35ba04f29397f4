"""Header rewriting between client and app. Pure functions over ASGI byte pairs."""

from __future__ import annotations

import itertools
import re
import secrets
from typing import Any

from django.conf import settings

from proxy.forwarded import peer_of
from proxy.limits import is_trusted

Headers = list[tuple[bytes, bytes]]

# RFC 9110 §7.6.1 plus the legacy ones proxies conventionally drop. Expect is handled by
# the ASGI server on the client side; passing it on would draw a second 100 Continue.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"expect",
    }
)
# Headers the proxy sets itself; an incoming copy is replaced (X-Forwarded-For is
# extended rather than replaced, as nginx's $proxy_add_x_forwarded_for does). The body's
# framing (Content-Length or chunked) is decided per request by the forwarder.
OWN = frozenset({b"x-forwarded-proto", b"x-forwarded-host", b"x-request-id", b"content-length"})
# What a client says about where a request came from: believed only from a trusted proxy
# (TENEMENT_TRUSTED_PROXIES), otherwise dropped, so the app sees our account alone.
CLIENT_CLAIMS = frozenset({b"forwarded", b"x-forwarded-for", b"x-real-ip"})
# A Connection header cannot make these hop-by-hop: the app must always see Host.
NEVER_HOP = frozenset({b"host"})
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:@/+=-]{1,128}")
_ID_PREFIX = secrets.token_hex(8).encode()
_ID_COUNTER = itertools.count(1)


def connection_named(headers: Headers) -> frozenset[bytes]:
    """Header names listed in Connection: they are hop-by-hop for this message only."""
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(token.strip().lower() for token in value.split(b","))
    return frozenset(named) - NEVER_HOP


def end_to_end(headers: Headers) -> Headers:
    """`headers` without hop-by-hop ones (names are compared case-insensitively)."""
    named = connection_named(headers)
    drop = HOP_BY_HOP | named if named else HOP_BY_HOP
    return [(n, v) for n, v in headers if n.lower() not in drop]


def request_id(headers: Headers) -> bytes:
    """The client's X-Request-ID if it is sane, else a fresh one."""
    for name, value in headers:
        if name.lower() == b"x-request-id" and _REQUEST_ID.fullmatch(value):
            return value
    # A random per-process prefix and a counter: unique like a UUID, without a
    # urandom syscall on every request (uuid4 was 2% of the proxy's time, profiled).
    return b"%s%016x" % (_ID_PREFIX, next(_ID_COUNTER))


def forwarded(scope: dict[str, Any], host: bytes, rid: bytes) -> Headers:
    """Client headers for the app: end-to-end ones plus X-Forwarded-* and X-Request-ID.

    A client's own Forwarded, X-Forwarded-For and X-Real-IP are dropped unless it is a
    trusted proxy, whose X-Forwarded-For is extended (as nginx's
    $proxy_add_x_forwarded_for does) and whose Forwarded is kept.
    """
    out: Headers = []
    prior_for = b""
    peer = peer_of(scope)
    trusted = is_trusted(peer, settings.TENEMENT_TRUSTED_PROXIES)
    for name, value in end_to_end(scope["headers"]):
        lower = name.lower()
        if lower in CLIENT_CLAIMS and not trusted:
            continue
        if lower == b"x-forwarded-for":
            prior_for = prior_for + b", " + value if prior_for else value
        elif lower not in OWN:
            out.append((name, value))
    address = peer.encode() if peer else b"unknown"
    out.append((b"x-forwarded-for", prior_for + b", " + address if prior_for else address))
    # The scheme the client used: a trusted proxy's X-Forwarded-Proto (proxy/forwarded.py).
    secure = scope.get("scheme") in ("https", "wss")
    out.append((b"x-forwarded-proto", b"https" if secure else b"http"))
    out.append((b"x-forwarded-host", host))
    out.append((b"x-request-id", rid))
    return out


def header(headers: Headers, wanted: bytes) -> bytes | None:
    for name, value in headers:
        if name.lower() == wanted:
            return value
    return None


def request_head(method: str, target: bytes, headers: Headers, framing: Headers) -> bytes:
    """The request line and headers as bytes, ready to write to the app."""
    lines = [method.encode() + b" " + target + b" HTTP/1.1"]
    lines += [n + b": " + v for n, v in headers]
    lines += [n + b": " + v for n, v in framing]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def target(scope: dict[str, Any]) -> bytes:
    """The request target as the client sent it (raw path plus query)."""
    path = scope.get("raw_path") or scope["path"].encode()
    query = scope.get("query_string") or b""
    return path + b"?" + query if query else path
