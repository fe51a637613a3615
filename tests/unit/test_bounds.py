"""Bodies too costly to parse are refused by counting first: a map over its limit never reaches
protobuf's full parse (which holds the GIL for the whole map)."""

import asyncio

import pytest
from tritonclient.grpc import service_pb2 as oip

from multimed.models.modalities.scrna import MAX_GENES
from multimed.services.frontends.bounds import BodyRefused, map_limit
from multimed.services.frontends.guard import INLINE_BYTES, parse
from multimed.v1 import multimed_pb2 as pb

LIMIT = 1000


def _refusal(field: str, entries: int) -> str:
    return f"{field}: {entries} entries"


def _predict(genes: int, text: str = "") -> bytes:
    request = pb.PredictRequest(task="cell_type_classification")
    if text:
        request.inputs.add(modality="text", text=text)
    request.inputs.add(modality="scrna").gene_counts.counts.update(
        {f"G{i}": 1.0 for i in range(genes)}
    )
    return request.SerializeToString()


def test_a_map_within_the_limit_passes_and_other_fields_are_skipped():
    map_limit(pb.PredictRequest, LIMIT, _refusal)(_predict(LIMIT, text="not a map"))


def test_a_map_over_the_limit_is_refused_wherever_it_is_nested():
    with pytest.raises(BodyRefused, match=f"^counts: {LIMIT + 1} entries$"):
        map_limit(pb.PredictRequest, LIMIT, _refusal)(_predict(LIMIT + 1, text="first"))
    infer = oip.ModelInferRequest(model_name="encoder_text")
    tensor = infer.inputs.add(name="text_text", datatype="BYTES", shape=[1])
    for i in range(LIMIT + 1):
        tensor.parameters[f"p{i}"].bool_param = True
    with pytest.raises(BodyRefused, match=f"^parameters: {LIMIT + 1} entries$"):
        map_limit(oip.ModelInferRequest, LIMIT, _refusal)(infer.SerializeToString())


def test_a_body_that_does_not_parse_is_left_to_the_parse():
    map_limit(pb.PredictRequest, LIMIT, _refusal)(b"\xff\xff\xff")


def test_a_message_without_maps_has_nothing_to_bound():
    with pytest.raises(ValueError, match="no maps"):
        map_limit(pb.GetCatalogRequest, LIMIT, _refusal)


def test_the_guard_refuses_a_large_body_before_parsing_it():
    check = map_limit(pb.PredictRequest, MAX_GENES, _refusal)
    body = _predict(MAX_GENES + 1)
    assert len(body) > INLINE_BYTES
    parsed = []

    def deserializer(data):
        parsed.append(data)
        return pb.PredictRequest.FromString(data)

    with pytest.raises(ValueError, match=f"^counts: {MAX_GENES + 1} entries$"):
        asyncio.run(parse(deserializer, body, "multimed.v1.PredictRequest", check))
    assert not parsed
    ok = asyncio.run(parse(deserializer, _predict(10_000), "multimed.v1.PredictRequest", check))
    assert len(ok.inputs[0].gene_counts.counts) == 10_000
