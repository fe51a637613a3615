"""Bombs and huge requests against the real server: every bomb class is refused with
INVALID_ARGUMENT naming its limit, and the server's memory afterwards is back within 10 % of
before; health keeps answering while huge requests are read (bench/reliability.py records how
fast)."""

from __future__ import annotations

import time

import grpc
import pytest
from bombs import deflate_bomb, resample_bomb
from load import SCRNA_TASK, XRAY_TASK
from scenarios import SERVING, health_during_huge_requests, huge_bodies
from servers import rss_bytes, session_processes

from multimed.models.catalog import InputForm
from multimed.models.inputs import RawInput

F = InputForm
SETTLE_S = 3  # for freed memory to go back (replicas' malloc trims past 64 MiB)


def _bombs() -> dict[str, tuple[str, RawInput, str]]:
    """name -> (task, input, what the refusal names); each fits the tests' 4 MB messages."""
    return {
        "deflated DICOM (80 MiB inflated)": (
            XRAY_TASK,
            RawInput("xray", F.DICOM, deflate_bomb()),
            "inflate",
        ),
        "EDF resampled to 1.2e8 values": (
            "motor_imagery_classification",
            RawInput("eeg", F.EDF, resample_bomb()),
            "resampled",
        ),
        "3.5 MB of bad protein letters": (
            "protein_structure_prediction",
            RawInput("protein", F.SEQUENCE, "Z" * (7 * 2**19)),
            "maximum length",
        ),
        "200,000-gene count map": (
            SCRNA_TASK,
            RawInput("scrna", F.GENE_COUNTS, {f"G{i}": 1.0 for i in range(200_000)}),
            "limit",
        ),
    }


def test_refused_bombs_leave_the_servers_memory_where_it_was(server):
    pids = session_processes(server.process.pid)
    with server.client() as client:
        client.predict(XRAY_TASK, {"xray": server.patients[0] / "xray.dcm"})  # warm
        time.sleep(SETTLE_S)
        before = rss_bytes(pids)
        for name, (task, raw, named) in _bombs().items():
            with pytest.raises(grpc.RpcError) as refused:
                client.predict(task, {raw.modality: raw}, timeout=30)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
            assert named in refused.value.details(), (name, refused.value.details())
        time.sleep(SETTLE_S)
        after = rss_bytes(pids)
    print(
        f"server memory before the bombs {before / 2**20:.0f} MiB, after "
        f"{after / 2**20:.0f} MiB ({after / before - 1:+.1%})"
    )
    assert after < before * 1.10


def test_health_answers_while_huge_requests_are_read(server):
    """Bodies near the message limit that are costly to parse are read off the listener's event
    loop, so health keeps answering meanwhile: every check SERVING, at a pace near the one it
    keeps alone. Pace, not latency: a busy machine slows both phases alike. (Here: 55 checks/s
    during, 87 alone; with every body parsed on the loop, 14 during, 84 alone.)"""
    probe = health_during_huge_requests(server)
    print(probe.line())
    expected = [code for _, _, code in huge_bodies()]
    assert probe.huge_codes == [expected] * len(probe.huge_codes), probe.huge_codes
    assert probe.statuses == {SERVING}, probe.statuses
    assert len(probe.during_ms) > 20 and probe.pace(during=True) > probe.pace() / 4, probe.line()
    assert max(probe.during_ms) < 2000, probe.line()
