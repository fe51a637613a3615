"""The fusion router: looks the task up in the catalog, asks only the encoders it needs (all at
once), then fuses what is present and runs the task head. It knows no protocol: the replica that
hosts it (`replica.py`) puts the front doors in front of it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch

from multimed.models.catalog import CATALOG
from multimed.models.errors import BackendUnavailable, InputError, MissingModality, MultiMedError
from multimed.models.inputs import RawInput
from multimed.models.modalities.base import EncoderOutput
from multimed.models.outputs import Prediction
from multimed.models.tasks import TaskModels
from multimed.services import metrics
from multimed.services.cache import EmbeddingCache, content_key
from multimed.services.errors import Expired, ModelFault
from multimed.services.offload import is_large, off_loop_if
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
    handles in production: anything whose `encode_many.remote(raws, deadlines)` awaits
    per-input results). Each encoder is asked on its own: a slow or failing encoder delays or
    fails only the calls that need it."""

    def __init__(
        self,
        encoders: Mapping,
        tasks: TaskModels,
        bundle_version: str,
        cache_entries: int = 4096,
        encoder_timeout_s: float = 30.0,
        cache_mb: float = 256,
    ):
        self.encoders = encoders
        self.tasks = tasks.eval()
        self.bundle_version = bundle_version
        self.cache = EmbeddingCache(cache_entries, int(cache_mb * 2**20))
        # Inputs are keyed by a digest of their content for the cache; with the cache off, no
        # key outlives its batch, and the digest (~1 ms of CPU for a 2 MB study) buys nothing.
        self.hashes = cache_entries > 0
        self.key = content_key if self.hashes else identity_key
        self.encoder_timeout_s = encoder_timeout_s
        # RUNNING replicas per encoder, kept by the replica's watch (unknown: 1). At 0, calls
        # that need the encoder fail at once with UNAVAILABLE instead of queueing until a
        # replica comes back; above 1, its inputs are split across them (_encode_with).
        self.replicas: Mapping[str, int] = {}

    async def encoders_answer(self) -> None:
        """Returns once every encoder has answered an (empty) call."""
        await asyncio.gather(*(h.encode_many.remote([], []) for h in self.encoders.values()))

    async def embed_many(
        self, raws: list[RawInput], deadline: float | None = None
    ) -> list[Embedding | Exception]:
        """-> per input an Embedding, or its error as a value (raised by the caller, so that
        replica logs never carry an error message quoting the input)."""
        large = self.hashes and is_large(raws)
        keys: list[str | Exception] = await off_loop_if(large, _keys, raws, self.key)
        wanted: dict[str, dict[str, Wanted]] = {}
        for raw, key in zip(raws, keys, strict=True):
            if isinstance(key, str):
                wanted.setdefault(raw.modality, {})[key] = Wanted(raw, deadline)
        encoded = await self._encode(wanted)
        return [encoded[k] if isinstance(k, str) else k for k in keys]

    async def predict_many(self, calls: list[PredictCall]) -> list[PredictResult | Exception]:
        """Calls coalesced by the data plane: one encoder call per modality for the whole batch and
        one fusion pass per (task, modalities) group. A failing call fails alone; a call whose
        deadline has passed is dropped before any encoder runs it."""
        started = time.perf_counter()
        # Hashing and fusion run in a worker thread, but for a lone call's or small inputs. On
        # the loop a coalesced batch's fusion holds it for milliseconds, and grpc.aio takes one
        # new call from gRPC per loop turn: at 10x capacity two thirds of the calls waited in
        # gRPC's queue until gRPC cancelled them (it cancels past 1,000 waiting).
        large = self.hashes and is_large(r for c in calls for r in c.inputs)
        checked = await off_loop_if(large, lambda: [_checked_inputs(c, self.key) for c in calls])
        now = time.time()
        wanted: dict[str, dict[str, Wanted]] = {}
        for i, (call, inputs) in enumerate(zip(calls, checked, strict=True)):
            if isinstance(inputs, Exception):
                continue
            if call.deadline is not None and call.deadline <= now:
                for m in inputs:
                    metrics.DROPPED.labels(m, "expired").inc()
                checked[i] = Expired("the deadline passed before the encoders ran")
                continue
            for m, (key, raw) in inputs.items():
                item = wanted.setdefault(m, {}).get(key)
                # An input shared by several calls waits for its most patient caller.
                deadline = call.deadline if item is None else _later(item.deadline, call.deadline)
                wanted[m][key] = Wanted(raw, deadline)
        encoded = await self._encode(wanted)
        encoded_at = time.perf_counter()

        results: list = [_embeddings(inputs, encoded) for inputs in checked]  # errors stay
        for (task, _, explain), members in group_calls(calls, results).items():
            try:
                predictions = await off_loop_if(
                    len(members) > 1, self._fuse, task, [results[i] for i in members], explain
                )
            except Exception as error:  # fails this group only, never the whole batch
                log.exception("fusion failed for %d %s calls", len(members), task)
                for i in members:
                    results[i] = error
                continue
            fused_at = time.perf_counter()
            for i, (prediction, contributions, ood) in zip(members, predictions, strict=True):
                if not _finite(prediction.scores, list(contributions.values())):
                    log.error("task %s produced non-finite scores", task)
                    results[i] = ModelFault(f"task {task} produced non-finite scores")
                    continue
                results[i] = self._result(
                    calls[i],
                    results[i],
                    prediction,
                    contributions,
                    ood,
                    (encoded_at - started) * 1000,
                    (fused_at - encoded_at) * 1000,
                )
        return results

    async def _encode(
        self, wanted: dict[str, dict[str, Wanted]]
    ) -> dict[str, Embedding | Exception]:
        """Content key -> embedding (or that input's error): cache first, then one call per
        encoder for all its misses, every encoder at once and each on its own."""
        out: dict[str, Embedding | Exception] = {}
        misses: dict[str, list[tuple[str, Wanted]]] = {}
        for m, items in wanted.items():
            for key, item in items.items():
                hit = self.cache.get((self.bundle_version, key))
                if hit is None:
                    misses.setdefault(m, []).append((key, item))
                else:
                    out[key] = replace(hit, batch_size=0)
        await asyncio.gather(*(self._encode_with(m, items, out) for m, items in misses.items()))
        metrics.CACHE_BYTES.set(self.cache.bytes)
        return out

    async def _encode_with(
        self, modality: str, items: list[tuple[str, Wanted]], out: dict[str, Embedding | Exception]
    ) -> None:
        """One encoder's inputs, in one call per RUNNING replica: with a single call per router
        batch, extra replicas would idle and Serve's autoscaler would see at most the
        coalescer's slots in flight whatever the load. Every outcome, errors included, lands
        in `out`."""
        replicas = self.replicas.get(modality, 1)
        if replicas == 0:
            error = BackendUnavailable(f"the {modality} encoder has no live replica; retry")
            results = [error] * len(items)
        else:
            parts = split(items, replicas)
            answers = await asyncio.gather(*(self._call(modality, part) for part in parts))
            results = [result for answer in answers for result in answer]
        for (key, _), result in zip(items, results, strict=True):
            out[key] = result
            if isinstance(result, Expired):
                metrics.DROPPED.labels(modality, "expired").inc()
            elif not isinstance(result, Exception):
                self.cache.put((self.bundle_version, key), result)

    async def _call(self, modality: str, items: list[tuple[str, Wanted]]) -> list:
        """One encode_many call: per input its embedding or error; the call's failure (a dead
        replica, say) or timeout fails its own inputs only."""
        deadlines = [item.deadline for _, item in items]
        timeout, error = (
            self.encoder_timeout_s,
            BackendUnavailable(
                f"the {modality} encoder did not answer in {self.encoder_timeout_s:g} s"
            ),
        )
        if None not in deadlines:
            left = max(deadlines) - time.time()  # type: ignore[operator]
            if left < timeout:
                timeout, error = max(left, 0.001), Expired("deadline exceeded at the encoder")
        response = self.encoders[modality].encode_many.remote(
            [item.raw for _, item in items], deadlines
        )
        try:
            return await asyncio.wait_for(response, timeout)
        except TimeoutError:
            response.cancel()
            return [error] * len(items)
        except Exception as failure:
            return [failure] * len(items)

    def _fuse(self, task: str, members: list[dict[str, Embedding]], explain: bool):
        """One fusion pass, and one out-of-distribution pass per modality, for calls with the
        same task and modalities (per call when the task labels tokens, whose lengths differ,
        or when contributions were asked for). -> per call (prediction, contributions, OOD
        score by modality)."""
        spec = CATALOG.task(task)
        if spec.token_modality is not None or explain:
            out = []
            for embeddings in members:
                outputs = {m: _as_output(e) for m, e in embeddings.items()}
                prediction = self.tasks.predict(task, outputs)[0]
                contributions = self._contributions(task, outputs, prediction) if explain else {}
                ood = {m: self.tasks.out_of_distribution(m, o)[0] for m, o in outputs.items()}
                out.append((prediction, contributions, ood))
            return out
        outputs = {
            m: EncoderOutput(
                torch.from_numpy(np.stack([e[m].pooled for e in members])),
                descriptor=torch.from_numpy(np.stack([e[m].descriptor for e in members])),
            )
            for m in members[0]
        }
        oods = {m: self.tasks.out_of_distribution(m, o) for m, o in outputs.items()}
        return [
            (p, {}, {m: scores[i] for m, scores in oods.items()})
            for i, p in enumerate(self.tasks.predict(task, outputs))
        ]

    def _result(self, call, embeddings, prediction, contributions, ood, encode_ms, fuse_ms):
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
                m: EncodeStats(e.batch_size, e.queue_depth, e.replica, e.gpu_utilization)
                for m, e in embeddings.items()
            },
            out_of_distribution=ood,
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


