"""Tensors for training and evaluation: every modality of a cohort preprocessed once (and its
frozen features computed once), labels stacked per task, and which inputs each task's request
would carry."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from multimed.models.catalog import CATALOG, TaskSpec
from multimed.models.cohort.synthetic import Patient, task_inputs
from multimed.models.modalities.base import Batch, ModalityPipeline
from multimed.models.outputs import output_of

FEATURE_CHUNK = 256  # items per frozen-feature pass (bounds memory for the text backbone)


def source_key(modality: str, field: str) -> str:
    return modality if field == "inputs" else f"{modality}:{field}"


@dataclass
class TaskData:
    spec: TaskSpec
    sources: dict[str, str]  # modality -> key into CohortTensors.inputs
    present: Tensor  # [N, len(spec.accepted)] bool: the modality is in the task's request
    available: Tensor  # [N, len(spec.accepted)] bool: the patient has it (training may use it)
    target: Tensor


@dataclass(frozen=True)
class Split:
    """Item indices for training, validation (calibration, OOD thresholds) and test."""

    train: Tensor
    validation: Tensor
    test: Tensor


@dataclass
class CohortTensors:
    inputs: dict[str, Batch]  # source key -> batch over all N patients
    tasks: dict[str, TaskData]
    n: int


def _encode_all(pipeline: ModalityPipeline, decoded: Sequence[object]) -> Batch:
    batch = pipeline.collate([pipeline.preprocess(d) for d in decoded])
    with torch.no_grad():
        chunks = [
            pipeline.features({k: v[i : i + FEATURE_CHUNK] for k, v in batch.items()})
            for i in range(0, len(decoded), FEATURE_CHUNK)
        ]
    return {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}


def _field(patient: Patient, value: object) -> str:
    """Which of the patient's fields a task input comes from (the note or the VQA question)."""
    # By identity: `task_inputs` hands out the question object itself, and `==` against an
    # image array would compare element-wise.
    return "question" if value is patient.question else "inputs"


def build_tensors(
    patients: Sequence[Patient],
    pipelines: dict[str, ModalityPipeline],
    tasks: Sequence[str],
) -> CohortTensors:
    requests = {t: [task_inputs(p, t) for p in patients] for t in tasks}
    sources: dict[str, tuple[str, str]] = {}  # key -> (modality, field)
    task_data = {}
    for t in tasks:
        spec = CATALOG.task(t)
        usable = [m for m in spec.accepted if m in pipelines]
        present = torch.tensor(
            [[m in req for m in spec.accepted] for req in requests[t]], dtype=torch.bool
        )
        task_sources = {}
        for m in usable:
            fields = {
                _field(p, req[m]) for p, req in zip(patients, requests[t], strict=True) if m in req
            }
            (field,) = fields or {"inputs"}
            task_sources[m] = source_key(m, field)
            sources[task_sources[m]] = (m, field)
        usable_mask = torch.tensor([m in pipelines for m in spec.accepted])
        available = torch.tensor([[m in p.inputs for m in spec.accepted] for p in patients])
        labels = [p.labels[t] for p in patients]
        task_data[t] = TaskData(
            spec,
            task_sources,
            present & usable_mask,
            available & usable_mask,
            output_of(spec).targets(labels),
        )
    inputs = {}
    for key, (m, field) in sources.items():
        decoded = [p.question if field == "question" else p.inputs[m] for p in patients]
        inputs[key] = _encode_all(pipelines[m], decoded)
    return CohortTensors(inputs, task_data, len(patients))


def select(batch: Batch, idx: Tensor) -> Batch:
    return {k: v[idx] for k, v in batch.items()}
