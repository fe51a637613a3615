"""The gRPC listener: one port for every front door, with grpc.health.v1 and (optionally)
reflection. It owns transport security (TLS, or mTLS with a client CA; certificates are read again
when their files change, at the next handshake), the guard (token auth, parsing, errors; see
`guard.py`) and the transport's limits: RPCs and connections at once. Front doors are registered
in FRONT_DOORS. With `gateway.front`, nginx takes the port and ends TLS (front.py); the
listener then serves a unix socket behind it.

Health names: "" and each protocol's service are SERVING while the replica serves; `task/<id>`
is SERVING while every encoder the task needs has a live replica, `encoder/<modality>` while
that encoder has one."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from multimed.models.catalog import CATALOG
from multimed.services.config import GatewaySettings, TLSSettings
from multimed.services.frontends.auth import Tokens
from multimed.services.frontends.front import Front
from multimed.services.frontends.grpc_common import NOT_READY, Door, Readiness
from multimed.services.frontends.guard import Guard
from multimed.services.frontends.hospital import servicer as hospital
from multimed.services.frontends.multimed_v1 import servicer as multimed_v1
from multimed.services.frontends.oip import servicer as oip

log = logging.getLogger("multimed.listener")

# One line per protocol: each `register(server, door)` adds its servicer and names its service.
FRONT_DOORS = (multimed_v1.register, oip.register, hospital.register)
# Probes answer without a token (reflection needs one when tokens are on).
OPEN_PREFIXES = ("/grpc.health.v1.",)


def task_health(task: str) -> str:
    return f"task/{task}"


def encoder_health(modality: str) -> str:
    return f"encoder/{modality}"


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
    front: Front | None = None
    readiness: Readiness = NOT_READY
    _sent: dict[str, int] = field(default_factory=dict)  # each health name's status as set

    async def set_readiness(self, readiness: Readiness) -> None:
        """Health (overall, every service, every task and encoder) and each protocol's
        readiness, together; only changed names are sent to watchers."""
        self.readiness = readiness
        for name, status in self._statuses(readiness).items():
            if self._sent.get(name) != status:
                await self.health.set(name, status)
                self._sent[name] = status
        for hook in self.door.hooks:
            hook(readiness)

    def _statuses(self, readiness: Readiness) -> dict[str, int]:
        def status(up: bool) -> int:
            return (
                health_pb2.HealthCheckResponse.SERVING
                if up
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )

        out = {name: status(readiness.serving) for name in ("", *self.door.services)}
        for task in CATALOG.tasks.values():
            out[task_health(task.id)] = status(readiness.task_ready(task))
        for m in CATALOG.modalities:
            out[encoder_health(m)] = status(readiness.encoder_ready(m))
        return out

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING everywhere first (load balancers stop sending), then calls in flight
        get `grace_s` to finish."""
        await self.set_readiness(NOT_READY)
        if self.front is not None:  # it finishes its calls through the listener, then exits
            await asyncio.gather(
                asyncio.to_thread(self.front.stop, grace_s), self.server.stop(grace_s)
            )
        else:
            await self.server.stop(grace_s)


async def start_listener(door: Door, tokens: Tokens) -> Listener:
    """Serve every front door on the data plane settings' address, asking for `tokens` when
    they are enabled; not serving until set_readiness says so."""
    settings: GatewaySettings = door.plane.settings
    limit = int(settings.max_message_mb * 1024 * 1024)
    options = [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.max_allowed_incoming_connections", settings.max_connections),
        # Router replicas on one node share the port; the kernel spreads connections.
        ("grpc.so_reuseport", 1),
    ]
    guard = Guard(tokens if tokens.enabled else None, OPEN_PREFIXES)
    # Past max_rpcs, grpc.aio stops taking calls (it does not refuse them): they wait in gRPC
    # core, which past 1,000 drops them as CANCELLED. Admission and the front refuse earlier.
    server = grpc.aio.server(
        interceptors=[guard], options=options, maximum_concurrent_rpcs=settings.max_rpcs
    )
    for register in FRONT_DOORS:
        register(server, door)
    guard.open_methods = (*OPEN_PREFIXES, *door.open_methods)  # the doors named their probes
    guard.prechecks = door.prechecks
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if settings.reflection:
        reflection.enable_server_reflection(
            (*door.services, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
    front = Front(settings) if settings.front is not None else None
    if front is not None:  # nginx takes the port and ends TLS; the listener serves its socket
        server.add_insecure_port(front.upstream())
        port = settings.port
    elif settings.tls is None:
        port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    else:
        credentials = CertificateFiles(settings.tls).credentials()
        port = server.add_secure_port(f"{settings.host}:{settings.port}", credentials)
    await server.start()
    if front is not None:
        try:
            front.start()
        except Exception:
            await server.stop(None)
            raise
    listener = Listener(server, port, health_servicer, door, front)
    await listener.set_readiness(NOT_READY)
    return listener
