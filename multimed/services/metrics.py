"""Prometheus metrics, all recorded in the gateway process (replicas report what they saw back
with each result) and served on one port at /metrics."""

from __future__ import annotations

import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

REGISTRY = CollectorRegistry()

REQUESTS = Counter(
    "multimed_requests",
    "Requests by method, task and gRPC status code",
    ["method", "task", "code"],
    registry=REGISTRY,
)
LATENCY = Histogram(
    "multimed_request_latency_seconds",
    "Server-side latency by method and task",
    ["method", "task"],
    registry=REGISTRY,
    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10),
)
IN_FLIGHT = Gauge(
    "multimed_requests_in_flight",
    "Requests being served by the gateway",
    ["method"],
    registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "multimed_encoder_batch_size",
    "Encoder batch size each input ran in",
    ["modality"],
    registry=REGISTRY,
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
ENCODER_QUEUE = Gauge(
    "multimed_encoder_queue_depth",
    "Inputs waiting at the encoder when a batch last ran",
    ["modality"],
    registry=REGISTRY,
)
ENCODED = Counter(
    "multimed_encoder_items",
    "Inputs encoded, by modality and encoder replica",
    ["modality", "replica"],
    registry=REGISTRY,
)
DROPPED = Counter(
    "multimed_dropped_items",
    "Inputs dropped before their encoder ran them: their caller's deadline passed, or the "
    "caller cancelled",
    ["modality", "reason"],
    registry=REGISTRY,
)
ENCODER_LIVE = Gauge(
    "multimed_encoder_live",
    "1 while the encoder has a live replica (tasks that need it are NOT_SERVING otherwise)",
    ["modality"],
    registry=REGISTRY,
)
ENCODER_REPLICAS = Gauge(
    "multimed_encoder_replicas",
    "Encoder replicas RUNNING, by the Serve controller's account (autoscaling moves it)",
    ["modality"],
    registry=REGISTRY,
)
GPU_UTILIZATION = Gauge(
    "multimed_encoder_gpu_utilization_ratio",
    "GPU utilisation (0-1) the encoder replica's device reported at its last batch (CUDA only)",
    ["modality", "replica"],
    registry=REGISTRY,
)
CACHE_BYTES = Gauge(
    "multimed_embedding_cache_bytes",
    "Bytes held by the router's embedding cache",
    registry=REGISTRY,
)
CACHE = Counter(
    "multimed_embedding_cache",
    "Router embedding cache lookups",
    ["modality", "result"],
    registry=REGISTRY,
)


def serve_metrics(host: str, port: int, allowed: Callable[[str], bool] | None = None):
    """Start the /metrics endpoint in a thread; with `allowed`, a scrape must send an
    `Authorization` header it accepts (401 otherwise). Returns the server (shutdown() stops
    it)."""
    exposition = make_wsgi_app(REGISTRY)

    def app(environ, start_response):
        if allowed is not None and not allowed(environ.get("HTTP_AUTHORIZATION", "")):
            start_response("401 Unauthorized", [("WWW-Authenticate", "Bearer")])
            return [b"missing or wrong bearer token\n"]
        return exposition(environ, start_response)

    server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


class _Quiet(WSGIRequestHandler):
    def log_message(self, format, *args):  # scrapes every few seconds: not worth a log line
        pass
