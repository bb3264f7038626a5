"""Prometheus configuration, alert rules and their unit tests, checked with the real promtool.

promtool is required: these tests fail (they do not skip) when it is missing,
because a broken alert rule is only noticed when the pipeline is already down.
Install it with ``apt-get install -y prometheus`` (Debian/Ubuntu) or point the
``PROMTOOL`` environment variable at a promtool binary.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REQUIRED_ALERTS = (
    "LeakwatchConsumerLagGrowing",
    "LeakwatchDLQRateHigh",
    "LeakwatchMailFailures",
    "LeakwatchCriticalAlertUnacknowledged",
    "LeakwatchWorkerDown",
)

ROUTING_SEVERITIES = {"warning", "critical"}


def require_promtool() -> str:
    """Path of the promtool binary; fails (not skips) the calling test when there is none."""
    wanted = os.environ.get("PROMTOOL", "promtool")
    found = shutil.which(wanted)
    if found is None:
        pytest.fail(
            f"promtool not found (looked for {wanted!r} on PATH). The deployment tests need the "
            "real promtool to validate deploy/prometheus/: install it with "
            "`apt-get install -y prometheus` (Debian/Ubuntu) or set PROMTOOL=/path/to/promtool.",
            pytrace=False,
        )
    return found


def run_promtool(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run promtool from ``cwd`` and return the finished process."""
    return subprocess.run(
        [require_promtool(), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    """Fail with promtool's own output when it did not exit 0."""
    assert result.returncode == 0, (
        f"`{' '.join(result.args)}` exited {result.returncode}\n"
        f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    )


def alerting_rules(alerts_path: Path) -> list[dict[str, Any]]:
    """Every alerting rule of a Prometheus rule file."""
    with alerts_path.open(encoding="utf-8") as handle:
        document = yaml.safe_load(handle)
    return [rule for group in document["groups"] for rule in group["rules"] if "alert" in rule]


def github_anchor(heading: str) -> str:
    """The anchor GitHub renders for a Markdown heading."""
    slug = heading.strip().lower()
    slug = "".join(ch for ch in slug if ch in " -_" or unicodedata.category(ch)[0] in "LN")
    return slug.replace(" ", "-")


class TestPromtool:
    """The files under deploy/prometheus/ pass promtool's own checks."""

    def test_check_config(self, repo_root: Path) -> None:
        """`promtool check config` accepts prometheus.yml (and the rule files it references)."""
        assert_ok(run_promtool(repo_root, "check", "config", "deploy/prometheus/prometheus.yml"))

    def test_check_rules(self, repo_root: Path) -> None:
        """`promtool check rules` accepts alerts.yml."""
        assert_ok(run_promtool(repo_root, "check", "rules", "deploy/prometheus/alerts.yml"))

    def test_rule_unit_tests(self, repo_root: Path) -> None:
        """`promtool test rules` passes every case of alerts_test.yml."""
        result = run_promtool(repo_root, "test", "rules", "deploy/prometheus/alerts_test.yml")
        assert_ok(result)
        assert "SUCCESS" in result.stdout

    def test_dashboard_queries_are_valid_promql(self, deploy_dir: Path, tmp_path: Path) -> None:
        """Every Grafana panel query parses as PromQL once Grafana variables are substituted."""
        dashboard = json.loads(
            (deploy_dir / "grafana" / "leakwatch-dashboard.json").read_text(encoding="utf-8")
        )
        substitutions = {
            "$__rate_interval": "1m",
            "$__interval": "1m",
            "$__range": "1h",
            "$instance": ".*",
        }
        rules = []
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"]
                for variable, value in substitutions.items():
                    expr = expr.replace(variable, value)
                assert "$" not in expr, (
                    f"panel {panel['title']!r}: unhandled Grafana variable in {expr!r}"
                )
                rules.append(
                    {"record": f"dashboard:panel_{panel['id']}_{target['refId']}", "expr": expr}
                )
        assert rules, "the dashboard has no queries"
        rule_file = tmp_path / "dashboard_queries.yml"
        rule_file.write_text(
            yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8"
        )
        assert_ok(run_promtool(tmp_path, "check", "rules", str(rule_file)))


class TestScrapeConfig:
    """prometheus.yml scrapes the workers under the job name the alerts expect."""

    def test_leakwatch_job_targets(
        self, deploy_dir: Path, yaml_file: Callable[[Path], Any]
    ) -> None:
        """Job `leakwatch` scrapes worker1:6066 and worker2:6066 on /metrics."""
        config = yaml_file(deploy_dir / "prometheus" / "prometheus.yml")
        jobs = {job["job_name"]: job for job in config["scrape_configs"]}
        job = jobs["leakwatch"]
        assert job.get("metrics_path", "/metrics") == "/metrics"
        targets = [target for static in job["static_configs"] for target in static["targets"]]
        assert sorted(targets) == ["worker1:6066", "worker2:6066"]

    def test_rule_files_resolve_relative_to_config(
        self, deploy_dir: Path, yaml_file: Callable[[Path], Any]
    ) -> None:
        """rule_files name alerts.yml relative to the config file, which is where promtool and Prometheus look."""
        config = yaml_file(deploy_dir / "prometheus" / "prometheus.yml")
        assert config["rule_files"] == ["alerts.yml"]
        assert (deploy_dir / "prometheus" / "alerts.yml").is_file()


class TestAlertRules:
    """alerts.yml defines the required alerts, documented and tied to real metrics."""

    def test_required_alerts_exist(self, deploy_dir: Path) -> None:
        """Every alert the operators rely on is defined."""
        names = {rule["alert"] for rule in alerting_rules(deploy_dir / "prometheus" / "alerts.yml")}
        missing = set(REQUIRED_ALERTS) - names
        assert not missing, f"missing alerts: {sorted(missing)}"

    def test_worker_down_covers_down_and_absent_targets(self, deploy_dir: Path) -> None:
        """LeakwatchWorkerDown fires both on up == 0 and when job leakwatch has no target at all."""
        exprs = [
            rule["expr"]
            for rule in alerting_rules(deploy_dir / "prometheus" / "alerts.yml")
            if rule["alert"] == "LeakwatchWorkerDown"
        ]
        flat = [re.sub(r"\s+", "", expr) for expr in exprs]
        assert 'up{job="leakwatch"}==0' in flat
        assert 'absent(up{job="leakwatch"})' in flat
        for rule in alerting_rules(deploy_dir / "prometheus" / "alerts.yml"):
            if rule["alert"] == "LeakwatchWorkerDown":
                assert rule.get("for") == "2m"

    @pytest.mark.parametrize("field", ["summary", "description", "runbook"])
    def test_annotations_present(self, deploy_dir: Path, field: str) -> None:
        """Every alert carries a non-empty summary, description and runbook annotation."""
        for rule in alerting_rules(deploy_dir / "prometheus" / "alerts.yml"):
            value = rule.get("annotations", {}).get(field, "")
            assert value.strip(), f"{rule['alert']}: annotation {field!r} is missing"

    def test_descriptions_are_bilingual(self, deploy_dir: Path) -> None:
        """Descriptions are in English and Japanese (the operators read either)."""
        for rule in alerting_rules(deploy_dir / "prometheus" / "alerts.yml"):
            description = rule["annotations"]["description"]
            assert re.search(r"[A-Za-z]{3,} [A-Za-z]{3,}", description), (
                f"{rule['alert']}: no English text"
            )
            assert re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", description), (
                f"{rule['alert']}: no Japanese text"
            )

    def test_severity_labels(self, deploy_dir: Path) -> None:
        """Every alert has a routing severity of warning or critical."""
        for rule in alerting_rules(deploy_dir / "prometheus" / "alerts.yml"):
            assert rule.get("labels", {}).get("severity") in ROUTING_SEVERITIES, rule["alert"]

    def test_runbook_anchors_exist(self, deploy_dir: Path) -> None:
        """Each runbook annotation points at a heading that exists in deploy/README.md."""
        readme = (deploy_dir / "README.md").read_text(encoding="utf-8")
        anchors = {
            github_anchor(line.lstrip("#")) for line in readme.splitlines() if line.startswith("#")
        }
        for rule in alerting_rules(deploy_dir / "prometheus" / "alerts.yml"):
            runbook = rule["annotations"]["runbook"]
            path, _, anchor = runbook.partition("#")
            assert path == "deploy/README.md", f"{rule['alert']}: runbook {runbook!r}"
            assert anchor in anchors, (
                f"{rule['alert']}: no heading for #{anchor} in deploy/README.md"
            )

    def test_expressions_use_only_exposed_metrics(
        self, deploy_dir: Path, promql: Callable[[str], list[str]]
    ) -> None:
        """Alert expressions reference only metrics and labels the worker exposes."""
        problems = {
            rule["alert"]: found
            for rule in alerting_rules(deploy_dir / "prometheus" / "alerts.yml")
            if (found := promql(rule["expr"]))
        }
        assert not problems, problems

    def test_critical_matcher_is_a_real_severity(self, deploy_dir: Path) -> None:
        """The severity value the unacknowledged-alert rule filters on is a leakwatch alert severity."""
        from schemas.alert import SEVERITIES

        rule = next(
            rule
            for rule in alerting_rules(deploy_dir / "prometheus" / "alerts.yml")
            if rule["alert"] == "LeakwatchCriticalAlertUnacknowledged"
        )
        values = re.findall(r'severity\s*=\s*"([^"]+)"', rule["expr"])
        assert values, rule["expr"]
        assert set(values) <= set(SEVERITIES)


class TestAlertUnitTestCoverage:
    """alerts_test.yml exercises every alert both firing and staying silent."""

    @staticmethod
    def _cases(deploy_dir: Path) -> list[dict[str, Any]]:
        with (deploy_dir / "prometheus" / "alerts_test.yml").open(encoding="utf-8") as handle:
            document = yaml.safe_load(handle)
        return [case for test in document["tests"] for case in test.get("alert_rule_test", [])]

    def test_every_alert_has_a_firing_case(self, deploy_dir: Path) -> None:
        """Each alert name has at least one case expecting it to fire."""
        names = {rule["alert"] for rule in alerting_rules(deploy_dir / "prometheus" / "alerts.yml")}
        firing = {case["alertname"] for case in self._cases(deploy_dir) if case.get("exp_alerts")}
        assert names <= firing, f"never tested firing: {sorted(names - firing)}"

    def test_every_alert_has_a_silent_case(self, deploy_dir: Path) -> None:
        """Each alert name has at least one case expecting no alert."""
        names = {rule["alert"] for rule in alerting_rules(deploy_dir / "prometheus" / "alerts.yml")}
        silent = {
            case["alertname"] for case in self._cases(deploy_dir) if not case.get("exp_alerts")
        }
        assert names <= silent, f"never tested silent: {sorted(names - silent)}"

    def test_every_alert_rule_variant_fires(self, deploy_dir: Path) -> None:
        """Alerts defined by several rules (e.g. LeakwatchWorkerDown) are tested firing with each rule's severity."""
        expected: dict[str, set[str]] = {}
        for rule in alerting_rules(deploy_dir / "prometheus" / "alerts.yml"):
            expected.setdefault(rule["alert"], set()).add(rule["labels"]["severity"])
        seen: dict[str, set[str]] = {}
        for case in self._cases(deploy_dir):
            for alert in case.get("exp_alerts") or []:
                seen.setdefault(case["alertname"], set()).add(alert["exp_labels"]["severity"])
        for name, severities in expected.items():
            assert severities <= seen.get(name, set()), (
                f"{name}: untested severities {severities - seen.get(name, set())}"
            )
