"""Real labelled data, trained and evaluated beside the synthetic cohort: scanpy's pbmc68k_reduced
cells (cell types) and the protein chains MDAnalysisTests ships, with DSSP labels (secondary
structure). Each has a fixed split and a logistic-regression baseline on that split, the floor a
learned encoder should clear on real data."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from multimed.models.catalog import CATALOG
from multimed.models.codecs.types import GeneCounts
from multimed.models.cohort.chains import baseline_q3, load_real_chains, split_chains
from multimed.models.cohort.dataset import CohortTensors, Split, TaskData
from multimed.models.cohort.synthetic import load_pbmc68k, pbmc_split
from multimed.models.modalities.base import ModalityPipeline
from multimed.models.outputs import output_of


@dataclass(frozen=True)
class RealPart:
    """One real dataset as tensors for its one task and modality, with its split."""

    task: str
    modality: str
    data: CohortTensors
    split: Split
    baseline: Callable[[], float]  # the logistic regression's metric on the test split


def _tensors(
    pipeline: ModalityPipeline, task: str, decoded: Sequence, labels: list
) -> CohortTensors:
    spec = CATALOG.task(task)
    modality = pipeline.modality
    batch = pipeline.collate([pipeline.preprocess(d) for d in decoded])
    present = torch.tensor([[m == modality for m in spec.accepted]] * len(decoded))
    target = output_of(spec).targets(labels)
    part = TaskData(spec, {modality: modality}, present, present, target)
    return CohortTensors({modality: batch}, {task: part}, len(decoded))


def _split(*parts: Sequence[int]) -> Split:
    return Split(*(torch.as_tensor(np.asarray(p, np.int64)) for p in parts))


def pbmc_cells(pipelines: dict[str, ModalityPipeline]) -> RealPart:
    """700 real cells; the split is fixed, as the generator draws its cells from its training
    part (`synthetic.pbmc_split`)."""
    counts, labels = load_pbmc68k()
    task = "cell_type_classification"
    data = _tensors(pipelines["scrna"], task, [GeneCounts(c) for c in counts], list(labels))
    train, validation, test = pbmc_split()

    def baseline() -> float:
        from sklearn.linear_model import LogisticRegression

        x = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)  # the usual log-normalisation
        fitted = LogisticRegression(max_iter=2000).fit(x[train], labels[train])
        return float((fitted.predict(x[test]) == labels[test]).mean())

    return RealPart(task, "scrna", data, _split(train, validation, test), baseline)


def pdb_chains(pipelines: dict[str, ModalityPipeline]) -> RealPart:
    """64 real chains, split by sequence family (`chains.split_chains`)."""
    chains = load_real_chains()
    task = "protein_structure_prediction"
    data = _tensors(
        pipelines["protein"],
        task,
        [c.sequence for c in chains],
        [np.array(c.labels) for c in chains],  # writable copies for torch
    )
    index = {c.name: i for i, c in enumerate(chains)}
    train, validation, test = split_chains(chains)
    parts = ([index[c.name] for c in part] for part in (train, validation, test))
    return RealPart(task, "protein", data, _split(*parts), lambda: baseline_q3(train, test))


# name -> (its task, how to build it): built only when that task is trained
REAL_DATA: dict[str, tuple[str, Callable[[dict[str, ModalityPipeline]], RealPart]]] = {
    "pbmc68k_reduced": ("cell_type_classification", pbmc_cells),
    "pdb_chains": ("protein_structure_prediction", pdb_chains),
}


def real_parts(pipelines: dict[str, ModalityPipeline], tasks: Sequence[str]) -> dict[str, RealPart]:
    """The real datasets of the tasks being trained."""
    return {name: build(pipelines) for name, (task, build) in REAL_DATA.items() if task in tasks}
