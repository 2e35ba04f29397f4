"""schemathesis fuzzes the live API from its own OpenAPI schema: no 5xx, no answer that
contradicts the schema (status codes, content types, bodies)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_proxy_e2e import Proxy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "response_headers_conformance",
    ]
)


def test_schemathesis_finds_no_server_errors_or_schema_violations(short_tmp: Path) -> None:
    proxy = Proxy(short_tmp, env={"TENEMENT_AUTH_FAILURE_LIMIT": "1000000"})
    try:
        proxy.wait_states({"web:alice": "running"})
        made = proxy.manage("createtoken", "--name", "fuzz", "--scope", "admin")
        assert made.returncode == 0, made.stderr
        token = made.stdout.strip().splitlines()[-1]
        result = subprocess.run(
            [
                str(Path(sys.executable).parent / "schemathesis"),
                "run",
                f"http://127.0.0.1:{proxy.port}/api/schema/",
                "--header",
                f"Authorization: Bearer {token}",
                "--checks",
                CHECKS,
                "--max-examples",
                "15",
                "--generation-deterministic",
                "--request-timeout",
                "20",
                "--exclude-path-regex",
                "/api/logs/stream",  # endless by design
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=240,
            cwd=short_tmp,
        )
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    finally:
        proxy.cleanup()
