"""The data plane without Ray: coalescing, admission and deadlines, the audit line, the embedding
cache and its content keys, fusion grouping, and Open Inference Protocol request decoding."""

from __future__ import annotations

import asyncio
import json
import logging

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as oip

from multimed.models.catalog import CATALOG, InputForm, OutputKind
from multimed.models.config import ModelConfig
from multimed.models.errors import InputError, Overloaded
from multimed.models.inputs import RawInput
from multimed.models.modalities.registry import build_pipelines
from multimed.models.outputs import Prediction
from multimed.services.admission import Admission, Pace
from multimed.services.audit import AuditLog, task_label
from multimed.services.cache import EmbeddingCache, content_key
from multimed.services.coalesce import Coalescer
from multimed.services.config import GatewaySettings
from multimed.services.dataplane import CallInfo, DataPlane
from multimed.services.errors import ProtocolError, Status
from multimed.services.frontends.oip.convert import request_from_wire
from multimed.services.frontends.oip.models import Models
from multimed.services.router import group_calls
from multimed.services.triton import encoder_signature
from multimed.services.types import Embedding, PredictCall, PredictResult


def run(coroutine):
    return asyncio.run(coroutine)


class Recorder:
    """A router stand-in that answers each call with a result carrying its request id, or an
    input error for ids starting with "bad"."""

    def __init__(self, delay_s: float = 0.0):
        self.batches: list[list[str]] = []
        self.delay_s = delay_s

    async def predict_many(self, calls):
        self.batches.append([c.request_id for c in calls])
        await asyncio.sleep(self.delay_s)
        return [
            InputError("xray", "bad pixels") if c.request_id.startswith("bad") else result(c)
            for c in calls
        ]


def result(call: PredictCall) -> PredictResult:
    prediction = Prediction(OutputKind.SINGLE_LABEL, ("a", "b"), [0.9, 0.1], ["a"])
    return PredictResult(call.request_id, call.task, prediction, ("xray",), (), "v", 1.0, 1.0)


def call(request_id: str, task: str = "bone_age_classification") -> PredictCall:
    return PredictCall(request_id, task, ())


# --- coalescing ---


def test_coalescer_sends_a_lone_call_at_once_and_gathers_the_rest_while_busy():
    router = Recorder(delay_s=0.05)

    async def scenario():
        coalescer = Coalescer(router.predict_many, max_batch=3, slots=1)
        return await asyncio.gather(*(coalescer.submit(call(f"c{i}")) for i in range(6)))

    assert [r.request_id for r in run(scenario())] == [f"c{i}" for i in range(6)]
    # the first goes alone (idle server), then batches of at most 3 while one is in flight
    assert router.batches == [["c0"], ["c1", "c2", "c3"], ["c4", "c5"]]


def test_coalescer_fails_one_item_not_its_batch():
    router = Recorder()

    async def scenario():
        coalescer = Coalescer(router.predict_many, max_batch=8, slots=1)
        return await asyncio.gather(
            *(coalescer.submit(call(i)) for i in ("ok1", "bad", "ok2")), return_exceptions=True
        )

    ok1, bad, ok2 = run(scenario())
    assert (ok1.request_id, ok2.request_id) == ("ok1", "ok2")
    assert isinstance(bad, InputError) and "bad pixels" in str(bad)


def test_coalescer_drops_callers_who_gave_up_before_sending():
    router = Recorder(delay_s=0.05)

    async def scenario():
        coalescer = Coalescer(router.predict_many, max_batch=8, slots=1)
        first = asyncio.ensure_future(coalescer.submit(call("first")))
        await asyncio.sleep(0)  # first is in flight; the next ones wait
        gone = asyncio.ensure_future(coalescer.submit(call("gone")))
        kept = asyncio.ensure_future(coalescer.submit(call("kept")))
        await asyncio.sleep(0)
        gone.cancel()
        return (await first).request_id, (await kept).request_id

    assert run(scenario()) == ("first", "kept")
    assert router.batches == [["first"], ["kept"]]


