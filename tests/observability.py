"""The monitoring files in deploy/ (Prometheus config and alert rules, the Grafana dashboard) as
the unit and integration tiers read them: their PromQL expressions, the metric names those
expressions query, and the sample names a set of metric families exposes."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "multimed.json"
# Series Prometheus itself makes for every target, not the gateway.
SYNTHETIC = frozenset({"up"})
# prometheus_client's families -> the sample names they expose (counters drop `_total` from the
# family name; histograms expose buckets, sum and count).
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
# Label values, label matchers, range selectors and grouping lists hold no metric names.
_STRIPPED = (
    re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\''),
    re.compile(r"\{[^}]*\}"),
    re.compile(r"\[[^\]]*\]"),
    re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"),
)
# An identifier not called as a function; after a digit or a dot it is part of a number.
_NAME = re.compile(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "atan2", "bool", "offset", "group_left", "group_right", "inf", "nan"}
)
# A Grafana variable's query: label_values(metric, label) or label_values(metric{...}, label).
_LABEL_VALUES = re.compile(r"label_values\(\s*([a-zA-Z_:][\w:]*)\s*(?:\{[^}]*\})?\s*,\s*\w+\s*\)")


def tool(name: str) -> str:
    """The path of a Prometheus binary; a test without it skips, except in CI (CI=true), where
    .ci/run installs Debian's prometheus and a missing binary is a failure."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"{name} is missing in CI (.ci/run installs Debian's prometheus)")
        pytest.skip(f"{name} is not installed (Debian: apt-get install prometheus)")
    return path


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana label_values() query) selects."""
    variable = _LABEL_VALUES.fullmatch(expr.strip())
    if variable:
        return {variable[1]}
    for pattern in _STRIPPED:
        expr = pattern.sub(" ", expr)
    return {n for n in _NAME.findall(expr) if n.lower() not in _KEYWORDS}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict) -> list[dict]:
    """Every panel, those nested in collapsed rows included."""
    return [p for top in board["panels"] for p in (top, *top.get("panels", []))]


def dashboard_queries(board: dict) -> dict[str, str]:
    """'panel title/refId' or 'variable name' -> its PromQL (or label_values) query."""
    queries = {}
    for panel in panels(board):
        for target in panel.get("targets", []):
            queries[f"{panel['title']}/{target['refId']}"] = target.get("expr", "")
    for variable in board["templating"]["list"]:
        queries[f"${variable['name']}"] = variable["query"]["query"]
    return queries


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def queried_metrics() -> dict[str, set[str]]:
    """Metric name -> where the dashboard and the alert rules query it."""
    where: dict[str, set[str]] = {}
    queries = dashboard_queries(dashboard())
    queries.update({rule["alert"]: rule["expr"] for rule in alert_rules()})
    for place, expr in queries.items():
        for name in metric_names(expr):
            where.setdefault(name, set()).add(place)
    return where


def exposed_names(families: Iterable) -> dict[str, str]:
    """Sample name -> its family's name, for prometheus_client metric families (a registry's
    collect(), or a scrape parsed by prometheus_client.parser)."""
    return {
        family.name + suffix: family.name
        for family in families
        for suffix in SUFFIXES.get(family.type, ())
    }
