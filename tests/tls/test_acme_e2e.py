"""HTTPS with built-in ACME, end to end against a real ACME server (Debian's pebble)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import stat
import sys
import tempfile
import time
from pathlib import Path

import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect as ws_connect

from tests.conftest import TENANT_PYTHON
from tests.harness import free_port, http_request
from tests.tls.conftest import DOMAIN, TlsDeployment
from tests.tls.pebble import Pebble, https_request

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

    # The metrics: each certificate's expiry, and the orders by outcome.
    status, _, raw = deployment.private_get("/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(raw.decode())}
    expiry = {
        s.labels["name"]: s.value
        for s in families["tenement_tls_certificate_expiry_seconds"].samples
    }
    assert set(expiry) == {DOMAIN, ALICE}
    assert all(value > time.time() + 86400 for value in expiry.values())  # Unix time
    orders = {
        s.labels["outcome"]: s.value
        for s in families["tenement_acme_orders"].samples
        if s.name == "tenement_acme_orders_total"
    }
    assert orders == {"issued": 2.0}

    # The cache: 0700, files 0600, owned by the supervisor's user.
    cache = deployment.data / "acme"
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert any(p.name == "account.key" for p in files)
    assert len([p for p in files if p.suffix == ".crt"]) >= 3  # control, alice, fallback
    for path in files:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path


def test_reuse_after_restart_and_redirect(short_tmp: Path, pebble: Pebble) -> None:
    d = TlsDeployment(short_tmp, pebble, tls_extra="redirect_http = true")
    try:
        d.run()
        d.wait_states({"web:alice": "running"})
        d.wait_certificate(DOMAIN)
        first = d.https(ALICE, "/health")[2].serial
        assert pebble.orders_seen() == 2

        # Plain HTTP redirects to HTTPS, at the public https_port, path and query kept ...
        response, _ = http_request(d.http_port, ALICE, "/a/b?c=d")
        assert response.status == 308
        assert response.getheader("location") == f"https://{ALICE}:{d.https_port}/a/b?c=d"
        # ... except ACME's challenge path (pebble validated through it), never redirected.
        response, _ = http_request(d.http_port, ALICE, "/.well-known/acme-challenge/nope")
        assert response.status == 404
        # The control host's cookies are Secure: never sent back over plain HTTP.
        response, _, _ = d.https(DOMAIN, "/accounts/login/")
        cookies = response.headers.get_all("Set-Cookie")
        assert cookies and all("Secure" in c for c in cookies), cookies

        d.stop()
        account = (d.data / "acme" / "account.key").read_bytes()
        d.run()
        d.wait_states({"web:alice": "running"})
        # The same certificates from the cache, no new order, the same account key.
        assert d.wait_certificate(ALICE).serial == first
        d.wait_certificate(DOMAIN)
        assert pebble.orders_seen() == 2
        assert (d.data / "acme" / "account.key").read_bytes() == account
    finally:
        d.cleanup()


def test_renewal_in_the_background_while_requests_succeed(short_tmp: Path) -> None:
    folder = short_tmp / "pebble"
    folder.mkdir()
    # Certificates valid 24 s: renewed when 8 s are left.
    pebble = Pebble(folder, http_port=free_port(), validity=24)
    d = TlsDeployment(short_tmp, pebble)
    try:
        pebble.start()
        d.run()
        d.wait_states({"web:alice": "running"})
        d.wait_certificate(DOMAIN)
        context = d.context()
        first = https_request(d.https_port, ALICE, context, "/health")[2].serial
        serials = {first}
        deadline = time.monotonic() + 40
        requests = 0
        while len(serials) < 2 and time.monotonic() < deadline:
            response, body, shake = https_request(d.https_port, ALICE, context, "/health")
            assert response.status == 200, body  # every request succeeds throughout
            serials.add(shake.serial)
            requests += 1
            time.sleep(0.2)
        assert len(serials) == 2, f"no renewal within 40 s: {pebble.logs()}"
        status = d.api("/api/tls/status")
        alice = next(c for c in status["certificates"] if c["names"] == [ALICE])
        assert alice["last_error"] is None
        assert status["orders"]["issued"] >= 3  # control host, alice, alice renewed
    finally:
        d.cleanup()
        pebble.cleanup()


def test_ca_down_backs_off_without_blocking_valid_names(deployment: TlsDeployment) -> None:
    deployment.wait_certificate(DOMAIN)
    deployment.pebble.stop_pebble()

    # A registered name with no certificate: the order fails at once, the handshake gets
    # the self-signed fallback rather than hanging, and the failure is in the status.
    began = time.monotonic()
    with pytest.raises(ssl.SSLCertVerificationError):
        deployment.https(ALICE, "/health")
    assert time.monotonic() - began < 8
    status = deployment.api("/api/tls/status")
    failing = next(c for c in status["certificates"] if c["names"] == [ALICE])
    assert "cannot reach the CA" in failing["last_error"]
    assert failing["retry_in_seconds"] > 10
    assert status["orders"]["failed"] == 1

    # Backing off: the next handshake places no order.
    with pytest.raises(ssl.SSLCertVerificationError):
        deployment.https(ALICE, "/health")
    assert deployment.api("/api/tls/status")["orders"]["failed"] == 1

    status = deployment.ten("tls", "status")
    assert status.returncode == 1  # an order is failing
    assert "cannot reach the CA" in status.stdout

    # The control host keeps its valid certificate; the supervisor is alive.
    response, _, _ = deployment.https(DOMAIN, "/health")
    assert response.status == 200
    assert deployment.supervisors[-1].poll() is None


def test_custom_domain_routed_and_certified(deployment: TlsDeployment) -> None:
    deployment.wait_certificate(DOMAIN)
    custom = "notes.alice-corp.test"
    added = deployment.api("/api/domains/", "POST", {"name": custom, "instance": "web:alice"})
    assert added["instance"] == "web:alice"

    # Routed like alice's own host, over plain HTTP ...
    response, body = http_request(deployment.http_port, custom, "/whoami")
    assert response.status == 200, body
    assert json.loads(body)["instance"] == "alice"
    # ... and over HTTPS, with its own certificate on the first handshake.
    before = deployment.pebble.orders_seen()
    response, body, _ = deployment.https(custom, "/whoami")
    assert response.status == 200, body
    assert json.loads(body)["instance"] == "alice"
    assert deployment.pebble.orders_seen() == before + 1
    raw = socket.create_connection(("127.0.0.1", deployment.https_port), timeout=10)
    with ws_connect(
        f"wss://{custom}/ws", sock=raw, ssl=deployment.context(), open_timeout=15
    ) as ws:
        ws.send("custom")
        assert ws.recv(timeout=10) == "custom"

    # A sibling nobody added: no route, no order.
    with pytest.raises(ssl.SSLCertVerificationError):
        deployment.https("other.alice-corp.test", "/")
    response, _ = http_request(deployment.http_port, "other.alice-corp.test", "/")
    assert response.status == 404
    assert deployment.pebble.orders_seen() == before + 1
    names = [c["names"] for c in deployment.api("/api/tls/status")["certificates"]]
    assert [custom] in names

    # The CLI: list, status, remove (then the domain is no longer routed).
    listed = deployment.ten("domain", "list")
    assert listed.returncode == 0, listed.stderr
    assert custom in listed.stdout and "web:alice" in listed.stdout
    status = deployment.ten("tls", "status")
    assert status.returncode == 0, status.stderr
    assert custom in status.stdout and "Pebble" in status.stdout

    # With TXT verification: neither routed nor certified until the record is there.
    pending = "shop.alice-corp.test"
    added = deployment.ten("domain", "add", pending, "web:alice", "--verify", "txt")
    assert added.returncode == 0, added.stderr
    record_line = next(line for line in added.stdout.splitlines() if " TXT " in line)
    record_name, _, value = record_line.strip().partition(". TXT ")
    assert http_request(deployment.http_port, pending, "/whoami")[0].status == 404
    with pytest.raises(ssl.SSLCertVerificationError):
        deployment.https(pending, "/whoami")
    assert deployment.ten("domain", "verify", pending).returncode == 2  # not published yet
    deployment.pebble.set_txt(record_name, value.strip('"'))
    verified = deployment.ten("domain", "verify", pending)
    assert verified.returncode == 0, verified.stderr
    response, body, _ = deployment.https(pending, "/whoami")
    assert response.status == 200, body

    removed = deployment.ten("domain", "remove", custom)
    assert removed.returncode == 0, removed.stderr
    deployment.wait_for(
        "the route to go",
        lambda: http_request(deployment.http_port, custom, "/whoami")[0].status == 404,
        timeout=10,
    )


def test_wildcard_through_dns_01(short_tmp: Path, pebble: Pebble) -> None:
    hook = f"{sys.executable} {Path(__file__).parent / 'dns_hook.py'}"
    d = TlsDeployment(short_tmp, pebble, tls_extra=f'wildcard = true\ndns_hook = "{hook}"')
    d.env["CHALLTESTSRV_URL"] = f"http://127.0.0.1:{pebble.challtest_port}"
    try:
        d.run()
        d.wait_states({"web:alice": "running"})
        d.wait_certificate(DOMAIN)
        response, body, _ = d.https(ALICE, "/whoami")
        assert response.status == 200, body
        status = d.api("/api/tls/status")
        names = [c["names"] for c in status["certificates"]]
        assert [f"*.web.{DOMAIN}"] in names
        assert [ALICE] not in names  # one wildcard for the service, not one per tenant
        assert pebble.orders_seen() == 2
    finally:
        d.cleanup()


PROBE = Path(__file__).parent.parent / "apps" / "probe.py"


@pytest.mark.skipif(os.geteuid() != 0, reason="per-tenant uids need root (CI runs as root)")
def test_cache_dir_out_of_every_tenants_reach(short_tmp: Path, pebble: Pebble) -> None:
    # Outside the data dir, and outside /tmp (which sandboxes get a private copy of).
    cache = Path(tempfile.mkdtemp(prefix="tenement-acme-", dir="/var/tmp")) / "acme"
    cache.parent.chmod(0o755)  # only the cache itself is private
    services = f"""
