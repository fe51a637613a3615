"""The one encoder deployment class, bound once per modality: decode and validate each input on
arrival (a bad item fails alone), then batch the model-ready tensors and run the encoder."""

from __future__ import annotations

import logging

import torch
from ray import serve

from multimed.models.bundle import load_bundle
from multimed.models.modalities.base import Batch, RawInput
from multimed.models.modalities.registry import build_pipeline
from multimed.services.config import BatchConfig
from multimed.services.types import Embedding

log = logging.getLogger("multimed.encoder")


def pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


class Encoder:
    def __init__(self, modality: str, bundle: str, device: str = "auto"):
        loaded = load_bundle(bundle)
        self.modality = modality
        self.bundle_version = loaded.version
        self.pipeline = build_pipeline(modality, loaded.config)
        self.pipeline.setup(pick_device(device), loaded.encoder_state(modality))
        self.waiting = 0
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.reconfigure(BatchConfig().model_dump())
        log.info(
            "encoder %s ready on %s (bundle %s)",
            modality,
            self.pipeline.device,
            self.bundle_version,
        )

    def reconfigure(self, user_config: dict) -> None:
        config = BatchConfig.model_validate(user_config)
        torch.set_num_threads(config.torch_threads)
        self.run_batch.set_max_batch_size(config.max_batch_size)
        self.run_batch.set_batch_wait_timeout_s(config.batch_wait_ms / 1000)

    async def encode(self, raw: RawInput) -> Embedding:
        if raw.modality != self.modality:
            raise ValueError(f"encoder-{self.modality} was sent a {raw.modality} input")
        item = self.pipeline.prepare(raw)  # raises InputError for this caller only
        self.waiting += 1
        try:
            return await self.run_batch(item)
        finally:
            self.waiting -= 1

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def run_batch(self, items: list[Batch]) -> list[Embedding]:
        out = self.pipeline.forward(self.pipeline.collate(items))
        depth = self.waiting
        results = []
        for item in self.pipeline.unbatch(out):
            tokens = None if item.tokens is None else item.tokens[0].float().cpu().numpy()
            pooled = item.pooled[0].float().cpu().numpy()
            results.append(Embedding(pooled, tokens, len(items), depth, self.replica))
        return results
