"""Each replica's memory limit (`memory_limit_mb` in the application's args). Ray does not
enforce the `memory` a replica reserves; Serve's health check does it here: a replica whose
resident memory passes the limit fails its check and Serve replaces it (its calls in flight
answer UNAVAILABLE, which the SDK retries), before the node runs short and the kernel's OOM
killer picks a victim that may be the gateway."""

from __future__ import annotations

import os
from pathlib import Path

from multimed.models.errors import MultiMedError

PAGE = os.sysconf("SC_PAGE_SIZE")


class OverMemoryLimit(MultiMedError):
    pass


def resident_bytes() -> int:
    """This process's resident memory (Linux's /proc; 0 where there is none)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE
    except OSError:
        return 0


class MemoryLimited:
    """For a replica class: Serve calls `check_health` every health_check_period_s, and raising
    makes it replace the replica. Set `memory_limit_mb` in __init__."""

    memory_limit_mb: float | None = None

    def check_health(self) -> None:
        check_memory(self.memory_limit_mb)


def check_memory(limit_mb: float | None) -> None:
    """Raises OverMemoryLimit past the limit (None: no limit)."""
    if limit_mb is None:
        return
    used = resident_bytes()
    if used > limit_mb * 2**20:
        raise OverMemoryLimit(
            f"resident memory {used / 2**20:.0f} MiB is past this replica's limit of "
            f"{limit_mb:.0f} MiB (memory_limit_mb)"
        )
