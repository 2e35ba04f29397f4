"""Debian's real nginx and Caddy (2.6.2) in front of a real runsupervisor, each with the
configuration `ten nginx` / `ten caddy` prints. nginx ends TLS with a self-signed
certificate made here; Caddy issues its own on demand, asking tenement first.

Clients connect from other loopback addresses (127.0.0.5, 127.0.0.6...) so "the real
client address" differs from nginx's own (127.0.0.1, the trusted proxy).
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.conftest import REPO, TENANT_UVICORN
from tests.harness import Deployment, free_port, listening

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
DOMAIN = "example.test"
SERVICE = "nginxed"
DIRECT = "nginxdir"
TCP = "nginxtcp"
APP = f"{TENANT_UVICORN} --app-dir {REPO} tests.apps.proxyapp:app --uds {{socket}}"
CONFIG = f"""
[service.{SERVICE}]
command = "{APP} --log-level warning"
health = "/health"
wake_timeout = 20

# Served by `ten nginx --direct`: run as nginx's worker user, so nginx opens its sockets.
[service.{DIRECT}]
command = "{APP} --log-level warning"
health = "/health"
user = "nobody"
idle_timeout = 3

# An app on a TCP port (upstream's contract), also served by `ten nginx --direct`.
[service.{TCP}]
command = "{TENANT_UVICORN} --app-dir {REPO} tests.apps.proxyapp:app --port {{port}}"
health = "/health"
listen = "tcp"

