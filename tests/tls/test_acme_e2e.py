"""HTTPS with built-in ACME, end to end against a real ACME server (Debian's pebble)."""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat

import pytest
from websockets.sync.client import connect as ws_connect

from tests.tls.conftest import DOMAIN, TlsDeployment

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

ALICE = f"alice.web.{DOMAIN}"


def test_control_host_then_tenant_on_first_handshake(deployment: TlsDeployment) -> None:
    # The control host's certificate comes by HTTP-01 through our HTTP listener.
    shake = deployment.wait_certificate(DOMAIN)
    assert shake.alpn == "http/1.1"
    response, body, _ = deployment.https(DOMAIN, "/health")
    assert response.status == 200, body
    orders = deployment.pebble.orders_seen()
    assert orders == 1

    # A registered tenant: the first handshake waits for its certificate.
    # (https() verifies the chain against pebble's root and the name.)
    response, body, _ = deployment.https(ALICE, "/headers")
    assert response.status == 200, body
    headers = {k.lower(): v for k, v in json.loads(body)}
    assert headers["x-forwarded-proto"] == "https"
    assert deployment.pebble.orders_seen() == 2

    # A WebSocket over TLS to the tenant.
    raw = socket.create_connection(("127.0.0.1", deployment.https_port), timeout=10)
    with ws_connect(
        f"wss://{ALICE}/ws",
        sock=raw,
        ssl=deployment.context(),
        server_hostname=ALICE,
        open_timeout=15,
    ) as ws:
        ws.send("hello over tls")
        assert ws.recv(timeout=10) == "hello over tls"

    # A name nobody registered gets no order: the self-signed fallback, not verified.
    with pytest.raises(ssl.SSLCertVerificationError):
        deployment.https(f"mallory.web.{DOMAIN}", "/")
    assert deployment.pebble.orders_seen() == 2

    # The cache: 0700, files 0600, owned by the supervisor's user.
    cache = deployment.data / "acme"
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert any(p.name == "account.key" for p in files)
    assert len([p for p in files if p.suffix == ".crt"]) >= 3  # control, alice, fallback
    for path in files:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
