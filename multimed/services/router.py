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
from dataclasses import replace

import numpy as np
import torch
from ray.serve.handle import DeploymentHandle

from multimed.models.bundle import load_bundle
from multimed.models.catalog import CATALOG
from multimed.models.errors import InputError, MissingModality, MultiMedError
from multimed.models.heads import Prediction
from multimed.models.modalities.base import EncoderOutput, RawInput
from multimed.models.modalities.registry import build_pipelines
from multimed.models.tasks import TaskModels
from multimed.services.config import GatewaySettings
from multimed.services.gateway import start_gateway
from multimed.services.metrics import serve_metrics
from multimed.services.types import Embedding, EncodeStats, PredictCall, PredictResult

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
    """Holds the task models and the embedding cache, and runs the gRPC gateway in-process."""

    async def __init__(
        self,
        encoders: dict[str, DeploymentHandle],
        bundle: str,
        cache_entries: int = 4096,
        encoder_timeout_s: float = 30.0,
        gateway: dict | None = None,
        metrics_port: int | None = None,
    ):
        loaded = load_bundle(bundle)
        self.bundle_version = loaded.version
        self.encoders = encoders
        self.tasks = TaskModels(loaded.config)
        self.tasks.load_state_dict(loaded.tasks_state())
        self.tasks.eval()
        self.cache = EmbeddingCache(cache_entries)
        self.encoder_timeout_s = encoder_timeout_s
        torch.set_num_threads(1)
        self.gateway = None
        if gateway is not None:
            settings = GatewaySettings.model_validate(gateway)
            specs = {m: p.model_input() for m, p in build_pipelines(loaded.config).items()}
            self.gateway = await start_gateway(self, loaded.manifest, specs, settings)
            if metrics_port is not None:
                try:
                    serve_metrics(settings.host, metrics_port)
                except OSError:  # another router replica on this node already serves /metrics
                    log.warning(
                        "metrics port %d busy; this replica's metrics are not exported",
                        metrics_port,
                    )
            self._until_serving = asyncio.ensure_future(self._serving_when_encoders_answer())

    async def _serving_when_encoders_answer(self) -> None:
        """Health turns SERVING once every encoder has answered an (empty) call."""
        await asyncio.gather(*(h.encode_many.remote([]) for h in self.encoders.values()))
        await self.gateway.set_serving(True)
        log.info("gateway serving (bundle %s)", self.bundle_version)

    async def embed_many(
        self, raws: list[RawInput], deadline: float | None = None
    ) -> list[Embedding | MultiMedError]:
        """-> per input an Embedding, or its error as a value (raised by the caller, so that
        replica logs never carry an error message quoting the input)."""
        keys: list[str | MultiMedError] = []
        wanted: dict[str, dict[str, RawInput]] = {}
        for raw in raws:
            try:
                CATALOG.modality(raw.modality)
            except MultiMedError as error:
                keys.append(error)
                continue
            keys.append(content_key(raw))
            wanted.setdefault(raw.modality, {})[keys[-1]] = raw
        encoded = await self._encode(wanted, deadline)
        return [encoded[k] if isinstance(k, str) else k for k in keys]

    async def predict_many(self, calls: list[PredictCall]) -> list[PredictResult | Exception]:
        """Calls coalesced by the gateway: one encoder call per modality for the whole batch and
        one fusion pass per (task, modalities) group. A failing call fails alone."""
        started = time.perf_counter()
        checked = [_checked_inputs(call) for call in calls]
        wanted: dict[str, dict[str, RawInput]] = {}
        for inputs in checked:
            if not isinstance(inputs, Exception):
                for m, (key, raw) in inputs.items():
                    wanted.setdefault(m, {})[key] = raw
        # The batch waits for its most patient caller; the gateway enforces each caller's own.
        deadlines = [c.deadline for c in calls if c.deadline is not None]
        encoded = await self._encode(wanted, max(deadlines) if deadlines else None)
        encoded_at = time.perf_counter()

        results: list[PredictResult | Exception] = list(checked)  # errors stay in place
        groups: dict[tuple, list[int]] = {}
        for i, inputs in enumerate(checked):
            if isinstance(inputs, Exception):
                continue
            embeddings = {m: encoded[key] for m, (key, _) in inputs.items()}
            error = next((e for e in embeddings.values() if isinstance(e, Exception)), None)
            results[i] = error if error is not None else embeddings
            if error is None:
                group = (calls[i].task, tuple(sorted(embeddings)), calls[i].explain)
                groups.setdefault(group, []).append(i)
        for (task, _, explain), members in groups.items():
            try:
                predictions = self._fuse(task, [results[i] for i in members], explain)
            except Exception as error:  # fails this group only, never the whole batch
                log.exception("fusion failed for %d %s calls", len(members), task)
                for i in members:
                    results[i] = error
                continue
            fused_at = time.perf_counter()
            for i, (prediction, contributions) in zip(members, predictions, strict=True):
                results[i] = self._result(
                    calls[i],
                    results[i],
                    prediction,
                    contributions,
                    (encoded_at - started) * 1000,
                    (fused_at - encoded_at) * 1000,
                )
        return results

    async def _encode(
        self, wanted: dict[str, dict[str, RawInput]], deadline: float | None
    ) -> dict[str, Embedding | Exception]:
        """Content key -> embedding (or that input's error): cache first, then one call per
        encoder for all its misses, all encoders at once."""
        out: dict[str, Embedding | Exception] = {}
        misses: dict[str, list[tuple[str, RawInput]]] = {}
        for m, items in wanted.items():
            for key, raw in items.items():
                hit = self.cache.get((self.bundle_version, key))
                if hit is None:
                    misses.setdefault(m, []).append((key, raw))
                else:
                    out[key] = replace(hit, batch_size=0)
        if not misses:
            return out
        timeout = self.encoder_timeout_s
        if deadline is not None:
            timeout = min(timeout, max(deadline - time.time(), 0.001))
        calls = {
            m: self.encoders[m].encode_many.remote([raw for _, raw in items])
            for m, items in misses.items()
        }
        try:
            answers = await asyncio.wait_for(asyncio.gather(*calls.values()), timeout)
        except TimeoutError:
            for response in calls.values():
                response.cancel()
            raise
        for items, results in zip(misses.values(), answers, strict=True):
            for (key, _), result in zip(items, results, strict=True):
                out[key] = result
                if not isinstance(result, Exception):
                    self.cache.put((self.bundle_version, key), result)
        return out

    def _fuse(self, task: str, members: list[dict[str, Embedding]], explain: bool):
        """One fusion pass for calls with the same task and modalities (per call when the
        task labels tokens, whose lengths differ, or when contributions were asked for)."""
        spec = CATALOG.task(task)
        if spec.token_modality is not None or explain:
            out = []
            for embeddings in members:
                outputs = {m: _as_output(e) for m, e in embeddings.items()}
                prediction = self.tasks.predict(task, outputs)[0]
                contributions = self._contributions(task, outputs, prediction) if explain else {}
                out.append((prediction, contributions))
            return out
        outputs = {
            m: EncoderOutput(torch.from_numpy(np.stack([e[m].pooled for e in members])))
            for m in members[0]
        }
        return [(p, {}) for p in self.tasks.predict(task, outputs)]

    def _result(self, call, embeddings, prediction, contributions, encode_ms, fuse_ms):
        spec = CATALOG.task(call.task)
        return PredictResult(
            request_id=call.request_id,
            task=call.task,
            prediction=prediction,
            used=tuple(m for m in spec.accepted if m in embeddings),
            missing=tuple(m for m in spec.accepted if m not in embeddings),
            bundle_version=self.bundle_version,
            encode_ms=encode_ms,
            fuse_ms=fuse_ms,
            contributions=contributions,
            encoders={
                m: EncodeStats(e.batch_size, e.queue_depth, e.replica)
                for m, e in embeddings.items()
            },
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


def _checked_inputs(call: PredictCall) -> dict[str, tuple[str, RawInput]] | MultiMedError:
    """The call's inputs by modality, keyed by content, or why the call cannot be answered."""
    try:
        spec = CATALOG.task(call.task)
        inputs: dict[str, tuple[str, RawInput]] = {}
        for raw in call.inputs:
            CATALOG.modality(raw.modality)
            if raw.modality in inputs:
                raise InputError(raw.modality, "sent more than once in one request")
            inputs[raw.modality] = (content_key(raw), raw)
        spec.check_modalities(inputs)
        return inputs
    except MultiMedError as error:
        return error


def _as_output(e: Embedding) -> EncoderOutput:
    tokens = mask = None
    if e.tokens is not None:
        tokens = torch.from_numpy(e.tokens).unsqueeze(0)
        mask = torch.ones(1, e.tokens.shape[0], dtype=torch.bool)
    return EncoderOutput(torch.from_numpy(e.pooled).unsqueeze(0), tokens, mask)
