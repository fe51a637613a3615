"""One modality's encoding, free of Ray Serve: decode and validate inputs one by one, then run
model-ready items as batches and check what comes out. The encoder deployment runs it behind
Serve's batcher; offline scoring (`multimed score`) runs it in Ray Data workers, through the
same router, so that both answer the same."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence

import numpy as np

from multimed.models.errors import InputError
from multimed.models.inputs import RawInput
from multimed.models.modalities.base import Batch, ModalityPipeline
from multimed.services.errors import ModelFault
from multimed.services.offload import decoding_is_light, off_loop_if
from multimed.services.types import Embedding

log = logging.getLogger("multimed.encoder")

# pooled [D], tokens [L, D] or None, descriptor [K]: the leading fields of an Embedding
Encoded = tuple[np.ndarray, np.ndarray | None, np.ndarray]


class EncoderCore:
    def __init__(self, modality: str, pipeline: ModalityPipeline):
        self.modality = modality
        self.pipeline = pipeline
        self.waiting = 0  # inputs in this encoder (decoding, waiting for a batch or in one)

    @contextlib.contextmanager
    def holding(self, inputs: int) -> Iterator[None]:
        """Counts `inputs` in `waiting` from arrival to answer: decoding is this encoder's work
        too."""
        self.waiting += inputs
        try:
            yield
        finally:
            self.waiting -= inputs

    def prepare(self, raws: Sequence[RawInput]) -> list[Batch | Exception]:
        """Each input decoded and validated alone: a bad one answers with its error."""
        prepared: list[Batch | Exception] = []
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
        return prepared

    async def encode(
        self, items: Sequence[Batch], forward: Callable[[Batch], Awaitable] | None = None
    ) -> list[Encoded | ModelFault]:
        """Model-ready items as batches, one per kind: raw and model-ready items differ in their
        keys (text: token ids vs features). `forward`: a remote model's (Triton); default the
        local one, run in a worker thread (torch releases the GIL), off the event loop, so
        the next inputs are received and decoded meanwhile. A lone item runs on the loop when
        nothing else is `waiting` in this encoder, as nothing waits for the loop and the hop
        would cost more than it overlaps; under load, lone batches still happen (a free
        batch slot takes the first arrival), and on the loop each held it for a whole forward:
        in the router, whose loop serves gRPC, 157 of them in 6 s at image c=32."""
        if forward is None:
            alone = self.waiting <= len(items)
            return await off_loop_if(len(items) > 1 or not alone, self._encode_here, items)
        kinds = _kinds(items)
        outs = [await forward(self.pipeline.collate([items[i] for i in k])) for k in kinds]
        return self._scatter(len(items), kinds, outs)

    def _encode_here(self, items: Sequence[Batch]) -> list[Encoded | ModelFault]:
        kinds = _kinds(items)
        outs = [self.pipeline.forward(self.pipeline.collate([items[i] for i in k])) for k in kinds]
        return self._scatter(len(items), kinds, outs)

    def _scatter(self, n: int, kinds: list[list[int]], outs: list) -> list[Encoded | ModelFault]:
        """Each kind's forward output back to its items' places."""
        results: list[Encoded | ModelFault] = [None] * n  # type: ignore[list-item]
        for members, out in zip(kinds, outs, strict=True):
            for i, result in zip(members, self._unbatch(out), strict=True):
                results[i] = result
        return results

    def _unbatch(self, out) -> list[Encoded | ModelFault]:
        """A forward's output -> per item its arrays, or a ModelFault where the model produced
        non-finite values (finite inputs are checked on decode: that is the model's fault)."""
        results: list[Encoded | ModelFault] = []
        for item in self.pipeline.unbatch(out):
            tokens = None if item.tokens is None else item.tokens[0].float().cpu().numpy()
            pooled = item.pooled[0].float().cpu().numpy()
            descriptor = item.descriptor[0].float().cpu().numpy()
            if not _finite(pooled, descriptor, tokens):
                log.error("%s encoder produced non-finite values", self.modality)
                fault = ModelFault(f"the {self.modality} encoder produced non-finite values")
                results.append(fault)
            else:
                results.append((pooled, tokens, descriptor))
        return results


def _finite(*arrays: np.ndarray | None) -> bool:
    return all(a is None or np.isfinite(a).all() for a in arrays)


def _kinds(items: Sequence[Batch]) -> list[list[int]]:
    """Indices of `items` grouped by their keys, in order of first appearance."""
    kinds: dict[tuple[str, ...], list[int]] = {}
    for i, item in enumerate(items):
        kinds.setdefault(tuple(sorted(item)), []).append(i)
    return list(kinds.values())


class LocalEncoder:
    """An encoder in this process with a deployment handle's call shape
    (`await encode_many.remote(raws, deadlines)`), so that the router runs unchanged: inputs
    are decoded (in a worker thread unless small arrays or strings), then run in batches of at
    most `batch_size`."""

    def __init__(self, core: EncoderCore, batch_size: int):
        self.core = core
        self.batch_size = batch_size
        self.encode_many = self  # handle.encode_many.remote(...)

    def remote(self, raws: Sequence[RawInput], deadlines=None) -> asyncio.Task:
        """A task, as a Ray response is something the router can cancel on timeout."""
        return asyncio.ensure_future(self._encode(raws))

    async def _encode(self, raws: Sequence[RawInput]) -> list[Embedding | Exception]:
        with self.core.holding(len(raws)):
            return await self._encode_held(raws)

    async def _encode_held(self, raws: Sequence[RawInput]) -> list[Embedding | Exception]:
        prepared = await off_loop_if(not decoding_is_light(raws), self.core.prepare, raws)
        valid = [i for i, p in enumerate(prepared) if not isinstance(p, Exception)]
        out: list[Embedding | Exception] = list(prepared)  # type: ignore[arg-type]
        for start in range(0, len(valid), self.batch_size):
            chunk = valid[start : start + self.batch_size]
            encoded = await self.core.encode([prepared[i] for i in chunk])  # type: ignore[misc]
            for i, result in zip(chunk, encoded, strict=True):
                out[i] = result if isinstance(result, Exception) else Embedding(*result, len(chunk))
        return out
