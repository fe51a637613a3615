"""The one encoder deployment class, bound once per modality: decode and validate each input on
arrival (a bad item fails alone), then batch the model-ready tensors and run the encoder."""

from __future__ import annotations

import asyncio
import logging

import torch
from ray import serve

from multimed.models.bundle import load_bundle
from multimed.models.errors import InputError
from multimed.models.inputs import RawInput
from multimed.models.modalities.base import Batch
from multimed.models.modalities.registry import build_pipeline
from multimed.services.config import BatchConfig, EncoderBackend
from multimed.services.remote import TritonEncoder
from multimed.services.types import Embedding

log = logging.getLogger("multimed.encoder")


def pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


class Encoder:
    async def __init__(
        self, modality: str, bundle: str, device: str = "auto", backend: dict | None = None
    ):
        loaded = load_bundle(bundle)
        self.modality = modality
        self.bundle_version = loaded.version
        self.pipeline = build_pipeline(modality, loaded.config)
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
        self.waiting = 0
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.reconfigure(BatchConfig().model_dump())
        log.info("encoder %s ready on %s (bundle %s)", modality, where, self.bundle_version)

    def reconfigure(self, user_config: dict) -> None:
        config = BatchConfig.model_validate(user_config)
        torch.set_num_threads(config.torch_threads)
        self.run_batch.set_max_batch_size(config.max_batch_size)
        self.run_batch.set_batch_wait_timeout_s(config.batch_wait_ms / 1000)

    async def encode_many(self, raws: list[RawInput]) -> list[Embedding | InputError]:
        """Decode and validate each input alone (a bad one answers with its error), then run the
        valid ones through the dynamic batcher, which also merges concurrent callers."""
        prepared: list[Batch | InputError] = []
        for raw in raws:
            try:
                if raw.modality != self.modality:
                    raise InputError(raw.modality, f"sent to the {self.modality} encoder")
                prepared.append(self.pipeline.prepare(raw))
            except InputError as error:
                prepared.append(error)
            except Exception as error:  # a decoder library choked: still this input's fault
                log.warning("%s input failed to decode: %s", self.modality, type(error).__name__)
                prepared.append(
                    InputError(self.modality, f"could not be decoded ({type(error).__name__})")
                )
        valid = [p for p in prepared if not isinstance(p, InputError)]
        self.waiting += len(valid)
        try:
            encoded = iter(await asyncio.gather(*(self.run_batch(p) for p in valid)))
        finally:
            self.waiting -= len(valid)
        return [p if isinstance(p, InputError) else next(encoded) for p in prepared]

    # Replaced at start by reconfigure() from BatchConfig (the serve config's user_config).
    @serve.batch(
        max_batch_size=BatchConfig().max_batch_size,
        batch_wait_timeout_s=BatchConfig().batch_wait_ms / 1000,
    )
    async def run_batch(self, items: list[Batch]) -> list[Embedding]:
        depth = self.waiting
        # Raw and model-ready items differ in their keys (text: token ids vs features): each
        # kind is collated and run apart.
        kinds: dict[tuple[str, ...], list[int]] = {}
        for i, item in enumerate(items):
            kinds.setdefault(tuple(sorted(item)), []).append(i)
        results: list[Embedding] = [None] * len(items)  # type: ignore[list-item]
        for members in kinds.values():
            batch = self.pipeline.collate([items[i] for i in members])
            if self.remote is None:
                out = self.pipeline.forward(batch)
            else:
                out = await self.remote.forward(batch)
            for i, item in zip(members, self.pipeline.unbatch(out), strict=True):
                tokens = None if item.tokens is None else item.tokens[0].float().cpu().numpy()
                pooled = item.pooled[0].float().cpu().numpy()
                results[i] = Embedding(pooled, tokens, len(items), depth, self.replica)
        return results
