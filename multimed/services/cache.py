"""The router's embedding cache, keyed by (bundle version, content key): a second task on the same
inputs skips the encoders."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import replace

import numpy as np

from multimed.models.inputs import RawInput
from multimed.services.types import Embedding


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
        h.update(np.ascontiguousarray(data))  # its buffer: a copy cost a fifth of the hash
    elif isinstance(data, Mapping):
        h.update(json.dumps(data, sort_keys=True).encode())
    else:  # a DICOM series: each file, length-prefixed
        for part in data:
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
    return h.hexdigest()


class EmbeddingCache:
    """Least recently used first out, at most `entries` embeddings and `max_bytes` of arrays
    (0 entries: off). Stored arrays are copies: an embedding that arrived over Ray is a view of
    Ray's object store, and keeping the view would pin the whole object there."""

    def __init__(self, entries: int, max_bytes: int = 256 << 20):
        self.entries = entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[tuple[str, str], Embedding] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple[str, str]) -> Embedding | None:
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
        return hit

    def put(self, key: tuple[str, str], value: Embedding) -> None:
        size = _nbytes(value)
        if self.entries == 0 or size > self.max_bytes:
            return
        if key in self._items:
            self.bytes -= _nbytes(self._items.pop(key))
        self._items[key] = replace(
            value,
            pooled=np.array(value.pooled),
            tokens=None if value.tokens is None else np.array(value.tokens),
            descriptor=np.array(value.descriptor),
        )
        self.bytes += size
        while len(self._items) > self.entries or self.bytes > self.max_bytes:
            _, dropped = self._items.popitem(last=False)
            self.bytes -= _nbytes(dropped)


def _nbytes(e: Embedding) -> int:
    return e.pooled.nbytes + e.descriptor.nbytes + (0 if e.tokens is None else e.tokens.nbytes)
