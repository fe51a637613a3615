"""The fusion router: looks the task up in the catalog, asks only the encoders it needs (all at
once), then fuses what is present and runs the task head. An embedding cache keyed by (modality,
content hash, bundle version) lets a second task on the same inputs skip the encoders."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch
from ray.serve.handle import DeploymentHandle

from multimed.models.bundle import load_bundle
from multimed.models.catalog import CATALOG
from multimed.models.errors import InputError, MissingModality
from multimed.models.heads import Prediction
from multimed.models.modalities.base import EncoderOutput, RawInput
from multimed.models.tasks import TaskModels
from multimed.services.types import Embedding, PredictCall, PredictResult

log = logging.getLogger("multimed.router")


def content_key(raw: RawInput) -> str:
    """A digest of an input's content and form (not of the Python object)."""
    h = hashlib.sha256(f"{raw.modality}\0{raw.form}\0".encode())
    data = raw.data
    if isinstance(data, str):
        h.update(data.encode())
    elif isinstance(data, bytes | bytearray | memoryview):
        h.update(data)
    elif isinstance(data, np.ndarray):
        h.update(f"{data.dtype}{data.shape}".encode())
        h.update(np.ascontiguousarray(data).tobytes())
    elif isinstance(data, Mapping):
        h.update(json.dumps(data, sort_keys=True).encode())
    else:  # a DICOM series: each file, length-prefixed
        for part in data:
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
    return h.hexdigest()


class EmbeddingCache:
    def __init__(self, entries: int):
        self.entries = entries
        self._items: OrderedDict[tuple[str, str], Embedding] = OrderedDict()

    def get(self, key: tuple[str, str]) -> Embedding | None:
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
        return hit

    def put(self, key: tuple[str, str], value: Embedding) -> None:
        if self.entries == 0:
            return
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.entries:
            self._items.popitem(last=False)


class Router:
    def __init__(
        self,
        encoders: dict[str, DeploymentHandle],
        bundle: str,
        cache_entries: int = 4096,
        encoder_timeout_s: float = 30.0,
    ):
        loaded = load_bundle(bundle)
        self.bundle_version = loaded.version
        self.manifest = loaded.manifest
        self.encoders = encoders
        self.tasks = TaskModels(loaded.config)
        self.tasks.load_state_dict(loaded.tasks_state())
        self.tasks.eval()
        self.cache = EmbeddingCache(cache_entries)
        self.encoder_timeout_s = encoder_timeout_s
        torch.set_num_threads(1)

    async def embed(self, raw: RawInput, deadline: float | None = None) -> Embedding:
        CATALOG.modality(raw.modality)
        key = (self.bundle_version, content_key(raw))
        hit = self.cache.get(key)
        if hit is not None:
            return Embedding(hit.pooled, hit.tokens, batch_size=0)
        timeout = self.encoder_timeout_s
        if deadline is not None:
            timeout = min(timeout, max(deadline - time.time(), 0.001))
        response = self.encoders[raw.modality].encode.remote(raw)
        try:
            result = await asyncio.wait_for(response, timeout)
        except TimeoutError:
            response.cancel()
            raise
        self.cache.put(key, result)
        return result

    async def predict(self, call: PredictCall) -> PredictResult:
        spec = CATALOG.task(call.task)
        by_modality: dict[str, RawInput] = {}
        for raw in call.inputs:
            CATALOG.modality(raw.modality)
            if raw.modality in by_modality:
                raise InputError(raw.modality, "sent more than once in one request")
            by_modality[raw.modality] = raw
        spec.check_modalities(by_modality)

        started = time.perf_counter()
        results = await asyncio.gather(
            *(self.embed(raw, call.deadline) for raw in by_modality.values())
        )
        embeddings = dict(zip(by_modality, results, strict=True))
        encoded = time.perf_counter()
        outputs = {m: _as_output(e) for m, e in embeddings.items()}
        prediction = self.tasks.predict(call.task, outputs)[0]
        contributions = self._contributions(call.task, outputs, prediction) if call.explain else {}
        fused = time.perf_counter()
        used = tuple(m for m in spec.accepted if m in embeddings)
        return PredictResult(
            request_id=call.request_id,
            task=call.task,
            prediction=prediction,
            used=used,
            missing=tuple(m for m in spec.accepted if m not in embeddings),
            bundle_version=self.bundle_version,
            encode_ms=(encoded - started) * 1000,
            fuse_ms=(fused - encoded) * 1000,
            contributions=contributions,
            encoders=embeddings,
        )

    def _contributions(self, task: str, outputs: dict[str, EncoderOutput], full: Prediction):
        """Mean absolute change of the task's scores when one modality is masked out."""
        spec = CATALOG.task(task)
        base = np.asarray(full.scores, dtype=np.float64)
        out = {}
        for m in outputs:
            rest = {k: v for k, v in outputs.items() if k != m}
            try:
                spec.check_modalities(rest)
            except MissingModality:  # required: without it there is no answer to compare with
                out[m] = 1.0
                continue
            scores = np.asarray(self.tasks.predict(task, rest)[0].scores, dtype=np.float64)
            out[m] = float(np.abs(base - scores).mean())
        return out


def _as_output(e: Embedding) -> EncoderOutput:
    tokens = mask = None
    if e.tokens is not None:
        tokens = torch.from_numpy(e.tokens).unsqueeze(0)
        mask = torch.ones(1, e.tokens.shape[0], dtype=torch.bool)
    return EncoderOutput(torch.from_numpy(e.pooled).unsqueeze(0), tokens, mask)