def split(items: list, parts: int) -> list[list]:
    """`items` in order, in min(parts, len(items)) runs whose lengths differ by at most one (so
    no replica gets a sliver while another gets a full share)."""
    parts = max(1, min(parts, len(items)))
    return [items[i * len(items) // parts : (i + 1) * len(items) // parts] for i in range(parts)]


@dataclass(frozen=True)
class Wanted:
    """An input to encode, and the latest deadline of the calls waiting for it."""

    raw: RawInput
    deadline: float | None


def _later(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else max(a, b)


def _finite(*values) -> bool:
    return all(np.isfinite(np.asarray(v, dtype=np.float64)).all() for v in values)


def identity_key(raw: RawInput) -> str:
    """A key for one batch only: the input object's identity (an input sent twice is encoded
    twice)."""
    return f"{raw.modality}\0{id(raw)}"


def _key(raw: RawInput, key: Callable[[RawInput], str]) -> str:
    """The input's key; InputError for an unknown modality or unreadable data."""
    try:
        CATALOG.modality(raw.modality)
        return key(raw)
    except MultiMedError:
        raise
    except Exception as error:  # data of a shape no front door should let through
        raise InputError(raw.modality, f"input cannot be read ({type(error).__name__})") from None


def _keys(raws: list[RawInput], key: Callable[[RawInput], str]) -> list[str | Exception]:
    """Each input's key, or why it cannot be encoded."""
    out: list[str | Exception] = []
    for raw in raws:
        try:
            out.append(_key(raw, key))
        except MultiMedError as error:
            out.append(error)
    return out


def _checked_inputs(
    call: PredictCall, key: Callable[[RawInput], str]
) -> dict[str, tuple[str, RawInput]] | Exception:
    """The call's inputs by modality, with their keys, or why the call cannot be answered."""
    try:
        spec = CATALOG.task(call.task)
        inputs: dict[str, tuple[str, RawInput]] = {}
        for raw in call.inputs:
            k = _key(raw, key)  # an unknown modality is named before a repeated one
            if raw.modality in inputs:
                raise InputError(raw.modality, "sent more than once in one request")
            inputs[raw.modality] = (k, raw)
        spec.check_modalities(inputs)
        return inputs
    except MultiMedError as error:
        return error


def _as_output(e: Embedding) -> EncoderOutput:
    tokens = mask = None
    if e.tokens is not None:
        tokens = torch.from_numpy(e.tokens).unsqueeze(0)
        mask = torch.ones(1, e.tokens.shape[0], dtype=torch.bool)
    return EncoderOutput(
        torch.from_numpy(e.pooled).unsqueeze(0),
        tokens,
        mask,
        torch.from_numpy(e.descriptor).unsqueeze(0),
    )


def _embeddings(
    inputs: dict[str, tuple[str, RawInput]] | MultiMedError, encoded: dict
) -> dict[str, Embedding] | Exception:
    """A call's embeddings by modality, or its first error (its own, or one of its inputs')."""
    if isinstance(inputs, Exception):
        return inputs
    embeddings = {m: encoded[key] for m, (key, _) in inputs.items()}
    error = next((e for e in embeddings.values() if isinstance(e, Exception)), None)
    return embeddings if error is None else error
