"""The per-replica memory limit that Serve's health check enforces."""

from __future__ import annotations

import mmap

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
    # A fresh anonymous mapping: pages malloc kept from earlier tests cannot stand in for it.
    with mmap.mmap(-1, 64 * 2**20) as block:
        before = resident_bytes()
        block.write(b"\1" * len(block))  # every page written
        assert resident_bytes() - before > 48 * 2**20