[service.ns]
command = "{TENANT_PYTHON} {PROBE}"
health = "/health"

[service.proc]
command = "{TENANT_PYTHON} {PROBE}"
health = "/health"
isolation = "process"
"""
    d = TlsDeployment(
        short_tmp,
        pebble,
        tls_extra=f'cache_dir = "{cache}"',
        services=services,
        instances='ns = ["alice"]\nproc = ["bob"]',
    )
    try:
        d.run()
        d.wait_states({"ns:alice": "running", "proc:bob": "running"})
        d.wait_certificate(DOMAIN)
        assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
        query = f"/probe?secret={cache}/account.key&data_root={cache}"
        reports = {}
        for host in (f"alice.ns.{DOMAIN}", f"bob.proc.{DOMAIN}"):
            response, body = http_request(d.http_port, host, query)
            assert response.status == 200, body
            reports[host] = report = json.loads(body)
            assert report["uid"] >= 100_000
            assert not report["secret"].startswith("ok"), (host, report["secret"])
        # In a namespace the folder is an empty tmpfs; as a plain process, 0700 root's.
        assert reports[f"alice.ns.{DOMAIN}"]["data_root_list"] == "ok: []"
        assert reports[f"bob.proc.{DOMAIN}"]["data_root_list"].startswith("PermissionError")
    finally:
        d.cleanup()
        shutil.rmtree(cache.parent, ignore_errors=True)


def test_edge_limits_hold_on_https(short_tmp: Path, pebble: Pebble) -> None:
    d = TlsDeployment(short_tmp, pebble)
    d.env.update(
        TENEMENT_MAX_CONNECTIONS_PER_ADDRESS="4",
        TENEMENT_HEADER_TIMEOUT="1",
        TENEMENT_MAX_HEADER_KB="4",
    )
    try:
        d.run()
        d.wait_states({"web:alice": "running"})
        d.wait_certificate(DOMAIN)
        address = ("127.0.0.1", d.https_port)

        # Connections that never send a ClientHello count against the per-address cap ...
        idle = [socket.create_connection(address, timeout=5) for _ in range(4)]
        time.sleep(0.2)
        with socket.create_connection(address, timeout=5) as refused:
            began = time.monotonic()
            assert refused.recv(1) == b""  # closed at once, before any handshake work
            assert time.monotonic() - began < 0.5  # not by the 1 s hello timeout
        # ... and are closed after TENEMENT_HEADER_TIMEOUT.
        began = time.monotonic()
        for sock in idle:
            assert sock.recv(1) == b""
            sock.close()
        assert time.monotonic() - began < 3

        # Over TLS, the head limits answer as on HTTP.
        with d.context().wrap_socket(
            socket.create_connection(address, timeout=10), server_hostname=ALICE
        ) as tls:
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {ALICE}\r\nX-Big: {'a' * 8000}\r\n\r\n".encode())
            assert tls.recv(100).startswith(b"HTTP/1.1 431")
        # A handshake done but no request: closed after the head timeout too.
        with d.context().wrap_socket(
            socket.create_connection(address, timeout=10), server_hostname=ALICE
        ) as tls:
            began = time.monotonic()
            assert tls.recv(1) == b""
            assert time.monotonic() - began < 3
        # Plain HTTP on the HTTPS port: closed, never parsed as a request.
        with socket.create_connection(address, timeout=5) as plain:
            plain.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            began = time.monotonic()
            try:
                answer = plain.recv(100)
            except ConnectionResetError:  # closed with our request unread: a reset
                answer = b""
            assert answer == b""
            assert time.monotonic() - began < 0.5
        # No server name at all: the control host's certificate.
        context = d.context()
        context.check_hostname = False
        with context.wrap_socket(socket.create_connection(address, timeout=10)) as tls:
            der = tls.getpeercert(binary_form=True)
        san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        )
        assert san.value.get_values_for_type(x509.DNSName) == [DOMAIN]
        response, _, _ = d.https(ALICE, "/health")
        assert response.status == 200
    finally:
        d.cleanup()
