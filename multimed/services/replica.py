"""The router replica (a Ray Serve deployment): hosts the router, the data plane, the gRPC
listener with every front door, and /metrics, in one process (measured: each Ray hop costs
milliseconds of CPU on a small machine). Several replicas on one node share the port."""

from __future__ import annotations

import asyncio
import logging

import torch
from ray import serve
from ray.serve.context import _get_global_client

from multimed.models.bundle import load_bundle
from multimed.models.modalities.registry import build_pipeline, build_pipelines
from multimed.models.tasks import TaskModels
from multimed.services import metrics
from multimed.services.audit import AuditLog
from multimed.services.config import (
    BatchConfig,
    GatewaySettings,
    HospitalSettings,
    encoder_deployment,
)
from multimed.services.dataplane import DataPlane
from multimed.services.encoder import pick_device
from multimed.services.encoding import EncoderCore, LocalEncoder
from multimed.services.frontends.auth import Tokens
from multimed.services.frontends.grpc_common import Door, Readiness
from multimed.services.frontends.grpc_server import start_listener
from multimed.services.memory import MemoryLimited
from multimed.services.metrics import serve_metrics
from multimed.services.router import Router
from multimed.services.triton import encoder_signature

log = logging.getLogger("multimed.replica")
WATCH_S = 1.0  # how often encoder liveness is read from the Serve controller
ASK_S = 2.0  # for the controller's answer; for an encoder's, while the controller is away
DRAIN_S = 5.0  # grace for calls in flight at shutdown
RUNNING = "RUNNING"  # Serve's ReplicaState is a str enum; its class is private


