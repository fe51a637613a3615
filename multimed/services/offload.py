"""Work on a large payload leaves the event loop: parsing a 64 MB body, converting a 1.5 M-entry
gene map or hashing megabytes holds a loop for seconds, and the loop must keep answering health
checks and other callers meanwhile. Small payloads stay on the loop, where a thread hop would
cost more than the work."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
OFFLOAD_BYTES = 256 * 1024  # converting or hashing a payload larger than this runs in a thread


async def off_loop_if(large: bool, function: Callable[..., T], *args) -> T:
    """`function(*args)`, in a worker thread when `large`."""
    if large:
        return await asyncio.to_thread(function, *args)
    return function(*args)
