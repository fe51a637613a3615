"""Encoder autoscaling without Ray: the router splits an encoder's inputs across its RUNNING
replicas (each input's embedding or error still lands on it), and the policy Serve's controller
runs scales on inputs in flight, read through Ray's own config and context types."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from multimed.models.catalog import InputForm
from multimed.models.config import ModelConfig
from multimed.models.errors import BackendUnavailable
from multimed.models.inputs import RawInput
from multimed.models.modalities.registry import build_pipeline
from multimed.models.tasks import TaskModels
from multimed.services.autoscaling import INPUTS_IN_FLIGHT, inputs_policy
from multimed.services.encoding import EncoderCore
from multimed.services.errors import Expired
from multimed.services.router import Router, split
from multimed.services.types import Embedding


@pytest.mark.parametrize("n, parts", [(10, 3), (9, 4), (2, 4), (7, 1), (64, 4)])
def test_split_keeps_order_and_shares_within_one(n, parts):
    runs = split(list(range(n)), parts)
    assert [i for run in runs for i in run] == list(range(n))
    assert len(runs) == min(parts, n)
    assert max(map(len, runs)) - min(map(len, runs)) <= 1


class Encoder:
    """A stand-in for an encoder's Serve handle: `encode_many.remote(raws, deadlines)` answers
    each X-ray tensor with an embedding of its first pixel; a call holding a pixel of 0.5 fails
    whole, one holding 0.25 never answers."""

    def __init__(self):
        self.calls: list[int] = []
        self.encode_many = self

    def remote(self, raws, deadlines):
        self.calls.append(len(raws))
        return asyncio.ensure_future(self._answer(raws))

    async def _answer(self, raws):
        pixels = [float(r.data.flat[0]) for r in raws]
        if 0.5 in pixels:
            raise RuntimeError("the replica died")
        if 0.25 in pixels:
            await asyncio.sleep(60)
        return [
            Embedding(np.full(4, p, dtype=np.float32), None, np.zeros(2, np.float32))
            for p in pixels
        ]


def xray(pixel: float) -> RawInput:
    return RawInput("xray", InputForm.TENSOR, np.full((1, 8, 8), pixel, dtype=np.float32))


def embed(replicas: dict[str, int], pixels: list[float], deadline: float | None = None):
    encoder = Encoder()
    router = Router({"xray": encoder}, TaskModels(ModelConfig(embed_dim=8)), "v", cache_entries=0)
    router.replicas = replicas
    out = asyncio.run(router.embed_many([xray(p) for p in pixels], deadline))
    return encoder.calls, out


def test_one_call_per_running_replica_and_every_input_gets_its_own_embedding():
    pixels = [i / 100 for i in range(1, 11)]
    calls, out = embed({"xray": 3}, pixels)
    assert sorted(calls) == [3, 3, 4]
    assert [float(e.pooled[0]) for e in out] == pytest.approx(pixels)


def test_a_single_replica_gets_one_call_as_before():
    calls, _ = embed({}, [0.1, 0.2, 0.3])  # not yet watched: one replica assumed
    assert calls == [3]
    calls, _ = embed({"xray": 1}, [0.1, 0.2, 0.3])
    assert calls == [3]


@pytest.mark.parametrize("cache_entries, encoded", [(16, 2), (0, 3)])
def test_equal_inputs_in_one_batch_share_an_encoding_only_with_the_cache(cache_entries, encoded):
    """Content digests key the cache; with it off inputs are keyed by identity, undigested
    (equal content is then encoded once per input), and each still gets its own embedding."""
    encoder = Encoder()
    router = Router({"xray": encoder}, TaskModels(ModelConfig(embed_dim=8)), "v", cache_entries)
    out = asyncio.run(router.embed_many([xray(0.1), xray(0.2), xray(0.1)]))
    assert encoder.calls == [encoded]
    assert [float(e.pooled[0]) for e in out] == pytest.approx([0.1, 0.2, 0.1])


def test_an_encoder_without_replicas_fails_its_inputs_at_once():
    calls, out = embed({"xray": 0}, [0.1, 0.2])
    assert calls == []
    assert all(isinstance(e, BackendUnavailable) for e in out)


def test_a_failed_call_fails_only_its_own_inputs():
    calls, out = embed({"xray": 2}, [0.1, 0.5, 0.3, 0.4])
    assert calls == [2, 2]
    assert [isinstance(e, RuntimeError) for e in out] == [True, True, False, False]
    assert float(out[3].pooled[0]) == pytest.approx(0.4)


def test_a_call_past_its_deadline_expires_only_its_own_inputs():
    started = time.monotonic()
    _, out = embed({"xray": 2}, [0.1, 0.2, 0.25, 0.4], deadline=time.time() + 0.3)
    assert time.monotonic() - started < 5
    assert [isinstance(e, Expired) for e in out] == [False, False, True, True]
    assert float(out[1].pooled[0]) == pytest.approx(0.2)


def context(in_flight: dict[str, float], replicas: int, target: float) -> AutoscalingContext:
    config = AutoscalingConfig(
        min_replicas=1,
        max_replicas=8,
        target_ongoing_requests=target,
        policy={"policy_function": "multimed.services.autoscaling:inputs_policy"},
    )
    return AutoscalingContext(
        deployment_id=None,
        deployment_name="encoder-xray",
        app_name="multimed",
        current_num_replicas=replicas,
        target_num_replicas=replicas,
        running_replicas=list(in_flight),
        total_num_requests=2.0,  # the router's calls: never what the policy scales on
        total_queued_requests=0.0,
        aggregated_metrics={INPUTS_IN_FLIGHT: in_flight} if in_flight else {},
        raw_metrics={},
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=8,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=time.time(),
        config=config,
    )


def test_the_policy_wants_inputs_in_flight_over_the_target_per_replica():
    ctx = context({"r1": 40.0, "r2": 20.0, "r3": 0.0}, replicas=3, target=8)
    policy = ctx.config.policy.get_policy()  # as Serve's controller gets it: by value
    assert policy(ctx)[0] == pytest.approx(7.5)
    assert inputs_policy(context({"r1": 4.0}, replicas=1, target=8))[0] == pytest.approx(0.5)


def test_the_policy_wants_none_before_any_report_and_leaves_a_cold_start_to_serve():
    assert inputs_policy(context({}, replicas=2, target=8))[0] == 0
    assert inputs_policy(context({}, replicas=0, target=8))[0] == 0  # its target: 0 replicas


def test_a_lone_forward_leaves_the_loop_only_when_other_inputs_wait():
    """A lone item's forward runs on the event loop when it is all the encoder holds (no thread
    hop to pay for), and in a worker thread when other inputs are in the encoder: the loop
    serves them (and, in the router, gRPC) meanwhile."""
    pipeline = build_pipeline("xray", ModelConfig()).setup("cpu")
    core = EncoderCore("xray", pipeline)
    image = np.random.default_rng(0).random(pipeline.model_input().shape, dtype=np.float32)
    (item,) = core.prepare([RawInput("xray", InputForm.TENSOR, image)])
    threads: list[threading.Thread] = []
    forward = core._encode_here
    core._encode_here = lambda items: threads.append(threading.current_thread()) or forward(items)

    async def encode(others: int) -> None:
        with core.holding(1 + others):
            (out,) = await core.encode([item])
        assert not isinstance(out, Exception)

    asyncio.run(encode(0))
    asyncio.run(encode(3))
    assert threads[0] is threading.main_thread()
    assert threads[1] is not threading.main_thread()
