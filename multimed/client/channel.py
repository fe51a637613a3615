"""How a client reaches the server: address, TLS (a CA for the server's certificate; a client
certificate and key for mTLS) and the bearer token. One place for sync and asyncio channels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

DEFAULT_URL = "127.0.0.1:8001"


@dataclass(frozen=True)
class ChannelSettings:
    url: str = DEFAULT_URL
    token: str | None = None
    tls: bool = False  # TLS with the system's root certificates; implied by any tls_* file
    tls_ca: str | Path | None = None  # PEM: the CA that signed the server's certificate
    tls_cert: str | Path | None = None  # PEM: this client's certificate (mTLS)
    tls_key: str | Path | None = None  # PEM: its private key
    max_message_mb: float = 64

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

    def options(self) -> list[tuple[str, int]]:
        limit = int(self.max_message_mb * 1024 * 1024)
        return [
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
        ]

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel(self) -> grpc.Channel:
        if self.secure:
            return grpc.secure_channel(self.url, self.credentials(), options=self.options())
        return grpc.insecure_channel(self.url, options=self.options())

    def aio_channel(self) -> grpc.aio.Channel:
        if self.secure:
            return grpc.aio.secure_channel(self.url, self.credentials(), options=self.options())
        return grpc.aio.insecure_channel(self.url, options=self.options())
