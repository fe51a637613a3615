"""Faults on the real server: an encoder replica SIGKILLed under load, every one of them."""

from __future__ import annotations

from scenarios import SERVING, kill_every_xray_replica, kill_xray_replica_under_load, xray_replicas

# scRNA calls answer in tens of milliseconds; one that waits on the dead X-ray replica (for its
# replacement, a deadline or a retry's backoff) takes seconds.
STALL_MS = 5000


def test_encoder_replica_killed_under_load(server):
    """With the SDK's default retries nothing is lost; tasks that do not need X-ray keep being
    answered, never near their deadline (a stall behind the dead replica waits it out); the
    replica is replaced."""
    assert len(xray_replicas(server)) == 2
    killed = kill_xray_replica_under_load(server)
    print(killed.line())
    assert killed.xray == {"OK": 600}
    assert killed.scrna == {"OK": 300}
    assert killed.scrna_max_ms < STALL_MS, killed.line()
    assert killed.replaced_s is not None, "X-ray replica not replaced"


def test_health_follows_the_encoders(server):
    """With every X-ray replica dead, X-ray tasks are NOT_SERVING while scRNA tasks and the
    server stay SERVING; all come back."""
    seen = kill_every_xray_replica(server)
    print(seen.line())
    assert seen.down_s is not None, "X-ray task never reported NOT_SERVING"
    assert seen.others_while_down == {SERVING}
    assert seen.up_s is not None, "X-ray task not SERVING again"
