"""The router replica (a Ray Serve deployment): hosts the router, the data plane, the gRPC
listener with every front door, and /metrics, in one process (measured: each Ray hop costs
milliseconds of CPU on a small machine). Several replicas on one node share the port."""

from __future__ import annotations

import asyncio
import logging

import torch

from multimed.models.bundle import load_bundle
from multimed.models.modalities.registry import build_pipelines
from multimed.models.tasks import TaskModels
from multimed.services.audit import AuditLog
from multimed.services.config import GatewaySettings
from multimed.services.dataplane import DataPlane
from multimed.services.frontends.grpc_common import Door
from multimed.services.frontends.grpc_server import start_listener
from multimed.services.metrics import serve_metrics
from multimed.services.router import Router
from multimed.services.triton import encoder_signature

log = logging.getLogger("multimed.replica")


class RouterReplica:
    async def __init__(
        self,
        encoders: dict,
        bundle: str,
        cache_entries: int = 4096,
        encoder_timeout_s: float = 30.0,
        gateway: dict | None = None,
        metrics_port: int | None = None,
    ):
        torch.set_num_threads(1)
        loaded = load_bundle(bundle)
        tasks = TaskModels(loaded.config)
        tasks.load_state_dict(loaded.tasks_state())
        self.router = Router(encoders, tasks, loaded.version, cache_entries, encoder_timeout_s)
        settings = GatewaySettings.model_validate(gateway or {})
        self.audit = AuditLog(settings.audit_log)
        plane = DataPlane(self.router, settings, loaded.manifest, self.audit)
        # Pipelines are cheap to build (no weights): only their model-ready tensor specs.
        signatures = {
            m: encoder_signature(m, p.model_input(), loaded.config.embed_dim)
            for m, p in build_pipelines(loaded.config).items()
        }
        self.listener = await start_listener(Door(plane, signatures))
        if metrics_port is not None:
            try:
                serve_metrics(settings.host, metrics_port)
            except OSError:  # another router replica on this node already serves /metrics
                log.warning(
                    "metrics port %d busy; this replica's metrics are not exported", metrics_port
                )
        self._until_serving = asyncio.ensure_future(self._serving_when_encoders_answer())

    async def _serving_when_encoders_answer(self) -> None:
        """Health turns SERVING once every encoder has answered an (empty) call."""
        await self.router.encoders_answer()
        await self.listener.set_serving(True)
        log.info("serving (bundle %s)", self.router.bundle_version)

    def serving(self) -> bool:
        """Whether this replica's listener reports SERVING (`multimed serve` waits on it); a
        failed start raises here, so the caller sees why instead of waiting on."""
        return self._until_serving.done() and self._until_serving.result() is None

    async def __del__(self):
        """Replica shutdown (Ray Serve calls it): health goes NOT_SERVING, calls in flight get a
        moment to finish, then the listener closes."""
        self._until_serving.cancel()
        await self.listener.stop(grace_s=5)
        self.audit.close()
