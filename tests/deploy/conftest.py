"""Shared fixtures for the deployment tests (deploy/).

The metric catalog below is the contract between the worker and everything in
deploy/ that queries it (alert rules, the Grafana dashboard).  A query that
names a metric or a label not listed here fails the tests, so dashboards and
alerts cannot silently reference series that do not exist.  When the worker
gains a metric, add it here in the same change.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY_DIR = REPO_ROOT / "deploy"

#: name -> (type, labels) of every series the worker exposes on /metrics.
METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "leakwatch_events_consumed_total": ("counter", frozenset({"topic"})),
    "leakwatch_events_invalid_total": ("counter", frozenset({"reason"})),
    "leakwatch_detector_events_total": ("counter", frozenset({"detector"})),
    "leakwatch_detector_seconds": ("histogram", frozenset({"detector"})),
    "leakwatch_batch_size": ("histogram", frozenset()),
    "leakwatch_alerts_total": ("counter", frozenset({"rule_id", "severity"})),
    "leakwatch_alerts_escalated_total": ("counter", frozenset({"severity"})),
    "leakwatch_mails_sent_total": ("counter", frozenset()),
    "leakwatch_mails_failed_total": ("counter", frozenset()),
    "leakwatch_mails_retried_total": ("counter", frozenset()),
    "leakwatch_alerts_unacknowledged": ("gauge", frozenset({"severity"})),
    "leakwatch_oldest_unacknowledged_age_seconds": ("gauge", frozenset({"severity"})),
    "leakwatch_event_to_alert_latency_seconds": ("histogram", frozenset()),
    "leakwatch_consumer_lag": ("gauge", frozenset({"topic", "partition"})),
    "leakwatch_users_tracked": ("gauge", frozenset()),
    "leakwatch_state_bytes": ("gauge", frozenset()),
    "leakwatch_build_info": ("gauge", frozenset({"version", "rules_version"})),
}

#: Labels Prometheus attaches to every scraped series.
SCRAPE_LABELS = frozenset({"instance", "job"})

#: Series Prometheus itself synthesises for each scrape target.
SYNTHETIC_METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "up": ("gauge", frozenset()),
}

#: Labels that would identify a person or a device: never on a metric.
FORBIDDEN_LABELS = frozenset(
    {"user", "user_id", "subject", "subject_id", "terminal", "terminal_id"}
)

_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

#: PromQL functions and aggregation operators (called with parentheses).
PROMQL_FUNCTIONS = frozenset(
    {
        "abs",
        "absent",
        "absent_over_time",
        "avg",
        "avg_over_time",
        "bottomk",
        "ceil",
        "changes",
        "clamp",
        "clamp_max",
        "clamp_min",
        "count",
        "count_over_time",
        "count_values",
        "day_of_month",
        "day_of_week",
        "day_of_year",
        "days_in_month",
        "delta",
        "deriv",
        "exp",
        "floor",
        "group",
        "histogram_quantile",
        "holt_winters",
        "hour",
        "idelta",
        "increase",
        "irate",
        "label_join",
        "label_replace",
        "last_over_time",
        "ln",
        "log10",
        "log2",
        "max",
        "max_over_time",
        "min",
        "min_over_time",
        "minute",
        "month",
        "predict_linear",
        "present_over_time",
        "quantile",
        "quantile_over_time",
        "rate",
        "resets",
        "round",
        "scalar",
        "sgn",
        "sort",
        "sort_desc",
        "sqrt",
        "stddev",
        "stddev_over_time",
        "stdvar",
        "stdvar_over_time",
        "sum",
        "sum_over_time",
        "time",
        "timestamp",
        "topk",
        "vector",
        "year",
    }
)

#: PromQL keywords that are not followed by a parenthesised argument list.
PROMQL_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"})

_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}")
_MATCHER_LABEL = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
_IDENT = re.compile(r"(?<![\w.$])[A-Za-z_:][\w:]*")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VAR = re.compile(r"\$\{[^}]*\}|\$\w+")


@dataclass
class PromQLRefs:
    """What one PromQL expression references."""

    expr: str
    #: Metric names in order of appearance.
    metrics: list[str] = field(default_factory=list)
    #: (metric or None, label) for each label matcher inside {...}.
    matchers: list[tuple[str | None, str]] = field(default_factory=list)
    #: Labels named in by/without/on/ignoring/group_left/group_right clauses.
    grouping_labels: set[str] = field(default_factory=set)
    #: Functions and aggregations called.
    functions: set[str] = field(default_factory=set)
    #: Identifiers that are neither metric, function nor keyword.
    unknown: set[str] = field(default_factory=set)
    #: Metric names that appear directly as the argument of rate/irate/increase.
    rated: set[str] = field(default_factory=set)


def base_metric(name: str) -> tuple[str, str] | None:
    """Map a series name to (catalog name, component); None if unknown.

    Histograms are queried through their ``_bucket``/``_sum``/``_count`` series,
    which are the component; other metrics have the component ``""``.
    """
    catalog = {**METRICS, **SYNTHETIC_METRICS}
    if name in catalog:
        kind = catalog[name][0]
        return (name, "") if kind != "histogram" else None
    for suffix in _HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            base = name[: -len(suffix)]
            if catalog.get(base, ("",))[0] == "histogram":
                return base, suffix
    return None


def allowed_labels(name: str) -> frozenset[str]:
    """Labels a selector of series ``name`` may match on."""
    resolved = base_metric(name)
    if resolved is None:
        return frozenset()
    base, suffix = resolved
    labels = {**METRICS, **SYNTHETIC_METRICS}[base][1] | SCRAPE_LABELS
    return labels | {"le"} if suffix == "_bucket" else labels


def analyze_promql(expr: str) -> PromQLRefs:
    """Extract the metrics, labels and functions a PromQL expression uses.

    Grafana variables (``$__rate_interval``, ``$instance``, ``${DS}``) and
    string literals are blanked first.  This is a lexical scan, not a parser;
    syntax is checked separately with ``promtool``.
    """
    refs = PromQLRefs(expr=expr)
    text = _STRING.sub('""', expr)
    text = _GRAFANA_VAR.sub("5m", text)
    for match in re.finditer(r"\b(rate|irate|increase)\s*\(\s*([A-Za-z_:][\w:]*)", text):
        refs.rated.add(match.group(2))
    for match in _GROUPING.finditer(text):
        refs.grouping_labels.update(
            label.strip() for label in match.group(2).split(",") if label.strip()
        )
    text = _GROUPING.sub(" ", text)

    def selector(match: re.Match[str]) -> str:
        metric = match.group(1)
        for label in _MATCHER_LABEL.findall(match.group(2)):
            if label == "__name__":
                continue
            refs.matchers.append((metric, label))
        return f" {metric or ''} "

    text = _SELECTOR.sub(selector, text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    for match in _IDENT.finditer(text):
        word = match.group(0)
        following = text[match.end() :].lstrip()
        if word in PROMQL_KEYWORDS:
            continue
        if following.startswith("("):
            refs.functions.add(word)
            if word not in PROMQL_FUNCTIONS:
                refs.unknown.add(word)
        elif re.fullmatch(r"\d+[smhdwy]|e\d*", word):
            continue
        else:
            refs.metrics.append(word)
    return refs


def promql_problems(expr: str) -> list[str]:
    """Every reason ``expr`` does not fit the metric catalog (empty when it fits)."""
    refs = analyze_promql(expr)
    problems = [f"unknown function {name}()" for name in sorted(refs.unknown)]
    labels_in_scope: set[str] = set()
    for metric in refs.metrics:
        resolved = base_metric(metric)
        if resolved is None:
            problems.append(f"unknown metric {metric!r}")
            continue
        base, suffix = resolved
        labels_in_scope |= allowed_labels(metric)
        kind = {**METRICS, **SYNTHETIC_METRICS}[base][0]
        is_counter_like = kind == "counter" or suffix in _HISTOGRAM_SUFFIXES
        if is_counter_like and metric not in refs.rated:
            problems.append(f"{metric} is a counter: use it inside rate()/increase()")
        if not is_counter_like and metric in refs.rated:
            problems.append(f"{metric} is a gauge: rate()/increase() is meaningless on it")
    for selected, label in refs.matchers:
        if selected is None:
            problems.append(f"label matcher on {label!r} without a metric name")
        elif base_metric(selected) is not None and label not in allowed_labels(selected):
            problems.append(f"{selected} has no label {label!r}")
    for label in sorted(refs.grouping_labels - labels_in_scope):
        problems.append(f"grouping by {label!r}, which none of {sorted(set(refs.metrics))} has")
    if "histogram_quantile" in refs.functions:
        if not any(m.endswith("_bucket") for m in refs.metrics):
            problems.append("histogram_quantile() over something that is not a _bucket series")
        if "le" not in refs.grouping_labels:
            problems.append("histogram_quantile() needs the aggregation to keep 'le'")
    forbidden = {label for _, label in refs.matchers} | refs.grouping_labels
    problems += [
        f"label {label!r} identifies a person or device"
        for label in sorted(forbidden & FORBIDDEN_LABELS)
    ]
    return problems


def load_yaml(path: Path) -> Any:
    """Parse one YAML document."""
    with path.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def load_yaml_all(path: Path) -> list[Any]:
    """Parse every YAML document of a file, skipping empty ones."""
    with path.open(encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def deploy_dir() -> Path:
    """The deploy/ directory."""
    return DEPLOY_DIR


@pytest.fixture(scope="session")
def metric_catalog() -> dict[str, tuple[str, frozenset[str]]]:
    """The metrics the worker exposes: name -> (type, labels)."""
    return dict(METRICS)


@pytest.fixture(scope="session")
def promql() -> Callable[[str], list[str]]:
    """Return the checker: expression -> list of catalog problems."""
    return promql_problems


@pytest.fixture(scope="session")
def promql_refs() -> Callable[[str], PromQLRefs]:
    """Return the lexical analyser: expression -> references."""
    return analyze_promql


@pytest.fixture(scope="session")
def yaml_file() -> Callable[[Path], Any]:
    """Return a loader for single-document YAML files."""
    return load_yaml


@pytest.fixture(scope="session")
def yaml_docs() -> Callable[[Path], list[Any]]:
    """Return a loader for multi-document YAML files."""
    return load_yaml_all