def test_coalescer_answers_every_caller_when_the_router_fails_or_miscounts():
    async def broken(calls):
        raise ConnectionError("router down")

    async def short(calls):
        return []  # an answer short of the calls sent

    async def scenario(send):
        coalescer = Coalescer(send, max_batch=8, slots=1)
        return await asyncio.gather(
            *(coalescer.submit(call(f"c{i}")) for i in range(2)), return_exceptions=True
        )

    assert all(isinstance(r, ConnectionError) for r in run(scenario(broken)))
    assert all(isinstance(r, RuntimeError) for r in run(scenario(short)))


# --- admission, deadlines, audit ---


def plane(router=None, **settings) -> DataPlane:
    manifest = {"version": "test"}
    return DataPlane(router or Recorder(), GatewaySettings(**settings), manifest, AuditLog())


def info(timeout_s: float = 5.0, request_id: str = "r1") -> CallInfo:
    return CallInfo("Predict", request_id, "token:test", timeout_s)


def test_deadline_exceeded_and_overload_map_to_their_statuses():
    dp = plane(max_in_flight=1)

    async def slow(deadline):
        await asyncio.sleep(1)

    async def scenario():
        late = await dp.run(info(timeout_s=0.05), "bone_age_classification", ["xray"], slow)
        first = asyncio.ensure_future(dp.run(info(), "bone_age_classification", [], slow))
        await asyncio.sleep(0.01)
        refused = await dp.run(info(), "bone_age_classification", [], slow)
        first.cancel()
        return late, refused

    late, refused = run(scenario())
    assert late.status is Status.DEADLINE_EXCEEDED
    assert refused.status is Status.RESOURCE_EXHAUSTED and "overloaded" in refused.message


def test_admission_counts_items_and_refuses_a_queue_that_would_outlast_the_deadline():
    dp = plane(max_in_flight=8)

    async def quick(deadline):
        return "done"

    async def scenario():
        too_many = await dp.run(info(), "bone_age_classification", [], quick, items=9)
        fits = await dp.run(info(), "bone_age_classification", [], quick, items=8)
        return too_many, fits

    too_many, fits = run(scenario())
    assert too_many.status is Status.RESOURCE_EXHAUSTED and "limit of 8" in too_many.message
    assert fits.status is Status.OK
    pace = Pace()
    assert pace.wait_s(1000) == 0.0  # no pace yet: nothing to refuse for
    for _ in range(40):
        pace.done(1)
    assert pace.wait_s(1000) > 1.0  # 40 done in well under a second: 1000 queued take longer


def test_calls_stuck_on_one_encoder_are_no_queue_ahead_of_calls_for_another():
    """500 scRNA calls wait on an encoder whose replica is gone while X-ray completes 50 a
    second: X-ray calls and further scRNA calls are still admitted (scRNA's lane has no pace
    to refuse by); a queue within X-ray's own lane past 0.8 of a deadline is refused."""
    admission = Admission(max_in_flight=1024)
    for _ in range(500):
        admission.admit(1, 30.0, ("scrna",))
    for _ in range(100):  # X-ray's pace: 100 done just now
        admission.admit(1, 30.0, ("xray",))
        admission.release(1, True, ("xray",))
    admission.admit(1, 0.5, ("xray",))
    admission.admit(1, 30.0, ("scrna",))
    assert admission.in_flight == 502
    # 100 done in under 0.1 s (a pace read over 0.1 s at least): 400 queued take 0.4 s
    with pytest.raises(Overloaded, match="queue ahead"):
        for _ in range(500):
            admission.admit(1, 0.5, ("xray",))


def test_request_ids_round_trip_in_metadata_and_stay_bounded_and_distinct():
    assert DataPlane.request_id("", "patient-Müller") == "patient-M%C3%BCller"
    long_a, long_b = DataPlane.request_id("x" * 500 + "a"), DataPlane.request_id("x" * 500 + "b")
    assert len(long_a) == len(long_b) == 128 and long_a != long_b
    assert all(c.isascii() and c.isprintable() and c != " " for c in long_a)
    assert len(DataPlane.request_id("", None)) == 32  # none sent: a new one


