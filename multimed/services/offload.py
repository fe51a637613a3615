"""Work on a large payload leaves the event loop: parsing a 64 MB body, converting a 1.5 M-entry
gene map or hashing megabytes holds a loop for seconds, and the loop must keep answering health
checks and other callers meanwhile. Small payloads stay on the loop, where a thread hop would
cost more than the work."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import TypeVar

from multimed.models.catalog import InputForm
from multimed.models.inputs import RawInput

T = TypeVar("T")
OFFLOAD_BYTES = 256 * 1024  # converting or hashing a payload larger than this runs in a thread
# Forms whose decoding is a check of an array or a short string: files (DICOM, PNG, EDF) are
# decompressed and parsed, so their decoding always leaves the loop whatever their size.
CHEAP_FORMS = frozenset({InputForm.TENSOR, InputForm.TEXT, InputForm.SEQUENCE})


def is_large(raws: Iterable[RawInput]) -> bool:
    """Whether hashing or converting these inputs is worth a thread hop."""
    return sum(r.size for r in raws) > OFFLOAD_BYTES


def decoding_is_light(raws: Iterable[RawInput]) -> bool:
    """Whether decoding these inputs costs less than the thread hop (~0.1 ms of CPU here)."""
    raws = list(raws)
    return all(r.form in CHEAP_FORMS for r in raws) and not is_large(raws)


async def off_loop_if(large: bool, function: Callable[..., T], *args) -> T:
    """`function(*args)`, in a worker thread when `large`."""
    if large:
        return await asyncio.to_thread(function, *args)
    return function(*args)
