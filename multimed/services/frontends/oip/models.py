"""The protocol's view of the catalog: every task, named by its id, and every encoder as
`encoder_<modality>`. A modality is one input in its model-ready form (the encoder signature's
input) plus one BYTES input per raw wire form, named `<modality>_<form>` (`xray_dicom`, `eeg_edf`,
`text_text`). All inputs are optional to the protocol: a request sends one form per modality, and
the task's catalog entry says which modalities it needs. Shapes lead with the batch dimension."""

from __future__ import annotations

import json
from dataclasses import dataclass

from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as oip

from multimed.models.catalog import CATALOG, InputForm, TaskSpec
from multimed.models.errors import shown
from multimed.models.outputs import output_of
from multimed.services.errors import ModelNotFound, ProtocolError
from multimed.services.triton import EncoderSignature, TensorInfo, encoder_model, model_config

VERSION = "1"  # one version of each model: the bundle being served
# Raw wire forms as BYTES inputs; per item one element, a series one element per file.
RAW_FORMS = {
    InputForm.TEXT: (1,),
    InputForm.IMAGE: (1,),
    InputForm.DICOM: (1,),
    InputForm.DICOM_SERIES: (-1,),
    InputForm.EDF: (1,),
    InputForm.SEQUENCE: (1,),
    InputForm.GENE_COUNTS: (1,),  # a JSON object, gene -> count
}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    task: TaskSpec | None  # None: an encoder
    modalities: tuple[str, ...]
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]

    def input(self, name: str) -> TensorInfo:
        for t in self.inputs:
            if t.name == name:
                return t
        known = ", ".join(t.name for t in self.inputs)
        raise ProtocolError(f"model {self.name!r} has no input {shown(name)}; inputs: {known}")

    def alternatives(self, modality: str) -> str:
        return " or ".join(repr(t.name) for t in self.inputs if t.modality == modality)


class Models:
    """Every task and every encoder of the served bundle."""

    def __init__(self, signatures: dict[str, EncoderSignature], max_batch_size: int):
        self.max_batch_size = max_batch_size
        self.by_name: dict[str, ModelSpec] = {}
        # Each task's catalog entry as ModelConfig's `parameters["task"]`, serialised once.
        self.task_entries = {t["id"]: json.dumps(t) for t in CATALOG.to_json()["tasks"]}
        for task in CATALOG.tasks.values():
            kind = output_of(task.output)
            outputs = [TensorInfo("scores", "FP32", kind.score_dims(len(task.labels)))]
            if kind.predicts_labels:
                outputs.append(TensorInfo("labels", "BYTES", (-1,)))
            # Per accepted modality, in the task's order (its catalog entry): the OOD score
            # (NaN where the request carried none) and whether it is flagged.
            width = (len(task.accepted),)
            outputs += [
                TensorInfo("ood_score", "FP32", width),
                TensorInfo("ood_flag", "BOOL", width),
            ]
            inputs = [t for m in task.accepted for t in _modality_inputs(signatures[m])]
            self._add(ModelSpec(task.id, task, task.accepted, tuple(inputs), tuple(outputs)))
        for m, signature in signatures.items():
            inputs = tuple(_modality_inputs(signature))
            self._add(ModelSpec(encoder_model(m), None, (m,), inputs, signature.outputs))

    def _add(self, model: ModelSpec) -> None:
        self.by_name[model.name] = model

    def __iter__(self):
        return iter(self.by_name)

    def __contains__(self, name: str) -> bool:
        return name in self.by_name

    def get(self, name: str, version: str = "") -> ModelSpec:
        model = self.by_name.get(name)
        if model is None:
            raise ModelNotFound(f"unknown model {shown(name)}; models: {', '.join(self.by_name)}")
        if version not in ("", VERSION):
            raise ModelNotFound(f"model {name!r} has no version {shown(version)} (versions: 1)")
        return model

    def metadata(self, model: ModelSpec) -> oip.ModelMetadataResponse:
        def tensor(t: TensorInfo):
            return oip.ModelMetadataResponse.TensorMetadata(
                name=t.name, datatype=t.datatype, shape=[-1, *t.dims]
            )

        return oip.ModelMetadataResponse(
            name=model.name,
            versions=[VERSION],
            platform="multimed",
            inputs=[tensor(t) for t in model.inputs],
            outputs=[tensor(t) for t in model.outputs],
        )

    def config(self, model: ModelSpec) -> mc.ModelConfig:
        """Every input optional (one form per modality is sent); batching is dynamic (requests
        are coalesced with no fixed wait); a task's catalog entry in `parameters["task"]`."""
        parameters = {} if model.task is None else {"task": self.task_entries[model.task.id]}
        return model_config(
            model.name,
            model.inputs,
            model.outputs,
            max_batch_size=self.max_batch_size,
            platform="multimed",
            optional_inputs=True,
            parameters=parameters,
        )


def _modality_inputs(signature: EncoderSignature) -> list[TensorInfo]:
    m = signature.modality
    raw = [
        TensorInfo(f"{m}_{form}", "BYTES", RAW_FORMS[form], m, form)
        for form in sorted(CATALOG.modality(m).forms)
        if form in RAW_FORMS
    ]
    return [signature.input, *raw]