def test_predict_through_the_plane_is_coalesced_and_errors_keep_their_message():
    dp = plane(coalesce_slots=1)

    async def scenario():
        async def work(request_id):
            return await dp.predict(call(request_id))

        return await asyncio.gather(
            *(
                dp.run(
                    info(request_id=r), "bone_age_classification", ["xray"], lambda d, r=r: work(r)
                )
                for r in ("a", "bad-1")
            )
        )

    ok, bad = run(scenario())
    assert ok.status is Status.OK
    assert bad.status is Status.INVALID_ARGUMENT and bad.message == "xray: bad pixels"


def test_one_audit_line_per_call_without_payloads(caplog):
    dp = plane()
    secret = "Jane Doe 1957-03-02"

    async def fails(deadline):
        raise InputError("text", "something wrong")

    with caplog.at_level(logging.INFO, logger="multimed.audit"):
        outcome = run(dp.run(info(request_id="r\u00e9q-1\n"), secret, ["text", secret], fails))
    assert outcome.status is Status.INVALID_ARGUMENT
    (line,) = [json.loads(r.getMessage()) for r in caplog.records if r.name == "multimed.audit"]
    assert line["request_id"] == "rq-1"  # printable ASCII only
    assert line["task"] == "unknown" and line["modalities"] == ["text", "unknown"]
    assert (line["method"], line["caller"], line["code"]) == (
        "Predict",
        "token:test",
        "INVALID_ARGUMENT",
    )
    assert secret not in caplog.text


def test_metric_and_audit_labels_are_tasks_encoder_models_or_unknown():
    assert task_label("disease_classification") == "disease_classification"
    assert task_label("encoder_xray") == "encoder_xray"  # an Open Inference Protocol model
    assert task_label("") == ""  # Embed names no task
    assert task_label("encoder_Jane Doe") == "unknown"


# --- embedding cache and content keys ---


def embedding(value: float) -> Embedding:
    return Embedding(np.full(4, value, dtype=np.float32), None, np.zeros(2, np.float32))


def test_embedding_cache_evicts_the_least_recently_used_and_can_be_off():
    cache = EmbeddingCache(2)
    cache.put(("v", "a"), embedding(1))
    cache.put(("v", "b"), embedding(2))
    assert cache.get(("v", "a")) is not None  # a is now the most recent
    cache.put(("v", "c"), embedding(3))
    assert cache.get(("v", "b")) is None and len(cache) == 2
    off = EmbeddingCache(0)
    off.put(("v", "a"), embedding(1))
    assert off.get(("v", "a")) is None


def test_embedding_cache_is_bounded_by_bytes_and_keeps_copies():
    each = embedding(0).pooled.nbytes + embedding(0).descriptor.nbytes
    cache = EmbeddingCache(100, max_bytes=2 * each)
    sent = embedding(1)
    cache.put(("v", "a"), sent)
    cache.put(("v", "b"), embedding(2))
    cache.put(("v", "c"), embedding(3))
    assert cache.get(("v", "a")) is None and len(cache) == 2
    assert cache.bytes == 2 * each
    cache.put(("v", "a"), sent)
    kept = cache.get(("v", "a"))  # copies: no view of a request's buffer kept alive
    assert kept.pooled is not sent.pooled and kept.descriptor is not sent.descriptor


def test_content_keys_follow_content_form_and_modality():
    image = np.zeros((1, 8, 8), np.float32)
    key = content_key(RawInput("xray", InputForm.TENSOR, image))
    assert key == content_key(RawInput("xray", InputForm.TENSOR, image.copy()))
    assert key != content_key(RawInput("oct", InputForm.TENSOR, image))
    assert key != content_key(RawInput("xray", InputForm.TENSOR, image.astype(np.float64)))
    assert key != content_key(RawInput("xray", InputForm.TENSOR, image.reshape(1, 4, 16)))
    counts = RawInput("scrna", InputForm.GENE_COUNTS, {"CD3E": 1.0, "LYZ": 2.0})
    reordered = RawInput("scrna", InputForm.GENE_COUNTS, {"LYZ": 2.0, "CD3E": 1.0})
    assert content_key(counts) == content_key(reordered)
    series = content_key(RawInput("ct", InputForm.DICOM_SERIES, [b"ab", b"c"]))
    assert series != content_key(RawInput("ct", InputForm.DICOM_SERIES, [b"a", b"bc"]))


