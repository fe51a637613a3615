"""The one encoder deployment class, bound once per modality: decode and validate each input on
arrival (a bad item fails alone), then batch the model-ready tensors and run the encoder, its
forward pass in a worker thread so that the replica keeps receiving and decoding meanwhile."""

from __future__ import annotations

import asyncio
import logging
import time

import torch
from ray import serve

from multimed.models.bundle import load_bundle
from multimed.models.inputs import RawInput
from multimed.models.modalities.base import Batch
from multimed.models.modalities.registry import build_pipeline
from multimed.services.autoscaling import INPUTS_IN_FLIGHT
from multimed.services.coalesce import Coalescer
from multimed.services.config import BatchConfig, EncoderBackend
from multimed.services.encoding import EncoderCore
from multimed.services.errors import Expired, ModelFault
from multimed.services.memory import MemoryLimited
from multimed.services.offload import decoding_is_light, off_loop_if
from multimed.services.remote import TritonEncoder
from multimed.services.types import Embedding

log = logging.getLogger("multimed.encoder")

GPU_SAMPLE_S = 1.0  # NVML is asked at most this often, not on every batch


class GpuUtilization:
    """The replica's GPU utilisation (0-1) as NVML reports it, read at most every GPU_SAMPLE_S;
    None on CPU or where NVML cannot be read (torch asks it through pynvml)."""

    def __init__(self, device: torch.device):
        self.device = device if device.type == "cuda" else None
        self.value: float | None = None
        self.at = float("-inf")

    def sample(self) -> float | None:
        if self.device is None or time.monotonic() - self.at < GPU_SAMPLE_S:
            return self.value
        self.at = time.monotonic()
        try:
            self.value = torch.cuda.utilization(self.device) / 100
        except Exception as e:  # no pynvml, or a driver without NVML: the metric stays absent
            log.warning("GPU utilisation unreadable (%s); not reported", type(e).__name__)
            self.device = None
        return self.value


def pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


class Encoder(MemoryLimited):
    async def __init__(
        self,
        modality: str,
        bundle: str,
        device: str = "auto",
        backend: dict | None = None,
        memory_limit_mb: float | None = None,
    ):
        self.memory_limit_mb = memory_limit_mb
        loaded = load_bundle(bundle)
        self.modality = modality
        self.bundle_version = loaded.version
        self.pipeline = build_pipeline(modality, loaded.config)
        self.core = EncoderCore(modality, self.pipeline)
        settings = EncoderBackend.model_validate(backend or {})
        if settings.backend == "triton":
            self.pipeline.setup("cpu")  # the frozen features stage; the weights live remotely
            self.remote = TritonEncoder(self.pipeline, settings)
            await self.remote.check()
            where = f"{settings.url} ({self.remote.model})"
        else:
            self.pipeline.setup(pick_device(device), loaded.encoder_state(modality))
            self.remote = None
            where = str(self.pipeline.device)
        self.gpu = GpuUtilization(self.pipeline.device)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.reconfigure(BatchConfig().model_dump())
        log.info("encoder %s ready on %s (bundle %s)", modality, where, self.bundle_version)

    def reconfigure(self, user_config: dict) -> None:
        """A live change starts a new batcher; batches already in the old one finish there."""
        config = BatchConfig.model_validate(user_config)
        torch.set_num_threads(config.torch_threads)
        self.pipeline.precision = config.precision
        self.batcher = Coalescer(self._run_batch, config.max_batch_size, config.batches_in_flight)

    async def encode_many(
        self, raws: list[RawInput], deadlines: list[float | None] | None = None
    ) -> list[Embedding | Exception]:
        """Decode and validate each input alone (a bad input answers with its error), in a
        worker thread unless the inputs are small arrays or strings, so this replica's event
        loop keeps batching while a large series decodes; drop inputs whose caller's deadline
        has passed; run the rest through the batcher, which also merges concurrent callers."""
        with self.core.holding(len(raws)):
            return await self._encode(raws, deadlines)

    async def _encode(
        self, raws: list[RawInput], deadlines: list[float | None] | None
    ) -> list[Embedding | Exception]:
        prepared: list[Batch | Exception] = await off_loop_if(
            not decoding_is_light(raws), self.core.prepare, raws
        )
        now = time.time()
        for i, deadline in enumerate(deadlines or ()):
            if deadline is not None and deadline <= now and not isinstance(prepared[i], Exception):
                prepared[i] = Expired("the deadline passed before the encoder ran")
        valid = [p for p in prepared if not isinstance(p, Exception)]
        encoded = iter(await asyncio.gather(*(self.batcher.submit(p) for p in valid)))
        return [p if isinstance(p, Exception) else next(encoded) for p in prepared]

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve samples this for the autoscaling policy (services/autoscaling.py): the inputs
        in this replica (decoding, waiting for a batch or in one), as the queue-depth metric."""
        return {INPUTS_IN_FLIGHT: self.core.waiting}

    async def _run_batch(self, items: list[Batch]) -> list[Embedding | ModelFault]:
        depth = self.core.waiting
        gpu = self.gpu.sample()
        forward = None if self.remote is None else self.remote.forward
        return [
            result
            if isinstance(result, ModelFault)
            else Embedding(*result, len(items), depth, self.replica, gpu)
            for result in await self.core.encode(items, forward)
        ]
