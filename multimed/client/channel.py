"""How a client reaches the server: address, TLS (a CA for the server's certificate; a client
certificate and key for mTLS) and the bearer token. One place for sync and asyncio channels."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import grpc

DEFAULT_URL = "127.0.0.1:8001"
# The default retry policy: gRPC itself sends a call again when the server answered UNAVAILABLE
# (a replica died under it, the server is draining, an encoder has no live replica yet), with
# exponential backoff, within the call's own deadline. Only idempotent methods: a Predict is a
# pure function of its inputs, so running it twice is harmless; PredictStream is not retried.
RETRIED_METHODS = (
    ("multimed.v1.MultiMed", "Predict"),
    ("multimed.v1.MultiMed", "Embed"),
    ("multimed.v1.MultiMed", "GetCatalog"),
    ("multimed.v1.MultiMed", "GetModelInfo"),
    ("inference.GRPCInferenceService", "ModelInfer"),
)
RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.2s",
    "maxBackoff": "5s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}


@dataclass(frozen=True)
class ChannelSettings:
    url: str = DEFAULT_URL
    token: str | None = None
    tls: bool = False  # TLS with the system's root certificates; implied by any tls_* file
    tls_ca: str | Path | None = None  # PEM: the CA that signed the server's certificate
    tls_cert: str | Path | None = None  # PEM: this client's certificate (mTLS)
    tls_key: str | Path | None = None  # PEM: its private key
    max_message_mb: float = 64
    retries: bool = True  # the default retry policy above; False: every failure surfaces

    def __post_init__(self):
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("a client certificate needs its key (tls_cert with tls_key)")

    @property
    def secure(self) -> bool:
        return self.tls or any(p is not None for p in (self.tls_ca, self.tls_cert, self.tls_key))

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path):
            return None if path is None else Path(path).read_bytes()

        return grpc.ssl_channel_credentials(
            read(self.tls_ca), read(self.tls_key), read(self.tls_cert)
        )

    def options(self) -> list[tuple[str, int | str]]:
        limit = int(self.max_message_mb * 1024 * 1024)
        options: list[tuple[str, int | str]] = [
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
            ("grpc.enable_retries", int(self.retries)),
        ]
        if self.retries:
            config = {
                "methodConfig": [
                    {
                        "name": [{"service": s, "method": m} for s, m in RETRIED_METHODS],
                        "retryPolicy": RETRY_POLICY,
                    }
                ]
            }
            options.append(("grpc.service_config", json.dumps(config)))
        return options

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel(self) -> grpc.Channel:
        if self.secure:
            return grpc.secure_channel(self.url, self.credentials(), options=self.options())
        return grpc.insecure_channel(self.url, options=self.options())

    def aio_channel(self, own_connection: bool = False) -> grpc.aio.Channel:
        """`own_connection`: a TCP connection of this channel's own (gRPC otherwise shares one
        among a process's channels to the same address and options)."""
        options = self.options() + (
            [("grpc.use_local_subchannel_pool", 1)] if own_connection else []
        )
        if self.secure:
            return grpc.aio.secure_channel(self.url, self.credentials(), options=options)
        return grpc.aio.insecure_channel(self.url, options=options)
