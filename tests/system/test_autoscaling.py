"""Encoder autoscaling end to end: a server of its own whose X-ray encoder (the bottleneck here:
it reads 384x384) autoscales from one replica on the inputs in flight, loaded by `multimed
loadtest` run as an operator runs it. The replica count is read where an operator reads it
(the gateway's /metrics); the figures are printed (-s shows them) for bench/RESULTS.md."""

from __future__ import annotations

import json
import subprocess

import pytest
from scaling import (
    MAX_REPLICAS,
    ReplicaLog,
    autoscaling_config,
    loadtest_command,
    until_replicas,
    xray_bound_bundle,
    xray_replicas,
    xray_replicas_that_encoded,
)
from servers import Server, running_server

CONCURRENCY = 64  # callers: 8 times the inputs in flight a replica is meant to hold
LOAD_S = 40
DOWN_S = 60  # after the load: Serve's downscale delay (15 s here) and a replica's shutdown


@pytest.fixture(scope="module")
def autoscaled(bundle, cohort, tmp_path_factory) -> Server:
    work = tmp_path_factory.mktemp("autoscaling")
    heavy = xray_bound_bundle(bundle, work / "bundle")
    config = autoscaling_config(work / "serve_config.yaml", heavy)
    with running_server(work, config) as (url, metrics_url, process):
        yield Server(url, metrics_url, heavy, cohort, process, log=work / "serve.log")


def test_xray_encoder_scales_out_under_load_and_back_in_after(autoscaled: Server):
    assert until_replicas(autoscaled, 1, 10) is not None
    tokens = autoscaled.log.parent / "tokens"  # the file running_server gave the server
    with ReplicaLog(autoscaled) as log:
        done = subprocess.run(
            loadtest_command(autoscaled, tokens, CONCURRENCY, LOAD_S),
            capture_output=True,
            text=True,
            timeout=LOAD_S + 180,  # its inputs are synthesised first
        )
        assert done.returncode == 0, done.stderr[-3000:]
        during = log.peak()
        encoded_on = xray_replicas_that_encoded(autoscaled)
        back_in = until_replicas(autoscaled, 1, DOWN_S)
    report = json.loads(done.stdout)["overall"]
    reached = next((f"{t:.0f} s" for t, n in log.samples if n >= 3), "never")
    print(
        f"X-ray encoder under {CONCURRENCY} callers for {LOAD_S} s: {report['ok']} OK, errors "
        f"{report['errors_by_code'] or 'none'}, {report['throughput_rps']:.0f}/s, p50 "
        f"{report['p50_ms']:.0f} ms, p99 {report['p99_ms']:.0f} ms; replicas 1 -> {during} "
        f"(3 reached {reached} after the loadtest started), {encoded_on} of them encoded; "
        f"back to 1 {back_in and round(back_in)} s after the load stopped"
    )
    assert report["errors_by_code"] == {} and report["ok"] == report["requests"] > 0
    assert 3 <= during <= MAX_REPLICAS
    assert encoded_on >= 3, "the router splits an encoder's inputs across its replicas"
    assert back_in is not None, f"still {xray_replicas(autoscaled)} replicas {DOWN_S} s after"
