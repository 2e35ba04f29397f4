"""Header rules as pure functions: who may tell the app where a request came from, what
Connection may strip, and how the edge settings refuse bad values."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from proxy import forwarded
from proxy import headers as h
from proxy.limits import is_trusted, parse_networks
from tests.conftest import REPO

pytestmark = [pytest.mark.timeout(60)]

CLAIMS = [
    (b"host", b"alice.edge.localhost"),
    (b"forwarded", b"for=10.0.0.1;proto=https"),
    (b"x-forwarded-for", b"10.0.0.1"),
    (b"x-real-ip", b"10.0.0.1"),
    (b"x-forwarded-proto", b"https"),
    (b"x-forwarded-host", b"evil.example"),
]


def scope(client: str, headers: list[tuple[bytes, bytes]] = CLAIMS) -> dict[str, Any]:
    return {"headers": headers, "client": (client, 5000), "scheme": "http"}


def as_dict(out: list[tuple[bytes, bytes]]) -> dict[bytes, list[bytes]]:
    seen: dict[bytes, list[bytes]] = {}
    for name, value in out:
        seen.setdefault(name, []).append(value)
    return seen


def test_a_clients_own_claims_are_replaced() -> None:
    out = as_dict(h.forwarded(scope("203.0.113.9"), b"alice.edge.localhost", b"rid"))
    assert b"forwarded" not in out and b"x-real-ip" not in out
    assert out[b"x-forwarded-for"] == [b"203.0.113.9"]
    assert out[b"x-forwarded-proto"] == [b"http"]
    assert out[b"x-forwarded-host"] == [b"alice.edge.localhost"]
    assert out[b"host"] == [b"alice.edge.localhost"]


@override_settings(TENEMENT_TRUSTED_PROXIES=parse_networks("10.1.0.0/16, ::1", "T"))
def test_a_trusted_proxys_claims_are_kept_and_extended() -> None:
    out = as_dict(h.forwarded(scope("10.1.2.3"), b"alice.edge.localhost", b"rid"))
    assert out[b"forwarded"] == [b"for=10.0.0.1;proto=https"]
    assert out[b"x-forwarded-for"] == [b"10.0.0.1, 10.1.2.3"]
    # Outside the network: replaced as for anyone.
    out = as_dict(h.forwarded(scope("10.2.0.1"), b"alice.edge.localhost", b"rid"))
    assert b"forwarded" not in out and out[b"x-forwarded-for"] == [b"10.2.0.1"]


def test_connection_can_never_strip_host() -> None:
    headers = [(b"host", b"a.b.localhost"), (b"connection", b"Host, X-Drop"), (b"x-drop", b"1")]
    assert h.end_to_end(headers) == [(b"host", b"a.b.localhost")]


def test_trusted_proxies_parse_and_refuse_naming_the_variable() -> None:
    networks = parse_networks(" 127.0.0.1 ,10.0.0.0/8,", "TENEMENT_TRUSTED_PROXIES")
    assert is_trusted("10.9.9.9", networks) and is_trusted("127.0.0.1", networks)
    assert not is_trusted("11.0.0.1", networks) and not is_trusted(None, networks)
    with pytest.raises(ImproperlyConfigured, match="TENEMENT_TRUSTED_PROXIES: 'nope'"):
        parse_networks("10.0.0.0/8, nope", "TENEMENT_TRUSTED_PROXIES")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TENEMENT_MAX_HEADER_KB", "0"),
        ("TENEMENT_HEADER_TIMEOUT", "-1"),
        ("TENEMENT_BODY_TIMEOUT", "nan"),
        ("TENEMENT_MAX_CONNECTIONS", "lots"),
        ("TENEMENT_TRUSTED_PROXIES", "10.0.0.0/33"),
        ("TENEMENT_GRAFANA_URL", "javascript:alert(1)"),
        ("TENEMENT_CHARTS_STEP_SECONDS", "0"),
    ],
)
def test_a_bad_edge_setting_stops_start_up_naming_it(name: str, value: str, tmp_path: Path) -> None:
    env = {**os.environ, name: value, "TENEMENT_DATA_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, str(REPO / "manage.py"), "check"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=env,
    )
    assert result.returncode != 0
    assert f"{name}: {value!r}" in result.stderr
    assert "Traceback" not in result.stderr


# ---- who the client is behind a trusted proxy (proxy/forwarded.py) -----------------------

NGINX = parse_networks("127.0.0.1, 10.0.0.0/8", "T")


def request(peer: str, *headers: tuple[bytes, bytes], kind: str = "http") -> dict[str, Any]:
    return {"type": kind, "client": (peer, 4000), "scheme": "http", "headers": list(headers)}


def test_a_trusted_proxy_gives_the_rightmost_untrusted_address_and_its_scheme() -> None:
    scope = request(
        "127.0.0.1",
        (b"x-forwarded-for", b"6.6.6.6, 203.0.113.9"),
        (b"x-forwarded-for", b"10.1.1.1"),  # a second proxy of ours, in 10/8
        (b"x-forwarded-proto", b"http, HTTPS"),
    )
    out = forwarded.resolve(scope, NGINX)
    assert out["client"] == ("203.0.113.9", 0) and out[forwarded.PEER] == ("127.0.0.1", 4000)
    assert out["scheme"] == "https"
    assert (b"x-forwarded-proto", b"https") in out["headers"]
    assert [v for n, v in out["headers"] if n == b"x-forwarded-proto"] == [b"https"]
    ws = forwarded.resolve(
        request("127.0.0.1", (b"x-forwarded-proto", b"https"), kind="websocket"), NGINX
    )
    assert ws["scheme"] == "wss"


def test_a_garbled_chain_is_believed_only_up_to_the_garbage() -> None:
    scope = request("127.0.0.1", (b"x-forwarded-for", b"203.0.113.9, junk, 10.0.0.7"))
    assert forwarded.resolve(scope, NGINX)["client"] == ("10.0.0.7", 0)
    only_proxies = request("127.0.0.1", (b"x-forwarded-for", b"10.0.0.8"))
    assert forwarded.resolve(only_proxies, NGINX)["client"] == ("10.0.0.8", 0)
    nothing = forwarded.resolve(request("127.0.0.1"), NGINX)
    assert nothing["client"] == ("127.0.0.1", 4000) and nothing["scheme"] == "http"


def test_anyone_elses_claims_are_removed_before_anything_reads_them() -> None:
    scope = request(
        "203.0.113.9",
        (b"host", b"example.com"),
        (b"x-forwarded-for", b"1.2.3.4"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"evil.example"),
        (b"forwarded", b"for=1.2.3.4"),
        (b"x-real-ip", b"1.2.3.4"),
    )
    out = forwarded.resolve(scope, NGINX)
    assert out["headers"] == [(b"host", b"example.com")]
    assert out["client"] == ("203.0.113.9", 4000) and out["scheme"] == "http"
    assert forwarded.PEER not in out
    plain = request("203.0.113.9", (b"host", b"example.com"))
    assert forwarded.resolve(plain, NGINX) is plain  # nothing to remove: no copy made
