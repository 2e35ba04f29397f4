"""Protocol abuse against the edge: every case gets one 4xx and the connection ends.

"No desync": each attack carries a second request for bob's tenant behind it (smuggled in
a body, after a bad framing...). Exactly one response may come back, never bob's.
"""

from __future__ import annotations

import re

import pytest

from tests.edge.conftest import Edge

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

A = b"alice.edge.localhost"
B = b"bob.edge.localhost"
SMUG = b"GET /whoami HTTP/1.1\r\nHost: " + B + b"\r\n\r\n"


def req(head: bytes, body: bytes = b"") -> bytes:
    return head.replace(b"{A}", A) + b"\r\n\r\n" + body


def post(headers: bytes, body: bytes) -> bytes:
    """A POST to alice with these framing headers, the body, and bob's request behind."""
    return b"POST /upload HTTP/1.1\r\nHost: " + A + b"\r\n" + headers + b"\r\n\r\n" + body


def get(line: bytes = b"GET /whoami HTTP/1.1", headers: bytes = b"Host: " + A) -> bytes:
    return line + b"\r\n" + headers + b"\r\n\r\n"


TE = b"Transfer-Encoding: chunked"
ZERO = b"0\r\n\r\n"
ABUSE = {
    # Smuggling: two framings, obfuscated Transfer-Encoding, odd Content-Length.
    "cl_te": post(b"Content-Length: 5\r\n" + TE, ZERO),
    "te_cl": post(TE + b"\r\nContent-Length: 60", ZERO),
    "te_xchunked": post(b"Transfer-Encoding: xchunked", ZERO),
    "te_space_colon": post(b"Transfer-Encoding : chunked", ZERO),
    "te_double": post(TE + b"\r\nTransfer-Encoding: identity", ZERO),
    "te_chunked_gzip": post(b"Transfer-Encoding: chunked, gzip", ZERO),
    "te_http10": post(TE, ZERO).replace(b"HTTP/1.1", b"HTTP/1.0"),
    "cl_double": post(b"Content-Length: 5\r\nContent-Length: 6", b"hello!"),
    "cl_list": post(b"Content-Length: 5, 5", b"hello"),
    "cl_plus": post(b"Content-Length: +5", b"hello"),
    "cl_negative": post(b"Content-Length: -1", b"hello"),
    "cl_hex": post(b"Content-Length: 0x5", b"hello"),
    "cl_huge": post(b"Content-Length: 99999999999999999999999", b"hello"),
    # Bad chunked bodies.
    "chunk_bad_size": post(TE, b"zz\r\nhello\r\n" + ZERO),
    "chunk_overflow": post(TE, b"fffffffffffffffff1\r\nhello\r\n" + ZERO),
    "chunk_no_crlf": post(TE, b"5\r\nhelloXX" + ZERO),
    "chunk_bare_lf": post(TE, b"5\nhello\n0\n\n"),
    "chunk_ext_lf": post(TE, b"5;a\nb\r\nhello\r\n" + ZERO),
    "chunk_space_size": post(TE, b"5 \r\nhello\r\n" + ZERO),
    # Line endings and folding.
    "bare_lf_head": b"GET /whoami HTTP/1.1\nHost: " + A + b"\n\n",
    "bare_lf_header": get(headers=b"Host: " + A + b"\nX-A: 1"),
    "bare_cr": get(b"GET /whoami HTTP/1.1\rHost: " + A, b"X-A: 1"),
    "obs_fold": get(headers=b"Host: " + A + b"\r\nX-A: a\r\n b"),
    "obs_fold_host": get(headers=b"X-A: a\r\nHost: " + A + b"\r\n " + B),
    "leading_space_header": get(headers=b" Host: " + A),
    "header_no_colon": get(headers=b"Host: " + A + b"\r\nXA"),
    # Targets: absolute-form for another host, authority-form, '*' with GET.
    "absolute_form_other_host": get(b"GET http://" + B + b"/whoami HTTP/1.1"),
    "authority_form": get(b"CONNECT " + B + b":80 HTTP/1.1"),
    "asterisk_get": get(b"GET * HTTP/1.1"),
    # Control characters, bad methods and versions.
    "ctl_header_value": get(headers=b"Host: " + A + b"\r\nX-A: a\x01b"),
    "nul_header_value": get(headers=b"Host: " + A + b"\r\nX-A: a\x00b"),
    "del_header_name": get(headers=b"Host: " + A + b"\r\nX\x7fA: 1"),
    "ctl_url": get(b"GET /who\x01ami HTTP/1.1"),
    "space_url": get(b"GET /who ami HTTP/1.1"),
    "bad_method": get(b"G@T /whoami HTTP/1.1"),
    "http09": b"GET /whoami\r\n\r\n",
    "http2_preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "bad_version": get(b"GET /whoami HTTP/1.7"),
    # Hosts: twice, missing, IDNA (raw UTF-8 and an A-label nobody registered), odd bytes.
    "host_twice": get(headers=b"Host: " + A + b"\r\nHost: " + B),
    "host_space_before_colon": get(headers=b"Host : " + A),
    "host_missing": get(headers=b"X-A: 1"),
    "host_idna_utf8": get(headers=b"Host: \xd0\xb0lice.edge.localhost"),
    # Well framed (a 404 keeps the connection): its own Connection: close ends it.
    "host_idna_a_label": get(headers=b"Host: xn--lice-43d.edge.localhost\r\nConnection: close"),
    "host_space": get(headers=b"Host: alice .edge.localhost"),
    "host_userinfo": get(headers=b"Host: bob@alice.edge.localhost"),
    "host_vertical_tab": get(headers=b"Host: alice\x0b.edge.localhost"),
}


@pytest.mark.parametrize("raw", ABUSE.values(), ids=ABUSE.keys())
def test_abuse_gets_one_4xx_and_no_desync(edge: Edge, raw: bytes) -> None:
    response = edge.exchange(raw + SMUG, timeout=5)
    statuses = re.findall(rb"HTTP/1\.[01] (\d{3}) ", response)
    assert len(statuses) == 1, response[:500]
    assert 400 <= int(statuses[0]) < 500, response[:300]
    assert b'"instance": "bob"' not in response
    assert b"Traceback" not in response


def test_well_formed_look_alikes_are_served(edge: Edge) -> None:
    absolute = edge.exchange(
        req(b"GET http://" + A + b"/whoami HTTP/1.1\r\nHost: {A}\r\nConnection: close")
    )
    assert b'"instance": "alice"' in absolute
    options = edge.exchange(req(b"OPTIONS * HTTP/1.1\r\nHost: {A}\r\nConnection: close"))
    assert options.startswith(b"HTTP/1.1 404")  # the app's answer: it was forwarded
    # Connection cannot make Host hop-by-hop: the app still sees it.
    named = edge.exchange(req(b"GET /headers HTTP/1.1\r\nHost: {A}\r\nConnection: host, close"))
    assert b'["host", "alice.edge.localhost"]' in named
