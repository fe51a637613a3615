"""The gRPC listener: one port for every front door, with grpc.health.v1 and reflection. It owns
transport security (TLS, or mTLS with a client CA; certificates are read again when their files
change, at the next handshake) and token auth. Front doors are registered in FRONT_DOORS."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from multimed.services.config import GatewaySettings, TLSSettings
from multimed.services.frontends.auth import TokenAuth, Tokens
from multimed.services.frontends.grpc_common import Door
from multimed.services.frontends.multimed_v1 import servicer as multimed_v1
from multimed.services.frontends.oip import servicer as oip

log = logging.getLogger("multimed.listener")

# One line per protocol: each `register(server, door)` adds its servicer and names its service.
FRONT_DOORS = (multimed_v1.register, oip.register)
# Probes answer without a token.
OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


class CertificateFiles:
    """Serves the certificate files' current contents: gRPC asks at each new handshake, and gets
    a new configuration only when a file changed (so rotated certificates need no restart)."""

    def __init__(self, tls: TLSSettings):
        self.paths = [Path(p) for p in (tls.cert, tls.key, tls.client_ca) if p]
        self.tls = tls
        self.stamp: tuple[int, ...] | None = None

    def _stamp(self) -> tuple[int, ...]:
        return tuple(p.stat().st_mtime_ns for p in self.paths)

    def load(self):
        self.stamp = self._stamp()
        tls = self.tls
        root = Path(tls.client_ca).read_bytes() if tls.client_ca else None
        pair = (Path(tls.key).read_bytes(), Path(tls.cert).read_bytes())
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=root)

    def fetch(self):
        """None keeps the current configuration."""
        try:
            if self._stamp() == self.stamp:
                return None
            config = self.load()
            log.info("TLS certificates reloaded")
            return config
        except (OSError, ValueError, RuntimeError):
            log.exception("TLS certificate files unreadable; keeping the loaded ones")
            return None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.load(), self.fetch, require_client_authentication=self.tls.client_ca is not None
        )


@dataclass
class Listener:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    door: Door

    async def set_serving(self, serving: bool) -> None:
        """Health (overall and every service) and each protocol's readiness, together."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.door.services):
            await self.health.set(name, status)
        for hook in self.door.hooks:
            hook(serving)

    async def stop(self, grace_s: float | None = None) -> None:
        await self.set_serving(False)
        await self.server.stop(grace_s)


async def start_listener(door: Door) -> Listener:
    """Serve every front door on the data plane settings' address; not serving until
    set_serving(True)."""
    settings: GatewaySettings = door.plane.settings
    limit = int(settings.max_message_mb * 1024 * 1024)
    options = [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        # Router replicas on one node share the port; the kernel spreads connections.
        ("grpc.so_reuseport", 1),
    ]
    tokens = Tokens(settings.token_file)
    auth = TokenAuth(tokens, OPEN_PREFIXES) if tokens.enabled else None
    server = grpc.aio.server(interceptors=[auth] if auth else None, options=options)
    for register in FRONT_DOORS:
        register(server, door)
    if auth is not None:  # the doors have named their probes now
        auth.open_methods = (*OPEN_PREFIXES, *door.open_methods)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*door.services, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{settings.host}:{settings.port}"
    if settings.tls is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, CertificateFiles(settings.tls).credentials())
    await server.start()
    listener = Listener(server, port, health_servicer, door)
    await listener.set_serving(False)
    return listener
