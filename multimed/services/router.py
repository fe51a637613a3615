"""The fusion router: looks the task up in the catalog, asks only the encoders it needs (all at
once), then fuses what is present and runs the task head. It knows no protocol: the replica that
hosts it (`replica.py`) puts the front doors in front of it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import torch

from multimed.models.catalog import CATALOG
from multimed.models.errors import InputError, MissingModality, MultiMedError
from multimed.models.inputs import RawInput
from multimed.models.modalities.base import EncoderOutput
from multimed.models.outputs import Prediction
from multimed.models.tasks import TaskModels
from multimed.services.cache import EmbeddingCache, content_key
from multimed.services.types import Embedding, EncodeStats, PredictCall, PredictResult

log = logging.getLogger("multimed.router")


def group_calls(
    calls: list[PredictCall], embeddings: list[Mapping[str, Embedding] | Exception]
) -> dict[tuple, list[int]]:
    """Calls that can share one fusion pass: same task, same modalities present, same explain
    flag. -> (task, modalities, explain) -> indices of `calls`; failed calls join no group."""
    groups: dict[tuple, list[int]] = {}
    for i, (call, present) in enumerate(zip(calls, embeddings, strict=True)):
        if not isinstance(present, Exception):
            groups.setdefault((call.task, tuple(sorted(present)), call.explain), []).append(i)
    return groups


class Router:
    """Holds the task models, the embedding cache and the encoder handles (Ray Serve deployment
    handles in production: anything whose `encode_many.remote(raws)` awaits per-input results)."""

    def __init__(
        self,
        encoders: Mapping,
        tasks: TaskModels,
        bundle_version: str,
        cache_entries: int = 4096,
        encoder_timeout_s: float = 30.0,
    ):
        self.encoders = encoders
        self.tasks = tasks.eval()
        self.bundle_version = bundle_version
        self.cache = EmbeddingCache(cache_entries)
        self.encoder_timeout_s = encoder_timeout_s

    async def encoders_answer(self) -> None:
        """Returns once every encoder has answered an (empty) call."""
        await asyncio.gather(*(h.encode_many.remote([]) for h in self.encoders.values()))

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
        """Calls coalesced by the data plane: one encoder call per modality for the whole batch and
        one fusion pass per (task, modalities) group. A failing call fails alone."""
        started = time.perf_counter()
        checked = [_checked_inputs(call) for call in calls]
        wanted: dict[str, dict[str, RawInput]] = {}
        for inputs in checked:
            if not isinstance(inputs, Exception):
                for m, (key, raw) in inputs.items():
                    wanted.setdefault(m, {})[key] = raw
        # The batch waits for its most patient caller; the data plane enforces each caller's own.
        deadlines = [c.deadline for c in calls if c.deadline is not None]
        encoded = await self._encode(wanted, max(deadlines) if deadlines else None)
        encoded_at = time.perf_counter()

        results: list = [_embeddings(inputs, encoded) for inputs in checked]  # errors stay
        for (task, _, explain), members in group_calls(calls, results).items():
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


def _embeddings(
    inputs: dict[str, tuple[str, RawInput]] | MultiMedError, encoded: dict
) -> dict[str, Embedding] | Exception:
    """A call's embeddings by modality, or its first error (its own, or one of its inputs')."""
    if isinstance(inputs, Exception):
        return inputs
    embeddings = {m: encoded[key] for m, (key, _) in inputs.items()}
    error = next((e for e in embeddings.values() if isinstance(e, Exception)), None)
    return embeddings if error is None else error
