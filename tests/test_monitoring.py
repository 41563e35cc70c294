"""deploy/monitoring: the alerting rules pass ``promtool test rules``, and every metric the rules and
the Grafana dashboard use is one pyflannel exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from pyflannel import metrics

MONITORING = Path(__file__).resolve().parent.parent / "deploy" / "monitoring"
METRIC = re.compile(r"\bpyflannel_[a-z0-9_]+")


def exported() -> set[str]:
    """Every series name pyflannel's registry can export."""
    registry = metrics.enable("test")
    try:
        names = set()
        for family in registry.collect():
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "info": ("_info",),
                        "gauge": ("",)}[family.type]
            names.update(family.name + s for s in suffixes)
        return names
    finally:
        metrics.disable()


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert shutil.which("promtool"), "promtool is missing: install Debian's prometheus package (scripts/setup.sh)"
    return subprocess.run(["promtool", *args], cwd=MONITORING, capture_output=True, text=True, timeout=120)


def test_the_alerting_rules_are_valid_and_pass_their_tests() -> None:
    res = promtool("check", "rules", "alerts.yaml")
    assert res.returncode == 0, res.stdout + res.stderr
    res = promtool("test", "rules", "alerts_test.yaml")
    assert res.returncode == 0, res.stdout + res.stderr
    rules = yaml.safe_load((MONITORING / "alerts.yaml").read_text())["groups"][0]["rules"]
    tested = yaml.safe_load((MONITORING / "alerts_test.yaml").read_text())["tests"]
    firing = {case["alertname"] for test in tested for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert firing == {rule["alert"] for rule in rules}, "every alert has a test in which it fires"


def test_the_rules_and_the_dashboard_use_only_metrics_that_exist() -> None:
    names = exported()
    rules = yaml.safe_load((MONITORING / "alerts.yaml").read_text())["groups"][0]["rules"]
    used = {m for rule in rules for m in METRIC.findall(rule["expr"])}
    dashboard: dict[str, Any] = json.loads((MONITORING / "dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)]
    used |= {m for expr in exprs for m in METRIC.findall(expr)}
    assert used - names == set()
    for wanted in ("pyflannel_probe_peers_unreachable", "pyflannel_network_programming_duration_seconds_bucket",
                   "pyflannel_worker_restarts_total", "pyflannel_vxlan_checksum_bug", "pyflannel_ready"):
        assert wanted in used


def test_the_dashboard_is_well_formed() -> None:
    dashboard: dict[str, Any] = json.loads((MONITORING / "dashboard.json").read_text())
    assert dashboard["uid"] == "pyflannel" and isinstance(dashboard["schemaVersion"], int)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "instance"}
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24 and pos["h"] > 0 and panel["title"]
        assert panel["type"] in ("stat", "timeseries") and panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"] and all(t["expr"] and '$instance' in t["expr"] for t in panel["targets"])
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
