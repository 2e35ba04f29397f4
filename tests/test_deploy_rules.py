"""deploy/: the Prometheus alerting rules (checked and unit-tested by promtool) and the
Grafana dashboard, whose queries may only name metrics tenement exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO, TENANT_PYTHON, TESTAPP
from tests.harness import Deployment, free_port

DEPLOY = REPO / "deploy"
RULES = DEPLOY / "prometheus-rules.yml"
RULE_TESTS = DEPLOY / "prometheus-rules.test.yml"
DASHBOARD = DEPLOY / "grafana-dashboard.json"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

# Issue 6's table, plus the upstream aliases it asks for.
ISSUE_METRICS = {
    "tenement_instances",
    "tenement_instances_registered",
    "tenement_wakes_total",
    "tenement_wake_duration_seconds",
    "tenement_proxy_requests_total",
    "tenement_proxy_request_duration_seconds",
    "tenement_open_connections",
    "tenement_restarts_total",
    "tenement_health_check_failures_total",
    "tenement_idle_stops_total",
    "tenement_instance_uptime_seconds",
    "tenement_log_lines_total",
    "tenement_instances_running",
    "tenement_hibernation_wakes_total",
    "tenement_requests_total",
    "tenement_instances_up",
    "tenement_instance_restarts_total",
}
# Issue 17's: exported only by a server with [settings.tls] on (tests/tls checks them live).
TLS_METRICS = {"tenement_tls_certificate_expiry_seconds", "tenement_acme_orders_total"}
HISTOGRAMS = {"tenement_wake_duration_seconds", "tenement_proxy_request_duration_seconds"}
NAME = re.compile(r"\btenement_[a-z_]+\b")


def promtool(*args: str, cwd: Path = DEPLOY) -> subprocess.CompletedProcess[str]:
    if not Path(PROMTOOL).exists():
        pytest.fail("promtool is missing: run scripts/system-deps.sh test (Debian's prometheus)")
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def metric_of(name: str) -> str:
    """A sample name as its metric: histogram series are NAME_bucket/_count/_sum."""
    for suffix in ("_bucket", "_count", "_sum"):
        base = name.removesuffix(suffix)
        if base != name and base in HISTOGRAMS:
            return base
    return name


def panel_exprs() -> dict[str, list[str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return {
        p["title"]: [t.get("expr", "") for t in p.get("targets", [])] for p in dashboard["panels"]
    }


def referenced() -> set[str]:
    texts = [RULES.read_text(), *(e for exprs in panel_exprs().values() for e in exprs)]
    return {metric_of(name) for text in texts for name in NAME.findall(text)}


# ---- rules ---------------------------------------------------------------------------------


def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 4 rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    result = promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_unit_tests_can_fail(tmp_path: Path) -> None:
    """Claim the crash loop stays quiet at 20 min: promtool must say it fired."""
    shutil.copy(RULES, tmp_path / RULES.name)
    text = RULE_TESTS.read_text()
    start = text.index("      - eval_time: 20m\n        alertname: TenementCrashLoop")
    end = text.index("  # `slow` wakes")
    broken = text[:start] + (
        "      - eval_time: 20m\n        alertname: TenementCrashLoop\n        exp_alerts: []\n\n"
    )
    (tmp_path / RULE_TESTS.name).write_text(broken + text[end:])
    result = promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert result.returncode != 0
    assert "TenementCrashLoop" in result.stdout + result.stderr


def test_every_alert_has_for_severity_and_annotations() -> None:
    text = RULES.read_text()
    alerts = re.findall(r"- alert: (\w+)", text)
    assert alerts == [
        "TenementCrashLoop",
        "TenementWakeSlow",
        "TenementInstancesFailed",
        "TenementCertificateExpiring",
    ]
    assert text.count("\n        for: ") == 4
    assert len(re.findall(r"severity: (warning|critical)", text)) == 4
    assert text.count("summary:") == 4 and text.count("description:") == 4


# ---- dashboard -------------------------------------------------------------------------------


def test_dashboard_is_importable_with_a_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_every_panel_has_a_promql_target() -> None:
    exprs = panel_exprs()
    assert all(e and NAME.search(e) for es in exprs.values() for e in es) and all(exprs.values())
    wanted = {
        "running vs sleeping": 'state="stopped"',
        "p50 / p95": "histogram_quantile(0.95, sum by (le) (rate(tenement_wake_duration_seconds",
        "Error rate": 'code="5xx"',
        "Restarts by reason": "sum by (reason)",
        "crash-loopers": "topk(10,",
        "Open connections": "tenement_open_connections",
    }
    for title_part, fragment in wanted.items():
        titles = [t for t in exprs if title_part in t]
        assert titles, title_part
        assert any(fragment in e for e in exprs[titles[0]]), (title_part, exprs[titles[0]])


def test_queries_name_only_the_issues_metrics() -> None:
    names = referenced()
    assert names - ISSUE_METRICS - TLS_METRICS == set()
    assert {"tenement_instances", "tenement_wake_duration_seconds"} <= names


# ---- against a live /metrics -----------------------------------------------------------------


@pytest.fixture
def live_metrics(short_tmp: Path) -> Iterator[str]:
    config = f'[service.app]\ncommand = "{TENANT_PYTHON} {TESTAPP}"\nhealth = "/health"\n'
    d = Deployment(short_tmp, config + '[instances]\napp = ["alice"]\n')
    port = free_port()
    try:
        d.start("--config", str(d.config), "--bind", f"127.0.0.1:{port}", http=True)
        d.wait_states({"app:alice": "running"}, timeout=60)
        d.wait_for("the metrics listener", d.metrics_socket.exists)
        status, _, raw = d.private_get("/metrics")
        body = raw.decode()
        assert status == 200, body
        yield body
    finally:
        d.cleanup()


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_every_referenced_metric_is_exported(live_metrics: str) -> None:
    families = {f.name: f.type for f in text_string_to_metric_families(live_metrics)}
    for name in referenced() - TLS_METRICS:
        family = name.removesuffix("_total") if families.get(name) is None else name
        assert family in families, f"{name} is not in a live /metrics"
        if name in HISTOGRAMS:
            assert families[family] == "histogram"
