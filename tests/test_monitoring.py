"""monitoring/: the Prometheus alert rules pass `promtool check rules` and their unit tests
(`promtool test rules`, monitoring/tests/), every alert has a test that shows it firing, and the
Grafana dashboard is valid JSON whose panels query Prometheus. promtool comes from Debian's
prometheus package, installed by scripts/sysdeps.sh (`make sysdeps`, run by `make test`).

That every metric the rules and the dashboard name is one the components expose is checked
against a running fleet: tests/integration/test_metric_names.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "monitoring"
RULE_FILES = sorted((MONITORING / "rules").glob("*.yml"))
RULE_TESTS = sorted((MONITORING / "tests").glob("*.test.yml"))
DASHBOARD = MONITORING / "grafana" / "tickle.json"
# Metrics the rules or the dashboard use before the code exposes them (none now). A fleet that
# exposes one of them makes tests/integration/test_metric_names.py fail, saying to take it out.
PENDING: set[str] = set()


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make sysdeps` installs it (Debian package prometheus)"
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120)


def _rules() -> list[dict[str, Any]]:
    return [rule for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"]]  # fmt: skip


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """The tickle_* metric names a PromQL expression reads (quoted label values left out)."""
    unquoted = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return set(re.findall(r"\btickle_[a-z0-9_]+\b", unquoted))


def referenced_metrics() -> dict[str, set[str]]:
    """Metric name -> where it is used (alert names, dashboard panels)."""
    used: dict[str, set[str]] = {}
    for rule in _rules():
        for name in metric_names(rule["expr"]):
            used.setdefault(name, set()).add(f"alert {rule['alert']}")
    for expr in _dashboard_exprs():
        for name in metric_names(expr):
            used.setdefault(name, set()).add("dashboard")
    return used


def test_promtool_checks_the_rules() -> None:
    assert RULE_FILES, "no rule files in monitoring/rules"
    run = _promtool("check", "rules", *map(str, RULE_FILES))
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in run.stdout


def test_the_rules_unit_tests_pass() -> None:
    assert RULE_TESTS, "no promtool tests in monitoring/tests"
    run = _promtool("test", "rules", *map(str, RULE_TESTS))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout


def test_a_wrong_expectation_fails_the_unit_tests(tmp_path: Path) -> None:
    # the unit tests can fail: the same tests expecting another summary
    (tmp_path / "rules").mkdir()
    shutil.copy(RULE_FILES[0], tmp_path / "rules" / RULE_FILES[0].name)
    (tmp_path / "tests").mkdir()
    text = RULE_TESTS[0].read_text().replace("is down", "is up", 1)
    (tmp_path / "tests" / "wrong.test.yml").write_text(text)
    run = _promtool("test", "rules", str(tmp_path / "tests" / "wrong.test.yml"))
    assert run.returncode != 0
    assert "FAILED" in run.stdout + run.stderr


def test_the_issue_s_alerts_are_there() -> None:
    alerts = {rule["alert"] for rule in _rules()}
    assert {
        "TickleNotificationServerDown",
        "TickleTaskServerDown",
        "TickleAgentsTickleUnreachable",
        "TickleOutboxGrowing",
        "TickleTaskServerClockSkew",
        "TickleComputersClockSkewed",
        "TickleStatusEventsStuck",
    } <= alerts


def test_every_alert_is_unit_tested_firing_and_quiet() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    alerts = {rule["alert"] for rule in _rules()}
    assert alerts - firing == set(), "alerts no test shows firing"
    assert alerts - quiet == set(), "alerts no test shows quiet"


def test_every_alert_has_a_severity_and_a_summary() -> None:
    for rule in _rules():
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["annotations"]["description"], rule["alert"]


def test_the_dashboard_is_grafana_json_querying_prometheus() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "tickle-fleet"
    assert dashboard["title"]
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    graphs = [p for p in panels if p["type"] != "row"]
    assert len(graphs) >= 10
    for panel in graphs:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}, panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs, panel["title"]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert metric_names(target["expr"]) or target["expr"].startswith("up{"), target
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "instance"}


def test_the_dashboard_shows_every_tier_s_metrics() -> None:
    # every metric of tickle.metrics.ComponentMetrics has a panel
    source = (ROOT / "src" / "tickle" / "metrics.py").read_text()
    defined = set(re.findall(r'(?:Counter|Gauge|Histogram)\(\s*"(tickle_[a-z0-9_]+)"', source))
    assert len(defined) >= 14
    shown = {re.sub(r"_(total|bucket|count|sum)$", "", n) for e in _dashboard_exprs()
             for n in metric_names(e)}  # fmt: skip
    assert defined - shown == set()


def test_metric_names_reads_names_not_label_values() -> None:
    expr = 'sum by (job) (rate(tickle_pulls_total{job="tickle_fake_total", via="poll"}[5m])) / up'
    assert metric_names(expr) == {"tickle_pulls_total"}
