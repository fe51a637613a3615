"""Tensors for training and evaluation: every modality of a cohort preprocessed once (and its
frozen features computed once), labels stacked per task, and which inputs each task's request
would carry."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from multimed.models.catalog import CATALOG, OutputKind, TaskSpec
from multimed.models.data.synthetic import Patient, task_inputs
from multimed.models.modalities.base import Batch, ModalityPipeline

FEATURE_CHUNK = 256  # items per frozen-feature pass (bounds memory for the text backbone)
IGNORE = -100  # label of padding positions in per-token tasks


def source_key(modality: str, field: str) -> str:
    return modality if field == "inputs" else f"{modality}:{field}"


@dataclass
class TaskData:
    spec: TaskSpec
    sources: dict[str, str]  # modality -> key into CohortTensors.inputs
    present: Tensor  # [N, len(spec.accepted)] bool: the modality is in the task's request
    available: Tensor  # [N, len(spec.accepted)] bool: the patient has it (training may use it)
    target: Tensor


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


def _targets(spec: TaskSpec, labels: list[object]) -> Tensor:
    if spec.output in (OutputKind.SINGLE_LABEL, OutputKind.ANSWER):
        return torch.tensor(labels, dtype=torch.long)
    if spec.output in (OutputKind.MULTI_LABEL, OutputKind.REGRESSION):
        return torch.tensor(np.stack([np.asarray(v, dtype=np.float32) for v in labels]))
    longest = max(len(v) for v in labels)
    out = torch.full((len(labels), longest), IGNORE, dtype=torch.long)
    for i, v in enumerate(labels):
        out[i, : len(v)] = torch.as_tensor(np.asarray(v), dtype=torch.long)
    return out


def _field(patient: Patient, modality: str, value: object) -> str:
    """Which of the patient's fields a task input comes from (the note or the VQA question)."""
    if modality == "text" and value == patient.question:
        return "question"
    return "inputs"


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
                _field(p, m, req[m])
                for p, req in zip(patients, requests[t], strict=True)
                if m in req
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
            _targets(spec, labels),
        )
    inputs = {}
    for key, (m, field) in sources.items():
        decoded = [p.question if field == "question" else p.inputs[m] for p in patients]
        inputs[key] = _encode_all(pipelines[m], decoded)
    return CohortTensors(inputs, task_data, len(patients))


def select(batch: Batch, idx: Tensor) -> Batch:
    return {k: v[idx] for k, v in batch.items()}