def test_fusion_groups_by_task_modalities_and_explain():
    calls = [
        PredictCall("1", "disease_classification", ()),
        PredictCall("2", "disease_classification", ()),
        PredictCall("3", "disease_classification", (), explain=True),
        PredictCall("4", "disease_classification", ()),
        PredictCall("5", "bone_age_classification", ()),
        PredictCall("6", "disease_classification", ()),
    ]
    present = [
        {"xray": 1},
        {"xray": 1},
        {"xray": 1},
        {"xray": 1, "ct": 1},
        {"xray": 1},
        InputError("xray", "bad"),
    ]
    assert group_calls(calls, present) == {
        ("disease_classification", ("xray",), False): [0, 1],
        ("disease_classification", ("xray",), True): [2],
        ("disease_classification", ("ct", "xray"), False): [3],
        ("bone_age_classification", ("xray",), False): [4],
    }


# --- Open Inference Protocol request decoding ---


@pytest.fixture(scope="module")
def models() -> Models:
    config = ModelConfig()
    signatures = {
        m: encoder_signature(m, p.model_input(), config.embed_dim)
        for m, p in build_pipelines(config).items()
    }
    return Models(signatures, max_batch_size=8)


def infer_request(model: str, *inputs: tuple[str, str, list[int], bytes]):
    request = oip.ModelInferRequest(model_name=model)
    for name, datatype, shape, raw in inputs:
        request.inputs.append(
            oip.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
        )
        request.raw_input_contents.append(raw)
    return request


def xray_tensor(batch: int = 2, value: float = 0.5) -> tuple[str, str, list[int], bytes]:
    array = np.full((batch, 1, 64, 64), value, dtype="<f4")
    return ("xray", "FP32", list(array.shape), array.tobytes())


def bytes_tensor(name: str, *items: bytes) -> tuple[str, str, list[int], bytes]:
    raw = b"".join(len(b).to_bytes(4, "little") + b for b in items)
    return (name, "BYTES", [len(items), 1], raw)


def test_oip_request_decodes_into_per_item_inputs(models):
    model = models.get("disease_classification")
    request = infer_request(
        model.name, xray_tensor(2), bytes_tensor("text_text", b"cough", b"fever")
    )
    decoded = request_from_wire(model, request, models.max_batch_size)
    assert len(decoded.items) == 2
    xray, text = decoded.items[1]
    assert (xray.modality, xray.form, xray.data.shape) == ("xray", "preprocessed", (1, 64, 64))
    assert (text.form, text.data) == (InputForm.TEXT, b"fever")
    assert [o.name for o in decoded.outputs] == ["scores", "labels", "ood_score", "ood_flag"]


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ((("xray", "FP64", [1, 1, 64, 64], b"\0" * 8 * 4096),), "datatype FP64, expected FP32"),
        ((xray_tensor(1), bytes_tensor("xray_dicom", b"x")), "both carry xray"),
        ((xray_tensor(2), bytes_tensor("text_text", b"a")), "has batch size 1"),
        ((bytes_tensor("text_text", b"a"),), "inputs for xray: 'xray' or 'xray_dicom'"),
        ((xray_tensor(9),), "this model takes 1..8"),
        ((("xray", "FP32", [1, 1, 64, 64], b"\0" * 12),), "needs 16384 bytes, got 12"),
        ((("nope", "FP32", [1], b"\0" * 4),), "has no input 'nope'"),
    ],
)
def test_oip_request_errors_name_the_tensor(models, inputs, message):
    model = models.get("disease_classification")
    with pytest.raises(ProtocolError, match=message.replace("(", r"\(").replace(")", r"\)")):
        request_from_wire(model, infer_request(model.name, *inputs), models.max_batch_size)


def test_oip_item_errors_say_which_input_and_item(models):
    model = models.get("cell_type_classification")
    request = infer_request(model.name, bytes_tensor("scrna_gene_counts", b"{}", b"{not json"))
    with pytest.raises(InputError, match=r"input 'scrna_gene_counts', item 1"):
        request_from_wire(model, request, models.max_batch_size)


def test_every_task_and_encoder_is_a_model(models):
    assert set(models) == set(CATALOG.tasks) | {f"encoder_{m}" for m in CATALOG.modalities}