[instances]
{SERVICE} = ["alice", "bob"]
{DIRECT} = ["carol"]
{TCP} = ["dora"]
"""
PASSWORD = "correct horse battery staple"

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not Path(NGINX).exists(), reason="nginx missing: scripts/system-deps.sh"),
]


class Https:
    """An HTTPS client that dials nginx on loopback from a chosen source address, sends
    SNI and Host for `host`, and verifies the test's own certificate."""

    def __init__(self, port: int, cafile: Path, source: str = "127.0.0.5") -> None:
        self.port = port
        self.context = ssl.create_default_context(cafile=str(cafile))
        self.source = source
        self.cookies: dict[str, str] = {}

    def request(
        self,
        host: str,
        path: str,
        method: str = "GET",
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[http.client.HTTPResponse, bytes]:
        raw = socket.create_connection(("127.0.0.1", self.port), 30, (self.source, 0))
        conn = http.client.HTTPSConnection(host, self.port, timeout=60, context=self.context)
        conn.sock = self.context.wrap_socket(raw, server_hostname=host)
        sent = {"Host": f"{host}:{self.port}", **(headers or {})}
        if self.cookies:
            sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        try:
            conn.request(method, path, body=body, headers=sent)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        for header in response.headers.get_all("Set-Cookie") or []:
            name, _, rest = header.partition("=")
            self.cookies[name] = rest.split(";", 1)[0]
        return response, data


class Front:
    """runsupervisor behind nginx; cleans up both."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.deployment = Deployment(root, CONFIG)
        self.deployment.env.update(
            TENEMENT_TRUSTED_PROXIES="127.0.0.1",
            DJANGO_SUPERUSER_PASSWORD=PASSWORD,
            # The opt-in access log, as JSON: its client field is the real client's.
            TENEMENT_ACCESS_LOG="1",
            TENEMENT_LOG_FORMAT="json",
        )
        self.port = free_port()
        self.https_port = free_port()
        self.cert, self.key = self.certificate()
        self.nginxes: list[subprocess.Popen[bytes]] = []

    def certificate(self) -> tuple[Path, Path]:
        cert, key = self.root / "cert.pem", self.root / "key.pem"
        names = ",".join(
            [f"DNS:{DOMAIN}", *(f"DNS:*.{name}.{DOMAIN}" for name in (SERVICE, DIRECT, TCP))]
        )
        subprocess.run(
            [
                *(
                    "openssl",
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                ),
                *("-nodes", "-days", "1", "-subj", f"/CN={DOMAIN}", "-addext"),
                *(f"subjectAltName={names}", "-keyout", str(key), "-out", str(cert)),
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        return cert, key

    def start(self) -> None:
        d = self.deployment
        bind = f"127.0.0.1:{self.port}"
        d.start("--config", str(d.config), "--domain", DOMAIN, "--bind", bind, http=True)
        d.wait_for("tenement listening", lambda: listening(self.port), 60)
        d.wait_states({f"{SERVICE}:alice": "running", f"{SERVICE}:bob": "running"}, 60)
        d.wait_states({f"{DIRECT}:carol": "running", f"{TCP}:dora": "running"}, 60)
        created = subprocess.run(
            [
                sys.executable,
                "manage.py",
                "createsuperuser",
                "--noinput",
                "--username",
                "op",
                "--email",
                "op@example.test",
            ],
            env={**d.env, "TENEMENT_DATA_DIR": str(d.data)},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert created.returncode == 0, created.stderr
        self.start_nginx()

    def start_nginx(self) -> None:
        self.run_nginx("nginx", self.https_port)

    def run_nginx(self, name: str, port: int, *extra: str) -> None:
        """nginx with the server block `ten nginx` prints, in its own folder."""
        ten = [sys.executable, "-m", "instances.cli", "nginx", "--domain", DOMAIN]
        server_block = subprocess.run(
            [
                *(*ten, "--upstream", f"127.0.0.1:{self.port}", *extra),
                *("--listen", f"127.0.0.1:{port}", "--http-listen", ""),
                *("--cert", str(self.cert), "--key", str(self.key)),
            ],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
            timeout=30,
        ).stdout
        folder = self.root / name
        folder.mkdir()
        (folder / "tenement.conf").write_text(server_block)
        temp = folder / "temp"
        temp.mkdir(mode=0o777)
        temp.chmod(0o777)
        # Workers run as nobody (nginx's built-in default when the master is root).
        (folder / "nginx.conf").write_text(
            f"worker_processes 1;\npid {folder}/nginx.pid;\n"
            f"error_log {self.root}/{name}-error.log info;\n"
            "events { worker_connections 256; }\n"
            f"http {{\n  access_log off;\n  client_body_temp_path {temp}/body;\n"
            f"  proxy_temp_path {temp}/proxy;\n  include {folder}/tenement.conf;\n}}\n"
        )
        conf = str(folder / "nginx.conf")
        subprocess.run([NGINX, "-t", "-c", conf], check=True, capture_output=True, timeout=30)
        proc = subprocess.Popen(
            [NGINX, "-c", conf, "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.nginxes.append(proc)
        self.deployment.wait_for(name, lambda: listening(port), 30)

    def supervisor_log(self) -> str:
        return (self.root / "supervisor-0.log").read_text()

    def logs(self) -> str:
        """nginx's error log and the supervisor's, for assertion messages."""
        files = [*self.root.glob("*-error.log"), *self.root.glob("supervisor-*.log")]
        return "\n".join(p.read_text()[-3000:] for p in files if p.exists())

    def cleanup(self) -> None:
        for nginx in self.nginxes:
            nginx.terminate()
            try:
                nginx.wait(10)
            except subprocess.TimeoutExpired:
                nginx.kill()
                nginx.wait()
        self.deployment.cleanup()


@pytest.fixture(scope="module")
def front() -> Iterator[Front]:
    root = Path(tempfile.mkdtemp(prefix="tn", dir="/tmp"))
    root.chmod(0o711)
    f = Front(root)
    try:
        f.start()
        yield f
    finally:
        f.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def client(front: Front, source: str = "127.0.0.5") -> Https:
    return Https(front.https_port, front.cert, source)


def tenant(name: str) -> str:
    return f"{name}.{SERVICE}.{DOMAIN}"


def headers_seen(response_body: bytes) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = {}
    for name, value in json.loads(response_body):
        seen.setdefault(name.lower(), []).append(value)
    return seen


def test_a_tenant_sees_https_and_the_real_client_address(front: Front) -> None:
    response, body = client(front).request(
        tenant("alice"), "/headers", headers={"X-Forwarded-For": "6.6.6.6"}
    )
    assert response.status == 200, front.logs()
    seen = headers_seen(body)
    assert seen["x-forwarded-proto"] == ["https"]
    # The client's own claim came first, nginx added the address it saw (127.0.0.5), and
    # tenement added nginx's: the app can take the rightmost untrusted entry.
    assert seen["x-forwarded-for"] == ["6.6.6.6, 127.0.0.5, 127.0.0.1"]
    assert seen["host"] == [f"{tenant('alice')}:{front.https_port}"]


def test_a_sleeping_tenant_is_woken_through_nginx(front: Front) -> None:
    d = front.deployment
    stopped = d.manage("stop", f"{SERVICE}:bob")
    assert stopped.returncode == 0, stopped.stderr
    response, body = client(front).request(tenant("bob"), "/whoami")
    assert response.status == 200, body
    assert json.loads(body)["instance"] == "bob"
    assert int(response.headers["X-Tenement-Wake"]) > 0
    d.wait_states({f"{SERVICE}:bob": "running"})
    # The access log's line for it: the real client, the wake, the request id.
    rid = response.headers["X-Request-ID"]

    def access_lines() -> list[dict[str, Any]]:
        lines = [json.loads(x) for x in front.supervisor_log().splitlines() if rid in x]
        return [x for x in lines if x.get("event") == "access"]

    # Log lines are written by a listener thread: a moment after the response.
    d.wait_for("the access log line", lambda: bool(access_lines()), 10)
    [line] = access_lines()
    assert line["instance"] == f"{SERVICE}:bob" and line["status"] == 200
    assert line["client"] == "127.0.0.5" and line["wake_ms"] > 0
    assert line["bytes"] == len(body) and line["duration_ms"] >= line["wake_ms"]
    assert line["method"] == "GET" and line["path"] == "/whoami"


def test_the_wake_hook_answers_when_ready_and_caddys_ask_knows_tenants(front: Front) -> None:
    d = front.deployment
    assert d.manage("stop", f"{SERVICE}:bob").returncode == 0
    https = client(front)
    query = urlencode({"host": tenant("bob")})
    response, _ = https.request(DOMAIN, f"/_tenement/wake?{query}")
    assert response.status == 204 and int(response.headers["X-Tenement-Wake"]) > 0
    d.wait_states({f"{SERVICE}:bob": "running"})  # the database mirror follows shortly
    # Already running: 204 at once, no wake.
    response, _ = https.request(DOMAIN, f"/_tenement/wake?{query}")
    assert response.status == 204 and "X-Tenement-Wake" not in response.headers
    response, body = https.request(DOMAIN, "/_tenement/wake?host=" + tenant("zed"))
    assert response.status == 404 and b"no such tenant" in body
    response, body = https.request(DOMAIN, "/_tenement/wake?host=a..b")
    assert response.status == 400
    for host, status in ((tenant("alice"), 200), (DOMAIN, 200), (tenant("zed"), 404)):
        response, _ = https.request(DOMAIN, "/_tenement/ask?domain=" + host)
        assert response.status == status, host


def log_in(front: Front, https: Https, username: str, password: str) -> int:
    """The dashboard's login form over https, as a browser posts it (CSRF token, Origin)."""
    response, page = https.request(DOMAIN, "/accounts/login/")
    assert response.status == 200
    token = re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', page)
    assert token, page[:500]
    origin = f"https://{DOMAIN}:{front.https_port}"
    form = urlencode(
        {"username": username, "password": password, "csrfmiddlewaretoken": token[1].decode()}
    ).encode()
    response, _ = https.request(
        DOMAIN,
        "/accounts/login/",
        "POST",
        form,
        {
            "Content-Type": "application/x-www-form-urlencoded",
            "Origin": origin,
            "Referer": origin + "/accounts/login/",
        },
    )
    return response.status


def test_login_throttling_counts_the_real_client(front: Front) -> None:
    """django-axes locks the guessing address only, not every client behind nginx."""
    guesser = client(front, "127.0.0.11")
    # TENEMENT_LOGIN_FAILURE_LIMIT (5) failures, each for another account: the fifth locks.
    codes = [log_in(front, guesser, f"guess{i}", "wrong") for i in range(5)]
    assert codes == [200, 200, 200, 200, 429]
    assert log_in(front, guesser, "op", PASSWORD) == 429
    assert log_in(front, client(front, "127.0.0.12"), "op", PASSWORD) == 302


def test_dashboard_login_over_https_passes_csrf(front: Front) -> None:
    https = client(front)
    origin = f"https://{DOMAIN}:{front.https_port}"
    assert log_in(front, https, "op", PASSWORD) == 302
    assert "sessionid" in https.cookies
    response, page = https.request(DOMAIN, "/")
    assert response.status == 200 and b"alice" in page
    # The overview's live WebSocket over wss, through nginx: same origin as https.
    update = live_update(front, https.cookies, origin)
    assert "counts" in update and "html" in update
    # A tenant's page cannot open it with the operator's cookie.
    with pytest.raises(InvalidStatus):
        live_update(front, https.cookies, f"https://{tenant('alice')}:{front.https_port}")


def live_update(front: Front, cookies: dict[str, str], origin: str) -> dict[str, Any]:
    context = ssl.create_default_context(cafile=str(front.cert))
    raw = socket.create_connection(("127.0.0.1", front.https_port), 30, ("127.0.0.5", 0))
    with connect(
        f"wss://{DOMAIN}:{front.https_port}/ws/overview/",
        sock=raw,
        ssl=context,
        server_hostname=DOMAIN,
        origin=origin,  # type: ignore[arg-type]
        additional_headers={"Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items())},
        open_timeout=30,
    ) as ws:
        return json.loads(ws.recv(timeout=30))


def test_a_forged_forwarded_header_from_a_direct_client_is_replaced(front: Front) -> None:
    """Straight to tenement from an untrusted address, X-Forwarded-* are lies."""
    conn = http.client.HTTPConnection(
        "127.0.0.1", front.port, timeout=30, source_address=("127.0.0.9", 0)
    )
    conn.request(
        "GET",
        "/headers",
        headers={
            "Host": tenant("alice"),
            "X-Forwarded-Proto": "https",
            "X-Forwarded-For": "1.2.3.4",
        },
    )
    response = conn.getresponse()
    seen = headers_seen(response.read())
    conn.close()
    assert seen["x-forwarded-proto"] == ["http"]
    assert seen["x-forwarded-for"] == ["127.0.0.9"]


def test_api_tokens_and_the_failure_limit_count_the_real_client(front: Front) -> None:
    d = front.deployment
    made = d.manage("createtoken", "--name", "nginx-test", "--scope", "read")
    assert made.returncode == 0, made.stderr
    good = made.stdout.strip().splitlines()[-1]
    guesser, other = client(front, "127.0.0.7"), client(front, "127.0.0.8")
    bad = {"Authorization": "Bearer ten_000000000000_guess"}
    codes = [guesser.request(DOMAIN, "/api/instances/", headers=bad)[0].status for _ in range(11)]
    assert codes[:10] == [401] * 10 and codes[10] == 429
    response, body = guesser.request(DOMAIN, "/api/instances/", headers=bad)
    message = json.loads(body)["error"]["message"]
    assert re.fullmatch(r"too many failed attempts from 127\.0\.0\.7; retry in \d+ s", message)
    assert 0 < int(response.headers["Retry-After"]) <= 60
    # Another client behind the same nginx is not locked out.
    response, body = other.request(
        DOMAIN, "/api/instances/", headers={"Authorization": f"Bearer {good}"}
    )
    assert response.status == 200, body
    names = {row["instance_id"] for row in _rows(json.loads(body))}
    assert {"alice", "bob"} <= names


def _rows(payload: Any) -> list[dict[str, Any]]:
    return payload["results"] if isinstance(payload, dict) else payload


def test_the_control_host_answers_on_localhost_whatever_the_domain(front: Front) -> None:
    for host in ("localhost", f"localhost:{front.port}", "127.0.0.1", "[::1]"):
        conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=30)
        conn.request("GET", "/health", headers={"Host": host})
        response = conn.getresponse()
        body = response.read()
        conn.close()
        assert response.status == 200, (host, body, front.logs())
        assert json.loads(body)["status"] == "ok"


# ---- nginx --direct: tenants straight from their sockets, woken through tenement -------


@pytest.fixture(scope="module")
def direct(front: Front) -> int:
    port = free_port()
    front.run_nginx("nginx-direct", port, "--direct")
    return port


def test_direct_nginx_serves_from_the_socket_and_wakes_through_tenement(
    front: Front, direct: int
) -> None:
    https = Https(direct, front.cert, "127.0.0.5")
    d = front.deployment
    assert d.manage("stop", f"{DIRECT}:carol").returncode == 0
    response, body = https.request(f"carol.{DIRECT}.{DOMAIN}", "/headers")
    assert response.status == 200, (body, front.logs())
    seen = headers_seen(body)
    # Straight from nginx: tenement's proxy (which adds X-Request-ID) was not in the path.
    assert "x-request-id" not in seen and "x-request-id" not in response.headers
    assert seen["x-forwarded-proto"] == ["https"] and seen["x-forwarded-for"] == ["127.0.0.5"]
    d.wait_states({f"{DIRECT}:carol": "running"})
    # Every request through nginx is activity: busy past idle_timeout (3 s), still awake.
    began = time.monotonic()
    while time.monotonic() - began < 5:
        assert https.request(f"carol.{DIRECT}.{DOMAIN}", "/whoami")[0].status == 200
        time.sleep(0.5)
    assert d.rows()[f"{DIRECT}:carol"]["state"] == "running"
    # No such tenant: tenement's own clear answer, through nginx.
    response, body = https.request(f"zed.{DIRECT}.{DOMAIN}", "/")
    assert response.status == 404 and b"no such tenant" in body


def test_direct_nginx_serves_an_app_on_a_tcp_port(front: Front, direct: int) -> None:
    https = Https(direct, front.cert, "127.0.0.5")
    response, body = https.request(f"dora.{TCP}.{DOMAIN}", "/headers")
    assert response.status == 200, (body, front.logs())
    seen = headers_seen(body)
    assert "x-request-id" not in seen and seen["x-forwarded-proto"] == ["https"]


def test_the_upstream_is_told_to_trusted_proxies_only(front: Front) -> None:
    query = "/_tenement/wake?host=" + f"carol.{DIRECT}.{DOMAIN}"
    for source, told in (("127.0.0.1", True), ("127.0.0.9", False)):
        conn = http.client.HTTPConnection(
            "127.0.0.1", front.port, timeout=60, source_address=(source, 0)
        )
        conn.request("GET", query, headers={"Host": "localhost"})
        response = conn.getresponse()
        response.read()
        conn.close()
        assert response.status == 204
        upstream = response.headers.get("X-Tenement-Upstream")
        assert (upstream is not None) is told, source
        if told:
            assert upstream.startswith("unix:/") and upstream.endswith("/app.sock:"), upstream


# ---- Caddy (Debian bookworm's 2.6.2), from the Caddyfile `ten caddy` prints ---------------

CADDY = shutil.which("caddy")


@pytest.fixture(scope="module")
def caddy(front: Front) -> Iterator[tuple[int, Path]]:
    """Caddy with its own local CA, on-demand certificates asked of tenement."""
    if CADDY is None:
        pytest.skip("caddy missing: scripts/system-deps.sh test")
    port, http_port = free_port(), free_port()
    ten = [sys.executable, "-m", "instances.cli", "caddy", "--domain", DOMAIN, "--internal-tls"]
    printed = subprocess.run(
        [*ten, "--listen", str(port), "--upstream", f"127.0.0.1:{front.port}"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        timeout=30,
    ).stdout
    # For the test only: no admin API, nothing installed into the system's trust store,
    # and the plain-HTTP redirect listener on a free port.
    test_options = f"    admin off\n    skip_install_trust\n    http_port {http_port}\n"
    caddyfile = front.root / "Caddyfile"
    caddyfile.write_text(printed.replace("{\n", "{\n" + test_options, 1))
    home = front.root / "caddy-home"
    env = {"HOME": str(home), "XDG_DATA_HOME": str(home / "data"), "PATH": "/usr/bin:/bin"}
    log = open(front.root / "caddy.log", "wb")
    proc = subprocess.Popen(
        [CADDY, "run", "--adapter", "caddyfile", "--config", str(caddyfile)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**env, "XDG_CONFIG_HOME": str(home / "config")},
    )
    log.close()
    try:
        front.deployment.wait_for("caddy", lambda: listening(port), 60)
        root_ca = home / "data" / "caddy" / "pki" / "authorities" / "local" / "root.crt"
        front.deployment.wait_for("caddy's local CA", root_ca.exists, 30)
        yield port, root_ca
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_caddy_in_front_serves_tenants_with_on_demand_certificates(
    front: Front, caddy: tuple[int, Path]
) -> None:
    port, root_ca = caddy
    https = Https(port, root_ca, "127.0.0.5")
    response, body = https.request(tenant("alice"), "/headers")
    assert response.status == 200, (body, (front.root / "caddy.log").read_text()[-3000:])
    seen = headers_seen(body)
    assert seen["x-forwarded-proto"] == ["https"]
    assert seen["x-forwarded-for"] == ["127.0.0.5, 127.0.0.1"]
    # No certificate for a name tenement does not serve: the ask said 404.
    with pytest.raises(ssl.SSLError):
        https.request(tenant("zed"), "/headers")
    # A sleeping tenant is woken through Caddy too.
    assert front.deployment.manage("stop", f"{SERVICE}:bob").returncode == 0
    response, body = https.request(tenant("bob"), "/whoami")
    assert response.status == 200 and json.loads(body)["instance"] == "bob"
    assert int(response.headers["X-Tenement-Wake"]) > 0
