"""The Grafana dashboard and provisioning under deploy/grafana/."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

DS_UID = "${DS_PROMETHEUS}"

#: Panels the operators expect, by a word of their title (case-insensitive).
REQUIRED_PANELS = (
    "throughput",
    "consumer lag",
    "dlq",
    "event-to-alert latency",
    "alerts by rule and severity",
    "escalations",
    "mail delivery",
    "unacknowledged alerts",
    "oldest unacknowledged",
    "users tracked",
    "state size",
    "build info",
)


@pytest.fixture(scope="module")
def dashboard(deploy_dir: Path) -> dict[str, Any]:
    """The parsed dashboard JSON."""
    path = deploy_dir / "grafana" / "leakwatch-dashboard.json"
    document: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return document


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """Every (panel, target) pair."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield panel, target


class TestDashboardStructure:
    """The dashboard JSON is a well-formed, importable and provisionable Grafana dashboard."""

    def test_schema_version(self, dashboard: dict[str, Any]) -> None:
        """schemaVersion is about 39 (Grafana 10.3 - 11)."""
        assert 36 <= dashboard["schemaVersion"] <= 41

    def test_identity(self, dashboard: dict[str, Any]) -> None:
        """The dashboard has a stable uid and a title, and no instance-specific numeric id."""
        assert dashboard["uid"] == "leakwatch-overview"
        assert dashboard["title"]
        assert dashboard.get("id") is None

    def test_datasource_variable(self, dashboard: dict[str, Any]) -> None:
        """A DS_PROMETHEUS datasource variable of type prometheus is defined."""
        variables = {var["name"]: var for var in dashboard["templating"]["list"]}
        ds = variables["DS_PROMETHEUS"]
        assert ds["type"] == "datasource"
        assert ds["query"] == "prometheus"

    def test_panels_use_datasource_variable(self, dashboard: dict[str, Any]) -> None:
        """Every query panel and every target select the datasource through ${DS_PROMETHEUS}."""
        for panel in panels(dashboard):
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": DS_UID}, panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == DS_UID, (panel["title"], target["refId"])

    def test_query_variables_use_datasource_variable(self, dashboard: dict[str, Any]) -> None:
        """Query-type template variables also use ${DS_PROMETHEUS}."""
        for var in dashboard["templating"]["list"]:
            if var["type"] == "query":
                assert var["datasource"]["uid"] == DS_UID, var["name"]

    def test_panel_ids_unique(self, dashboard: dict[str, Any]) -> None:
        """Panel ids are unique (Grafana links and edits panels by id)."""
        ids = [panel["id"] for panel in panels(dashboard)]
        assert len(ids) == len(set(ids))

    def test_ref_ids_unique_per_panel(self, dashboard: dict[str, Any]) -> None:
        """Within a panel every target has its own refId and a non-empty expr."""
        for panel in panels(dashboard):
            targets = panel.get("targets", [])
            ref_ids = [target["refId"] for target in targets]
            assert len(ref_ids) == len(set(ref_ids)), panel["title"]
            assert all(target["expr"].strip() for target in targets), panel["title"]

    def test_grid_layout(self, dashboard: dict[str, Any]) -> None:
        """Panels fit the 24-column grid and do not overlap."""
        occupied: dict[tuple[int, int], str] = {}
        for panel in dashboard["panels"]:
            grid = panel["gridPos"]
            assert grid["w"] >= 1 and grid["h"] >= 1, panel["title"]
            assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
            for x in range(grid["x"], grid["x"] + grid["w"]):
                for y in range(grid["y"], grid["y"] + grid["h"]):
                    assert (x, y) not in occupied, (
                        f"{panel['title']!r} overlaps {occupied[(x, y)]!r}"
                    )
                    occupied[(x, y)] = panel["title"]

    def test_required_panels(self, dashboard: dict[str, Any]) -> None:
        """The panels the operators rely on are present."""
        titles = [panel["title"].lower() for panel in panels(dashboard)]
        missing = [word for word in REQUIRED_PANELS if not any(word in title for title in titles)]
        assert not missing, f"no panel titled like: {missing}"


class TestDashboardQueries:
    """Panel queries reference only metrics and labels the worker actually exposes."""

    def test_every_query_fits_the_metric_catalog(
        self, dashboard: dict[str, Any], promql: Callable[[str], list[str]]
    ) -> None:
        """Each metric, label and function used in a panel query exists."""
        problems = {
            f"{panel['title']} [{target['refId']}]": found
            for panel, target in queries(dashboard)
            if (found := promql(target["expr"]))
        }
        assert not problems, json.dumps(problems, indent=2, ensure_ascii=False)

    def test_every_exposed_metric_is_on_the_dashboard(
        self,
        dashboard: dict[str, Any],
        metric_catalog: dict[str, Any],
        promql_refs: Callable[[str], Any],
    ) -> None:
        """Every metric the worker exposes appears in at least one panel."""
        used = set()
        for _, target in queries(dashboard):
            for metric in promql_refs(target["expr"]).metrics:
                for suffix in ("_bucket", "_sum", "_count"):
                    if metric.endswith(suffix) and metric[: -len(suffix)] in metric_catalog:
                        metric = metric[: -len(suffix)]
                used.add(metric)
        missing = sorted(set(metric_catalog) - used)
        assert not missing, f"metrics without a panel: {missing}"

    def test_latency_quantiles(self, dashboard: dict[str, Any]) -> None:
        """The latency panel shows p50 and p99 via histogram_quantile over the latency buckets."""
        panel = next(p for p in panels(dashboard) if "event-to-alert latency" in p["title"].lower())
        exprs = [target["expr"] for target in panel["targets"]]
        for quantile in ("0.5", "0.99"):
            assert any(
                expr.startswith(f"histogram_quantile({quantile},")
                and "leakwatch_event_to_alert_latency_seconds_bucket" in expr
                for expr in exprs
            ), f"no p{quantile} query"

    def test_multi_worker_aggregation(self, dashboard: dict[str, Any]) -> None:
        """Queries aggregate across workers (no raw per-instance series except the build info table)."""
        aggregations = (
            "sum",
            "max",
            "min",
            "avg",
            "count",
            "topk",
            "histogram_quantile",
            "sort_desc",
        )
        for panel, target in queries(dashboard):
            expr = target["expr"].lstrip()
            assert expr.startswith(aggregations), f"{panel['title']}: {expr}"

    def test_instance_variable_source(
        self, dashboard: dict[str, Any], promql: Callable[[str], list[str]]
    ) -> None:
        """The worker (instance) variable is built from an exposed metric."""
        variable = next(var for var in dashboard["templating"]["list"] if var["name"] == "instance")
        assert variable["definition"] == "label_values(leakwatch_build_info, instance)"
        assert not promql("leakwatch_build_info")


