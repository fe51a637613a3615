"""deploy/prometheus and deploy/grafana as an operator's tools read them: promtool accepts the
config and the rules and runs the rules' unit tests; the dashboard is well formed, uses the
provisioned datasource and only metrics the gateway declares. No server runs here."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml
from observability import (
    DASHBOARD,
    GRAFANA,
    PROMETHEUS,
    SYNTHETIC,
    alert_rules,
    dashboard,
    dashboard_queries,
    exposed_names,
    metric_names,
    panels,
    queried_metrics,
    tool,
)

from multimed.services.errors import Status
from multimed.services.metrics import REGISTRY

GRID_COLUMNS = 24
# Grafana's own variables; any other $name in a query must be a dashboard variable.
BUILTIN_VARIABLES = {"__rate_interval", "__interval", "__range", "__range_s", "__interval_ms"}
# Labels our metrics carry (and those Prometheus adds): none holds request content, so an
# annotation that names only these cannot leak patient data.
SAFE_LABELS = {"task", "modality", "code", "method", "replica", "reason", "instance", "job"}


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [tool("promtool"), *args], capture_output=True, text=True, timeout=60, check=False
    )


def provisioned(path: str) -> dict:
    return yaml.safe_load((GRAFANA / "provisioning" / path).read_text())


def test_prometheus_config_passes_promtool(tmp_path):
    """`promtool check config` also reads the credentials file and the rule files the config
    names: the token (a Docker secret in production) becomes a temporary file, and the rules
    sit next to the config as they do in /etc/prometheus."""
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]  # relative: /etc/prometheus/alerts.yml
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "multimed")
    assert job["static_configs"][0]["targets"] == ["ray-head:8002"]
    assert job["metrics_path"] == "/metrics"
    assert job["authorization"] == {
        "type": "Bearer",
        "credentials_file": "/run/secrets/metrics_token",
    }
    assert any(j["job_name"] == "prometheus" for j in config["scrape_configs"])

    token = tmp_path / "metrics_token"
    token.write_text("a-token\n")
    job["authorization"]["credentials_file"] = str(token)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copy(PROMETHEUS / "alerts.yml", tmp_path / "alerts.yml")
    checked = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 5 rules found" in checked.stdout  # it loaded alerts.yml


def test_alert_rules_pass_promtool():
    checked = promtool("check", "rules", str(PROMETHEUS / "alerts.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_alerts_fire_on_failures_and_stay_quiet_when_healthy():
    """alerts_test.yml: each alert fires on a synthetic failure, none on a healthy system."""
    tested = promtool("test", "rules", str(PROMETHEUS / "alerts_test.yml"))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    cases = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    fired = {
        case["alertname"]
        for group in cases
        for case in group["alert_rule_test"]
        if case.get("exp_alerts")
    }
    assert fired == {rule["alert"] for rule in alert_rules()}


def test_alerts_have_a_severity_and_name_only_safe_labels():
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert set(rule["annotations"]) >= {"summary", "description"}, rule["alert"]
        for text in rule["annotations"].values():
            named = set(re.findall(r"\$labels\.(\w+)", text))
            assert named <= SAFE_LABELS, (rule["alert"], named - SAFE_LABELS)
            assert not re.search(r"\$labels\s*}}", text), rule["alert"]  # all labels at once


def test_status_codes_in_queries_are_real_statuses():
    """A code the rules or panels match must be one the data plane can record (a misspelt
    name would silently match nothing)."""
    queries = [rule["expr"] for rule in alert_rules()]
    queries += list(dashboard_queries(dashboard()).values())
    named = set()
    for expr in queries:
        for values in re.findall(r'\bcode\s*[!=]~?\s*"([^"]*)"', expr):
            named |= set(values.split("|"))
    assert named, "no code matcher found"
    assert named <= {s.name for s in Status}, named - {s.name for s in Status}


def test_dashboard_is_well_formed():
    board = dashboard()
    assert board["uid"] == "multimed-serve"
    assert board["title"] == "MultiMed Serve"
    assert board["refresh"] == "10s"
    assert board["schemaVersion"] >= 36
    uid = provisioned("datasources/prometheus.yml")["datasources"][0]["uid"]
    everything = panels(board)
    ids = [p["id"] for p in everything]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    taken: set[tuple[int, int]] = set()
    for panel in everything:
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("h", "w", "x", "y")), panel["title"]
        assert grid["x"] + grid["w"] <= GRID_COLUMNS, panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells
        if panel["type"] == "row":  # a heading: no queries
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"]["uid"] == uid, panel["title"]
    for variable in board["templating"]["list"]:
        assert variable["datasource"]["uid"] == uid, variable["name"]


def test_dashboard_variables_resolve():
    board = dashboard()
    defined = {v["name"] for v in board["templating"]["list"]}
    assert {"task", "modality"} <= defined
    for where, expr in dashboard_queries(board).items():
        used = set(re.findall(r"\$\{?(\w+)", expr))
        assert used <= defined | BUILTIN_VARIABLES, (where, used - defined - BUILTIN_VARIABLES)


def test_provisioning_matches_the_dashboard():
    (source,) = provisioned("datasources/prometheus.yml")["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"  # the compose service's name and port
    (provider,) = provisioned("dashboards/multimed.yml")["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    assert DASHBOARD.parent == GRAFANA / "dashboards"  # the folder mounted at that path


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            'histogram_quantile(0.99, sum by (task, le) (rate(a_bucket{code!~"OK|b"}[5m])))',
            {"a_bucket"},
        ),
        (
            "sum(rate(a_total[$__rate_interval])) / on (x) group_left b > 1e3 or c",
            {"a_total", "b", "c"},
        ),
        ('label_values(a_total{job="x"}, task)', {"a_total"}),
    ],
)
def test_metric_names_reads_promql(expr, names):
    assert metric_names(expr) == names


def test_queried_metrics_are_declared_and_declared_metrics_are_shown():
    """Every metric a panel, variable or alert queries is one metrics.py declares (a typo, or a
    metric renamed in the code, would draw an empty panel and never alert); every metric it
    declares is on the dashboard or in an alert."""
    exposed = exposed_names(REGISTRY.collect())
    queried = queried_metrics()
    unknown = {name: sorted(where) for name, where in queried.items() if name not in exposed}
    assert set(unknown) <= SYNTHETIC, unknown
    unshown = set(exposed.values()) - {exposed[n] for n in queried if n in exposed}
    assert not unshown, f"declared in metrics.py but on no panel or alert: {unshown}"
