"""The shipped systemd unit: it parses, and its hardening score stays at 5.0 or lower."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

UNIT = REPO / "deploy" / "tenement.service"

pytestmark = [
    pytest.mark.timeout(60),
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