class TestMetricCatalogMatchesWorker:
    """The catalog the dashboard and alerts are checked against is what the worker registers."""

    @staticmethod
    def _registered() -> dict[str, tuple[str, frozenset[str]]]:
        """Exposed name -> (type, labels) of every metric in streams.metrics."""
        import streams.metrics as worker_metrics

        found = {}
        for attribute in worker_metrics.__all__:
            metric = getattr(worker_metrics, attribute)
            kind = getattr(metric, "_type", None)
            if kind not in {"counter", "gauge", "histogram"}:
                continue
            name = metric._name + ("_total" if kind == "counter" else "")
            found[name] = (kind, frozenset(metric._labelnames))
        return found

    def test_same_names_types_and_labels(self, metric_catalog: dict[str, Any]) -> None:
        """Every catalog entry is registered by the worker with that type and labels, and vice versa."""
        assert self._registered() == metric_catalog


class TestCatalogChecker:
    """The PromQL catalog check used above actually catches bad queries."""

    @pytest.mark.parametrize(
        ("expr", "expected"),
        [
            ("sum(rate(leakwatch_events_total[5m]))", "unknown metric"),
            ("sum by (user) (rate(leakwatch_alerts_total[5m]))", "grouping by 'user'"),
            ('sum(rate(leakwatch_alerts_total{terminal="t1"}[5m]))', "has no label 'terminal'"),
            ("sum(leakwatch_alerts_total)", "is a counter"),
            ("sum(rate(leakwatch_consumer_lag[5m]))", "is a gauge"),
            ("histogram_quantile(0.9, sum(rate(leakwatch_batch_size_bucket[5m])))", "keep 'le'"),
            ("sum(leakwatch_batch_size)", "unknown metric"),
            ("sum(rate(leakwatch_mails_failed[5m]))", "unknown metric"),
            ("sum(ratee(leakwatch_mails_failed_total[5m]))", "unknown function"),
        ],
    )
    def test_bad_query_is_reported(
        self, promql: Callable[[str], list[str]], expr: str, expected: str
    ) -> None:
        """A query using a missing metric, label or function, or misusing a type, is reported."""
        problems = promql(expr)
        assert any(expected in problem for problem in problems), problems

    @pytest.mark.parametrize(
        "expr",
        [
            'sum by (topic) (rate(leakwatch_events_consumed_total{instance=~"$instance"}[$__rate_interval]))',
            "histogram_quantile(0.99, sum by (detector, le) (rate(leakwatch_detector_seconds_bucket[5m])))",
            'max(leakwatch_oldest_unacknowledged_age_seconds{severity="critical"}) > 900',
            'absent(up{job="leakwatch"})',
        ],
    )
    def test_good_query_passes(self, promql: Callable[[str], list[str]], expr: str) -> None:
        """A correct query produces no problems."""
        assert promql(expr) == []


class TestGrafanaProvisioning:
    """Grafana provisioning wires the datasource and the dashboard in docker compose."""

    def test_datasource(self, deploy_dir: Path, yaml_file: Callable[[Path], Any]) -> None:
        """A default Prometheus datasource points at the compose prometheus service."""
        config = yaml_file(
            deploy_dir / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
        )
        assert config["apiVersion"] == 1
        (datasource,) = config["datasources"]
        assert datasource["type"] == "prometheus"
        assert datasource["isDefault"] is True
        assert datasource["url"] == "http://prometheus:9090"
        compose = yaml_file(deploy_dir / "docker-compose.yml")
        assert "prometheus" in compose["services"]

    def test_dashboard_provider_matches_compose_mount(
        self, deploy_dir: Path, yaml_file: Callable[[Path], Any]
    ) -> None:
        """The dashboard provider reads the directory into which compose mounts the dashboard JSON."""
        config = yaml_file(deploy_dir / "grafana" / "provisioning" / "dashboards" / "leakwatch.yml")
        (provider,) = config["providers"]
        assert provider["type"] == "file"
        path = provider["options"]["path"].rstrip("/")
        volumes = yaml_file(deploy_dir / "docker-compose.yml")["services"]["grafana"]["volumes"]
        mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in volumes}
        assert (
            mounts.get(f"{path}/leakwatch-dashboard.json") == "./grafana/leakwatch-dashboard.json"
        )
        assert mounts.get("/etc/grafana/provisioning") == "./grafana/provisioning"
