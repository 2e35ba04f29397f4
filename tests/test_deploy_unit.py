"""The shipped systemd unit: it parses, and its hardening score stays at 5.0 or lower."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.harness import Deployment, free_port, http_request

UNIT = REPO / "deploy" / "tenement.service"

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze missing"),
]


def exposure(unit: Path) -> float:
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout + out.stderr)
    assert match, out.stdout + out.stderr
    return float(match[1])


def test_unit_hardening_score_is_at_most_5() -> None:
    assert exposure(UNIT) <= 5.0


def test_the_score_check_can_fail() -> None:
    """The same unit without its hardening scores worse: the parser reads real figures."""
    bare = "\n".join(
        line
        for line in UNIT.read_text().splitlines()
        if not line.startswith(("CapabilityBoundingSet", "SystemCallFilter", "Protect"))
    )
    path = Path(subprocess.check_output(["mktemp", "-d"], text=True).strip()) / "t.service"
    path.write_text(bare)
    try:
        assert exposure(path) > 5.0
    finally:
        shutil.rmtree(path.parent)


def test_unit_verifies_with_this_checkout(tmp_path: Path) -> None:
    """systemd-analyze verify, with the install paths pointed at this checkout."""
    text = UNIT.read_text().replace("/opt/tenement/.venv/bin/python", sys.executable)
    text = text.replace("/opt/tenement", str(REPO))
    unit = tmp_path / "tenement.service"
    unit.write_text(text)
    out = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=30
    )
    problems = [line for line in out.stderr.splitlines() if "tenement.service" in line]
    assert out.returncode == 0 and not problems, out.stderr


def ten(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "instances.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def test_ten_install_writes_a_unit_that_verifies_and_uninstall_removes_it(tmp_path: Path) -> None:
    units, etc = tmp_path / "units", tmp_path / "etc"
    args = ["--unit-dir", str(units), "--config-dir", str(etc), "--no-reload"]
    done = ten("install", *args, "--domain", "example.org", "--bind", "0.0.0.0:80")
    assert done.returncode == 0, done.stderr
    unit = (units / "tenement.service").read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=30",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/tenement",
        "Environment=TENEMENT_DATA_DIR=/var/lib/tenement",
        "Environment=TENEMENT_DOMAIN=example.org",
        f"EnvironmentFile=-{etc}/env",
    ):
        assert line in unit.splitlines(), line
    assert "CAP_NET_BIND_SERVICE" in unit and "--bind 0.0.0.0:80" in unit
    assert f"ExecStart={sys.executable} manage.py runsupervisor" in unit
    assert f"--config {etc}/tenement.toml" in unit and "/opt/tenement" not in unit
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(units / "tenement.service")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert verify.returncode == 0, verify.stderr
    assert exposure(units / "tenement.service") <= 5.0
    assert (etc / "env").stat().st_mode & 0o777 == 0o600
    assert "/opt/tenement" not in (etc / "tenement.toml").read_text()
    # Again: the operator's edited files are kept, the same unit is left as it is.
    (etc / "tenement.toml").write_text("# mine\n")
    again = ten("install", *args, "--domain", "example.org", "--bind", "0.0.0.0:80")
    assert again.returncode == 0 and "unchanged" in again.stdout
    assert (etc / "tenement.toml").read_text() == "# mine\n"
    gone = ten("uninstall", *args)
    assert gone.returncode == 0, gone.stderr
    assert not (units / "tenement.service").exists() and (etc / "env").exists()
    missing = ten("uninstall", *args)
    assert missing.returncode == 6 and "not installed" in missing.stderr


def test_the_installed_example_config_runs_from_its_folder(short_tmp: Path) -> None:
    """The config `ten install` puts in /etc/tenement works there: absolute paths only."""
    etc = short_tmp / "etc"
    assert ten("install", "--unit-dir", str(short_tmp / "u"), "--config-dir", str(etc),
               "--no-reload").returncode == 0  # fmt: skip
    d = Deployment(short_tmp, "")
    try:
        check = d.manage("loadconfig", "--check", str(etc / "tenement.toml"))
        assert check.returncode == 0, check.stderr
        port = free_port()
        d.start("--config", str(etc / "tenement.toml"), "--bind", f"127.0.0.1:{port}", http=True)
        d.wait_states({"counter:alice": "running"}, 60)
        response, body = http_request(port, "alice.counter.localhost", "/")
        assert response.status == 200, body
    finally:
        d.cleanup()
