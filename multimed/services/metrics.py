"""Prometheus metrics, all recorded in the gateway process (replicas report what they saw back
with each result) and served on one port at /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

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
CACHE = Counter(
    "multimed_embedding_cache",
    "Router embedding cache lookups",
    ["modality", "result"],
    registry=REGISTRY,
)


def serve_metrics(host: str, port: int):
    """Start the /metrics endpoint; returns the server (its shutdown() stops it)."""
    server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    return server
