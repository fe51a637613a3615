"""`multimed export --format triton`: a Triton model repository with every encoder as ONNX
(`encoder_<modality>/1/model.onnx` + `config.pbtxt`), each checked against torch with
onnxruntime; and `multimed perf-data`: perf_analyzer input data from synthetic patients.

An exported encoder takes the modality's model-ready tensor (`TensorSpec`; the same input the
gateway's `encoder_<modality>` takes), so an encoder deployment with `backend: triton` works
against either. The text encoder's frozen MiniLM stage stays with the caller."""

from __future__ import annotations

import base64
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from google.protobuf import text_format
from torch import nn
from tritonclient.grpc import model_config_pb2 as mc

from multimed.models.bundle import load_bundle
from multimed.models.catalog import CATALOG
from multimed.models.cohort.synthetic import generate_cohort, task_inputs
from multimed.models.modalities.base import ModalityPipeline
from multimed.models.modalities.registry import build_pipeline
from multimed.services.triton import encoder_model, encoder_signature, model_config

ONNX_OPSET = 18  # the dynamo exporter's own; no version conversion
MAX_BATCH_SIZE = 64
QUEUE_DELAY_US = 0  # no wait for a batch to fill, as our own encoders (BatchConfig)
CHECK_PATIENTS = 5  # held out from the trace: other batch sizes (and sequence lengths)


class _ModelReady(nn.Module):
    """An encoder whose one input is its model-ready tensor: what Triton (and ONNX) can take."""

    def __init__(self, pipeline: ModalityPipeline):
        super().__init__()
        self.encoder = pipeline.encoder
        self.pipeline = pipeline

    def forward(self, tensor: torch.Tensor):
        out = self.encoder(self.pipeline.model_batch(tensor))
        if out.tokens is None:
            return out.pooled, out.descriptor
        return out.pooled, out.tokens, out.descriptor


def model_ready(pipeline: ModalityPipeline, decoded: Sequence[object]) -> torch.Tensor:
    """Decoded synthetic inputs -> their model-ready batch (padded for sequences)."""
    batch = pipeline.collate([pipeline.preprocess(d) for d in decoded])
    return pipeline.model_tensor(pipeline.featurise(batch))


def _decoded(modality: str, patients) -> list[object]:
    return [p.inputs[modality] for p in patients if modality in p.inputs]


def _name_outputs(graph, names: list[str]) -> None:
    """Give the graph's outputs the protocol's names, first renaming any inner value that
    already holds one (the genomics encoder's `embedding` op does)."""
    inner = {v.name: v for node in graph for v in node.outputs}
    for value, name in zip(graph.outputs, names, strict=True):
        clash = inner.get(name)
        if clash is not None and clash is not value:
            clash.name = f"{name}_inner"
        value.name = name


def _config(pipeline: ModalityPipeline, embed_dim: int) -> mc.ModelConfig:
    signature = encoder_signature(pipeline.modality, pipeline.model_input(), embed_dim)
    return model_config(
        encoder_model(pipeline.modality),
        [signature.input],
        signature.outputs,
        max_batch_size=MAX_BATCH_SIZE,
        platform="onnxruntime_onnx",
        queue_delay_us=QUEUE_DELAY_US,
    )


def _check(path: Path, pipeline: ModalityPipeline, tensor: torch.Tensor) -> float:
    """Max absolute difference between onnxruntime and torch on `tensor` (real tokens only)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {pipeline.modality: tensor.numpy()})
    with torch.inference_mode():
        want = pipeline.encoder(pipeline.model_batch(tensor))
    diff = float(np.abs(got[0] - want.pooled.numpy()).max())
    diff = max(diff, float(np.abs(got[-1] - want.descriptor.numpy()).max()))
    if want.tokens is not None:
        mask = want.token_mask.numpy()
        diff = max(diff, float(np.abs(got[1] - want.tokens.numpy())[mask].max()))
    return diff


def export_triton(bundle: Path, out: Path, seed: int = 0) -> dict[str, float]:
    """Write the repository; -> max |onnxruntime - torch| per encoder."""
    loaded = load_bundle(bundle)
    # Two patients to trace, the rest to check at another batch size (and sequence lengths).
    patients = generate_cohort(2 + CHECK_PATIENTS, seed=seed)
    report = {}
    for m in CATALOG.modalities:
        pipeline = build_pipeline(m, loaded.config).setup("cpu", loaded.encoder_state(m))
        decoded = _decoded(m, patients)
        example, held_out = model_ready(pipeline, decoded[:2]), model_ready(pipeline, decoded[2:])
        folder = out / encoder_model(m)
        (folder / "1").mkdir(parents=True, exist_ok=True)
        varying = {0: "batch"}
        if -1 in pipeline.model_input().shape:
            varying[1] = "length"
        config = _config(pipeline, loaded.config.embed_dim)
        outputs = [o.name for o in config.output]
        dims = {axis: torch.export.Dim.DYNAMIC for axis in varying}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                _ModelReady(pipeline).eval(),
                (example,),
                input_names=[m],
                dynamic_shapes={"tensor": dims},
                opset_version=ONNX_OPSET,
                dynamo=True,
                verbose=False,
            )
        _name_outputs(program.model.graph, outputs)
        program.save(str(folder / "1" / "model.onnx"))
        (folder / "config.pbtxt").write_text(text_format.MessageToString(config))
        report[m] = _check(folder / "1" / "model.onnx", pipeline, held_out)
    (out / "export.json").write_text(
        json.dumps({"bundle": loaded.version, "max_abs_diff": report}, indent=2)
    )
    return report


def perf_analyzer_data(bundle: Path, task: str, patients: int = 16, seed: int = 0) -> dict:
    """perf_analyzer's --input-data JSON for `task`: each entry one synthetic patient's
    model-ready tensors (base64, little-endian). perf_analyzer's own random bytes would hold NaN
    and Inf, which the server rejects, as it should."""
    loaded = load_bundle(bundle)
    spec = CATALOG.task(task)
    cohort = generate_cohort(patients, seed=seed)
    requests = [task_inputs(p, task) for p in cohort]
    data: list[dict] = [{} for _ in cohort]
    for m in spec.accepted:
        if not any(m in r for r in requests):
            continue
        pipeline = build_pipeline(m, loaded.config)
        for entry, request in zip(data, requests, strict=True):
            if m in request:
                array = model_ready(pipeline, [request[m]])[0].numpy()
                array = array.astype(array.dtype.newbyteorder("<"))
                entry[m] = {
                    "b64": base64.b64encode(array.tobytes()).decode(),
                    "shape": list(array.shape),
                }
    return {"data": data}
