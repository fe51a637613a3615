"""The dashboard and the alert rules against the real gateway: after a few real calls its
/metrics exposes every metric they query, and a real Prometheus, run with deploy/prometheus's
config (bearer token included) pointed at the session's server, scrapes it, evaluates every
rule without error and answers every panel's query with series."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import grpc
import pytest
import yaml
from observability import (
    PROMETHEUS,
    SYNTHETIC,
    alert_rules,
    dashboard,
    dashboard_queries,
    exposed_names,
    queried_metrics,
    tool,
)
from prometheus_client.parser import text_string_to_metric_families
from servers import free_port, scrape

from multimed.models.catalog import CATALOG
from multimed.models.cohort.writer import FILES

# Queried metrics whose samples need an event the traffic below does not cause.
ONLY_DECLARED = {
    "multimed_dropped_items_total": "only once a caller's deadline passes or it cancels",
    "multimed_encoder_gpu_utilization_ratio": "only when an encoder runs on CUDA",
}
SETTLE_S = 30  # the router's encoder watch ticks every second; Prometheus starts in ~2 s
# What Grafana substitutes at query time (every value of a variable selected: All).
SUBSTITUTES = {"$__rate_interval": "30s", "$task": ".+", "$modality": ".+"}


def families(text: str) -> tuple[dict[str, str], set[str]]:
    """-> (sample name -> family, for every declared family; names that have samples)."""
    parsed = list(text_string_to_metric_families(text))
    return exposed_names(parsed), {s.name for f in parsed for s in f.samples}


@pytest.fixture(scope="module")
def exposition(server) -> str:
    """/metrics after one X-ray twice (a cache miss, then a hit), a multimodal call and a
    call the server refuses, once the encoder watch has reported every encoder."""
    folder = server.patients[0]
    with server.client() as client:
        client.predict("bone_age_classification", {"xray": folder / FILES["xray"]})
        client.predict("radiographic_findings_classification", {"xray": folder / FILES["xray"]})
        imaging = {m: folder / FILES[m] for m in ("xray", "ct", "mri")}
        client.predict("disease_classification", imaging)
        with pytest.raises(grpc.RpcError) as refused:
            client.predict("nope", {"xray": folder / FILES["xray"]})
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    needed = set(queried_metrics()) - SYNTHETIC - set(ONLY_DECLARED)
    deadline = time.monotonic() + SETTLE_S
    while True:
        text = scrape(server)
        if needed <= families(text)[1] or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


def test_gateway_exposes_every_metric_the_dashboard_and_alerts_query(exposition):
    declared, sampled = families(exposition)
    queried = set(queried_metrics()) - SYNTHETIC
    assert queried - set(declared) == set(), "queried but not declared by the gateway"
    missing = queried - set(ONLY_DECLARED) - sampled
    assert not missing, f"declared but no samples after traffic: {missing}"


def test_variables_and_replica_counts_match_the_served_app(exposition):
    """The $modality variable lists every encoder, and the replicas panel shows the
    session server's X-ray scale (2 replicas; tests/servers.py)."""
    encoders, xray_replicas = set(), None
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == "multimed_encoder_live":
                encoders.add(sample.labels["modality"])
            if sample.name == "multimed_encoder_replicas" and sample.labels["modality"] == "xray":
                xray_replicas = sample.value
    assert encoders == set(CATALOG.modalities)
    assert xray_replicas == 2


class Prometheus:
    def __init__(self, url: str):
        self.url = url

    def get(self, path: str, **params) -> dict | list:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.get("/api/v1/query", query=expr)["result"]

    def rules(self) -> list[dict]:
        return [r for g in self.get("/api/v1/rules")["groups"] for r in g["rules"]]


@pytest.fixture(scope="module")
def prometheus(server, exposition, tmp_path_factory):
    """Prometheus with deploy/prometheus/prometheus.yml, its multimed job aimed at the session
    server every second with the server's token, until a few scrapes and rule runs are in."""
    binary = tool("prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "multimed")
    token = work / "metrics_token"
    token.write_text(server.token + "\n")
    job["authorization"]["credentials_file"] = str(token)
    job["static_configs"] = [{"targets": [urllib.parse.urlsplit(server.metrics_url).netloc]}]
    job["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    config["scrape_configs"] = [job]
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copy(PROMETHEUS / "alerts.yml", work / "alerts.yml")
    port = free_port()
    log = work / "prometheus.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={work / 'prometheus.yml'}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    client = Prometheus(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + SETTLE_S
        while not _settled(client):
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        yield client
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _settled(client: Prometheus) -> bool:
    """At least three scrapes of the gateway stored, and every rule evaluated."""
    try:
        scrapes = client.query('count_over_time(up{job="multimed"}[1m])')
        rules = client.rules()
    except OSError:  # not listening yet
        return False
    evaluated = all(r["health"] != "unknown" for r in rules)
    return bool(scrapes) and float(scrapes[0]["value"][1]) >= 3 and evaluated


def test_prometheus_scrapes_the_gateway_with_its_token(prometheus):
    (up,) = prometheus.query('up{job="multimed"}')
    assert up["value"][1] == "1"


def test_every_rule_evaluates_and_none_fires_on_a_healthy_server(prometheus):
    rules = prometheus.rules()
    assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}
    for rule in rules:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
    assert prometheus.get("/api/v1/alerts")["alerts"] == []


def test_every_panel_and_variable_query_returns_series(prometheus):
    for where, expr in dashboard_queries(dashboard()).items():
        if where.startswith("$"):  # label_values(metric, label): what the dropdown lists
            metric, label = expr.removeprefix("label_values(").rstrip(")").split(", ")
            values = prometheus.get(f"/api/v1/label/{label}/values", **{"match[]": metric})
            assert values, where
            continue
        for variable, value in SUBSTITUTES.items():
            expr = expr.replace(variable, value)
        result = prometheus.query(expr)
        if not any(name in expr for name in ONLY_DECLARED):
            assert result, f"{where}: no series for {expr}"