class RouterReplica(MemoryLimited):
    async def __init__(
        self,
        encoders: dict,
        bundle: str,
        cache_entries: int = 4096,
        encoder_timeout_s: float = 30.0,
        gateway: dict | None = None,
        metrics_port: int | None = None,
        cache_mb: float = 256,
        memory_limit_mb: float | None = None,
        hospital: dict | None = None,
        in_router: dict[str, dict] | None = None,
        device: str = "auto",
        encoder_transport: str = "grpc",
    ):
        torch.set_num_threads(1)
        self.memory_limit_mb = memory_limit_mb
        loaded = load_bundle(bundle)
        tasks = TaskModels(loaded.config)
        tasks.load_state_dict(loaded.tasks_state())
        # Encoders placed in this replica (args.in_router): the deployments' own decoding and
        # batching code, called in-process. Always live while this replica is.
        self.local = {
            m: local_encoder(m, loaded, BatchConfig.model_validate(c), device)
            for m, c in (in_router or {}).items()
        }
        if encoder_transport == "grpc":  # Serve's direct transport: gRPC to each replica
            encoders = {m: h.options(_by_reference=False) for m, h in encoders.items()}
        self.router = Router(
            {**encoders, **self.local},
            tasks,
            loaded.version,
            cache_entries,
            encoder_timeout_s,
            cache_mb,
        )
        settings = GatewaySettings.model_validate(gateway or {})
        self.audit = AuditLog(settings.audit_log)
        plane = DataPlane(self.router, settings, loaded.manifest, self.audit)
        # Pipelines are cheap to build (no weights): only their model-ready tensor specs.
        signatures = {
            m: encoder_signature(m, p.model_input(), loaded.config.embed_dim)
            for m, p in build_pipelines(loaded.config).items()
        }
        # With tokens on, /metrics asks for one too (the same file, or MULTIMED_TOKEN).
        tokens = Tokens(settings.token_file)
        door = Door(plane, signatures, HospitalSettings.model_validate(hospital or {}))
        self.listener = await start_listener(door, tokens)
        if metrics_port is not None:
            try:
                allowed = (
                    (lambda sent: tokens.name_of(sent) is not None) if tokens.enabled else None
                )
                serve_metrics(settings.host, metrics_port, allowed)
            except OSError:  # another router replica on this node already serves /metrics
                log.warning(
                    "metrics port %d busy; this replica's metrics are not exported", metrics_port
                )
        self._watch: asyncio.Future | None = None
        self._until_serving = asyncio.ensure_future(self._serving_when_encoders_answer())

    async def _serving_when_encoders_answer(self) -> None:
        """Health turns SERVING once every encoder has answered an (empty) call; from then on
        the watch keeps each task's health true to its encoders' replicas."""
        await self.router.encoders_answer()
        live = frozenset(self.router.encoders)
        await self.listener.set_readiness(Readiness(True, live))
        log.info("serving (bundle %s)", self.router.bundle_version)
        self._watch = asyncio.ensure_future(self._watch_encoders())

    async def _watch_encoders(self) -> None:
        """Every WATCH_S: which encoders have a RUNNING replica, by the Serve controller's
        account (it notices a dead replica within its health-check period)."""
        app = serve.get_replica_context().replica_id.deployment_id.app_name
        while True:
            await asyncio.sleep(WATCH_S)
            try:
                running = await asyncio.wait_for(_running_replicas(app), ASK_S)
            except Exception:  # the controller down with the head node, or restarting
                log.warning("Serve controller did not answer; asking each encoder")
                running = await self._answering()
            for m in self.local:  # one in every router replica
                running[encoder_deployment(m)] = 1
            live = frozenset(m for m in self.router.encoders if running.get(encoder_deployment(m)))
            for m in self.router.encoders:
                metrics.ENCODER_LIVE.labels(m).set(m in live)
                metrics.ENCODER_REPLICAS.labels(m).set(running.get(encoder_deployment(m), 0))
            if live != self.listener.readiness.live:
                log.warning(
                    "encoders without a live replica: %s",
                    sorted(set(self.router.encoders) - live) or "none",
                )
            self.router.replicas = {
                m: running.get(encoder_deployment(m), 0) for m in self.router.encoders
            }
            await self.listener.set_readiness(Readiness(True, live))

    async def _answering(self) -> dict[str, int]:
        """Deployment -> replicas, while the controller cannot say: an encoder that answers an
        empty call within ASK_S keeps its last count, one that does not counts 0. Without it,
        an encoder whose one replica died with the head node stayed SERVING until the new
        head's controller said otherwise (~30 s), and its calls queued to their deadline."""

        async def answers(modality: str, handle) -> int:
            try:
                await asyncio.wait_for(handle.encode_many.remote([], []), ASK_S)
            except Exception:
                return 0
            return self.router.replicas.get(modality) or 1

        remote = {m: h for m, h in self.router.encoders.items() if m not in self.local}
        counts = await asyncio.gather(*(answers(m, h) for m, h in remote.items()))
        return {encoder_deployment(m): n for m, n in zip(remote, counts, strict=True)}

    def serving(self) -> bool:
        """Whether this replica's listener reports SERVING (`multimed serve` waits on it); a
        failed start raises here, so the caller sees why instead of waiting on."""
        return self._until_serving.done() and self._until_serving.result() is None

    async def drain(self, grace_s: float = DRAIN_S) -> None:
        """Health goes NOT_SERVING everywhere, new calls are refused, and calls in flight get
        `grace_s` to finish (`multimed serve` calls it on Ctrl-C / SIGTERM, before the
        encoders go)."""
        self._until_serving.cancel()
        if self._watch is not None:
            self._watch.cancel()
        await self.listener.stop(grace_s)

    async def __del__(self):
        """Replica shutdown (Ray Serve calls it): drained, unless that was done already."""
        await self.drain()
        self.audit.close()


def local_encoder(modality: str, loaded, batch: BatchConfig, device: str) -> LocalEncoder:
    pipeline = build_pipeline(modality, loaded.config)
    pipeline.setup(pick_device(device), loaded.encoder_state(modality))
    pipeline.precision = batch.precision
    return LocalEncoder(EncoderCore(modality, pipeline), batch.max_batch_size)


async def _running_replicas(app: str) -> dict[str, int]:
    """Deployment -> replicas RUNNING, from the controller's plain details. serve.status()
    builds the same from them through pydantic models that pickle every deployment's request
    router: ~100 ms of CPU per read (measured with py-spy), taken from this process's gateway.
    Awaited (Serve's client would block a thread in ray.get, with no timeout)."""
    controller = _get_global_client()._controller
    details = await controller.get_serve_instance_details.remote()
    deployments = details["applications"][app]["deployments"]
    return {
        name: sum(r["state"] == RUNNING for r in d.get("replicas", ()))
        for name, d in deployments.items()
    }
