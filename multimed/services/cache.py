"""The router's embedding cache, keyed by (bundle version, content key): a second task on the same
inputs skips the encoders."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Mapping

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
        h.update(np.ascontiguousarray(data).tobytes())
    elif isinstance(data, Mapping):
        h.update(json.dumps(data, sort_keys=True).encode())
    else:  # a DICOM series: each file, length-prefixed
        for part in data:
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
    return h.hexdigest()


class EmbeddingCache:
    """Least recently used first out, at most `entries` embeddings (0: off)."""

    def __init__(self, entries: int):
        self.entries = entries
        self._items: OrderedDict[tuple[str, str], Embedding] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

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
