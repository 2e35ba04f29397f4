"""Fixtures for the TLS tests: a real pebble, and a deployment serving HTTPS through it."""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, TENANT_UVICORN
from tests.harness import Deployment, free_port, http_request
from tests.tls.pebble import Handshake, Pebble, https_request, tls_client_context

DOMAIN = "tenement.test"
APP = f"{TENANT_UVICORN} --app-dir {REPO} tests.apps.proxyapp:app --uds {{socket}}"


WEB = f"""
[service.web]
command = "{APP} --log-level warning"
health = "/health"
isolation = "process"
"""


def config(
    pebble: Pebble,
    https_port: int,
    tls_extra: str = "",
    services: str = WEB,
    instances: str = 'web = ["alice"]',
) -> str:
    return f"""
[settings]
health_check_interval = 1

[settings.tls]
enabled = true
acme_email = "ops@{DOMAIN}"
directory_url = "{pebble.directory}"
https_port = {https_port}
http_port = {pebble.http_port}
{tls_extra}
{services}
[instances]
{instances}
"""


class TlsDeployment(Deployment):
    """runsupervisor with [settings.tls] against `pebble`: HTTP on pebble's validation
    port, HTTPS on a free one."""

    def __init__(self, root: Path, pebble: Pebble, tls_extra: str = "", **more: str) -> None:
        self.https_port = free_port()
        super().__init__(root, config(pebble, self.https_port, tls_extra, **more))
        self.pebble = pebble
        self.http_port = pebble.http_port
        self.env["TENEMENT_DOMAIN"] = DOMAIN
        # Pebble's API certificate is signed by the test's own CA.
        self.env["REQUESTS_CA_BUNDLE"] = str(pebble.ca)
        # Custom domains' TXT verification asks challtestsrv's DNS, as pebble does.
        self.env["TENEMENT_DNS_RESOLVER"] = f"127.0.0.1:{pebble.dns_port}"
        self.token = ""

    def run(self) -> None:
        self.start(
            "--config",
            str(self.config),
            "--bind",
            f"127.0.0.1:{self.http_port}",
            "--https-bind",
            f"127.0.0.1:{self.https_port}",
            http=True,
        )

    def stop(self) -> None:
        proc = self.supervisors[-1]
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)

    def context(self) -> ssl.SSLContext:
        return tls_client_context(self.pebble.root_pem())

    def https(self, host: str, path: str = "/", **kwargs: Any) -> Any:
        return https_request(self.https_port, host, self.context(), path, **kwargs)

    def wait_certificate(self, host: str, timeout: float = 60) -> Handshake:
        """Until a handshake for `host` verifies against pebble's root."""
        found: list[Any] = []

        def verified() -> bool:
            try:
                found[:] = [self.https(host, "/health", timeout=15)]
            except (ssl.SSLError, OSError):
                return False
            return True

        self.wait_for(f"a verified certificate for {host}", verified, timeout)
        return found[0][2]

    def ten(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The `ten` CLI against this deployment's control host, with the write token."""
        self.api("/api/tls/status")  # makes the token
        env = {
            **self.env,
            "TENEMENT_SERVER": f"http://127.0.0.1:{self.http_port}",
            "TENEMENT_TOKEN": self.token,
        }
        return subprocess.run(
            [sys.executable, "-m", "instances.cli", *args],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
            cwd=REPO,
        )

    def api(self, path: str, method: str = "GET", body: Any = None) -> Any:
        """A call with a write token over plain HTTP to the control host."""
        if not self.token:
            name = f"t{time.monotonic_ns()}"
            result = self.manage("createtoken", "--name", name, "--scope", "write")
            assert result.returncode == 0, result.stderr
            self.token = result.stdout.strip().splitlines()[-1]
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        data = json.dumps(body) if body is not None else None
        response, answer = http_request(
            self.http_port, DOMAIN, path, method=method, body=data, headers=headers
        )
        assert response.status in (200, 201), (response.status, answer)
        return json.loads(answer)


@pytest.fixture
def pebble(short_tmp: Path) -> Iterator[Pebble]:
    folder = short_tmp / "pebble"
    folder.mkdir()
    p = Pebble(folder, http_port=free_port())
    try:
        p.start()
        yield p
    finally:
        p.cleanup()


@pytest.fixture
def deployment(short_tmp: Path, pebble: Pebble) -> Iterator[TlsDeployment]:
    d = TlsDeployment(short_tmp, pebble)
    try:
        d.run()
        d.wait_states({"web:alice": "running"})
        yield d
    finally:
        d.cleanup()
