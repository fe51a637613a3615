"""multimed.v1 wire messages <-> the internal, protocol-free types (inputs: `inputs.py`)."""

from __future__ import annotations

import json

from multimed.models.catalog import CATALOG, CATALOG_VERSION, OutputKind
from multimed.models.outputs import output_of
from multimed.services.frontends.multimed_v1.inputs import input_from_wire, tensor_to_wire
from multimed.services.types import Embedding, PredictCall, PredictResult
from multimed.v1 import multimed_pb2 as pb

OUTPUT_KINDS = {
    OutputKind.SINGLE_LABEL: pb.OUTPUT_KIND_SINGLE_LABEL,
    OutputKind.MULTI_LABEL: pb.OUTPUT_KIND_MULTI_LABEL,
    OutputKind.REGRESSION: pb.OUTPUT_KIND_REGRESSION,
    OutputKind.PER_TOKEN: pb.OUTPUT_KIND_PER_TOKEN_LABELS,
    OutputKind.ANSWER: pb.OUTPUT_KIND_ANSWER,
}


def request_from_wire(
    request: pb.PredictRequest, request_id: str, deadline: float | None
) -> PredictCall:
    return PredictCall(
        request_id=request_id,
        task=request.task,
        inputs=tuple(input_from_wire(i) for i in request.inputs),
        explain=request.explain,
        deadline=deadline,
    )


def response_to_wire(result: PredictResult, server_ms: float) -> pb.PredictResponse:
    p = result.prediction
    response = pb.PredictResponse(
        request_id=result.request_id,
        task=result.task,
        output_kind=OUTPUT_KINDS[p.kind],
        modalities_used=result.used,
        modalities_missing=result.missing,
        contributions=result.contributions,
        bundle_version=result.bundle_version,
        timing=pb.Timing(server_ms=server_ms, encode_ms=result.encode_ms, fuse_ms=result.fuse_ms),
        out_of_distribution={
            m: pb.OutOfDistribution(score=o.score, threshold=o.threshold, flagged=o.flagged)
            for m, o in result.out_of_distribution.items()
        },
    )
    if output_of(p.kind).per_token:  # scores per position: [L, labels]
        for position, (label, scores) in enumerate(zip(p.predicted, p.scores, strict=True)):
            response.tokens.append(
                pb.TokenPrediction(
                    position=position,
                    label=label,
                    scores=[
                        pb.LabelScore(label=n, score=s)
                        for n, s in zip(p.labels, scores, strict=True)
                    ],
                )
            )
    else:
        response.scores.extend(
            pb.LabelScore(label=n, score=s) for n, s in zip(p.labels, p.scores, strict=True)
        )
        response.predicted.extend(p.predicted)
    return response


def embedding_to_wire(request_id: str, modality: str, e: Embedding, version: str):
    response = pb.EmbedResponse(
        request_id=request_id,
        modality=modality,
        embedding=tensor_to_wire(e.pooled),
        bundle_version=version,
    )
    if e.tokens is not None:
        response.token_embeddings.CopyFrom(tensor_to_wire(e.tokens))
    return response


def catalog_to_wire() -> pb.Catalog:
    doc = pb.Catalog(catalog_version=CATALOG_VERSION)
    for m in CATALOG.modalities.values():
        doc.modalities.append(
            pb.ModalityInfo(
                id=m.id,
                description=m.description,
                forms=sorted(m.forms),
                emits_tokens=m.emits_tokens,
            )
        )
    for t in CATALOG.tasks.values():
        doc.tasks.append(
            pb.TaskInfo(
                id=t.id,
                description=t.description,
                all_of=t.all_of,
                any_of=t.any_of,
                optional=t.optional,
                output_kind=OUTPUT_KINDS[t.output],
                labels=t.labels,
                metric=t.metric,
            )
        )
    return doc


def model_info_to_wire(manifest: dict) -> pb.ModelInfo:
    config = manifest["config"]
    return pb.ModelInfo(
        bundle_version=manifest["version"],
        catalog_version=manifest["catalog_version"],
        fusion=config["fusion"],
        encoder_size=config["size"],
        embed_dim=config["embed_dim"],
        encoder_versions={
            f.split("/")[1].removesuffix(".safetensors"): digest
            for f, digest in manifest["files"].items()
            if f.startswith("encoders/")
        },
        training_json=json.dumps(
            {"training": manifest.get("training"), "metrics": manifest.get("metrics")}
        ),
    )
