"""The per-replica memory limit that Serve's health check enforces."""

from __future__ import annotations

import numpy as np
import pytest

from multimed.services.memory import OverMemoryLimit, check_memory, resident_bytes


def test_a_replica_past_its_limit_fails_its_health_check_and_names_the_setting():
    used = resident_bytes()
    assert used > 10 * 2**20  # this interpreter alone
    check_memory(None)
    check_memory(used / 2**20 + 512)
    with pytest.raises(OverMemoryLimit, match="memory_limit_mb"):
        check_memory(used / 2**20 - 1)


def test_resident_memory_follows_what_is_touched():
    before = resident_bytes()
    block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB, every page written
    assert resident_bytes() - before > 48 * 2**20
    del block
