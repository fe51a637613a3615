"""Multitask training of encoders, per-task fusion and heads on the synthetic cohort (plus the
real pbmc68k_reduced cells for cell types), written out as a bundle."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from multimed.models.bundle import Bundle, load_bundle, save_bundle
from multimed.models.catalog import CATALOG
from multimed.models.codecs.types import GeneCounts
from multimed.models.cohort.dataset import CohortTensors, TaskData, build_tensors
from multimed.models.cohort.synthetic import generate_cohort, load_pbmc68k
from multimed.models.config import Frozen, ModelConfig
from multimed.models.evaluate import calibration_report, evaluate, flagged_share, pooled, task_raw
from multimed.models.modalities.base import ModalityPipeline
from multimed.models.modalities.registry import build_pipelines
from multimed.models.model import Model
from multimed.models.outputs import output_of
from multimed.models.trust import fit_temperature

log = logging.getLogger(__name__)

REAL_CELLS = "pbmc68k_reduced"


class TrainSettings(Frozen):
    patients: int = Field(1500, ge=20)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    # Calibration temperatures and OOD thresholds are fitted here: never on the test split.
    validation_fraction: float = Field(0.15, gt=0, lt=0.5)
    seed: int = 0
    epochs: int = Field(12, ge=1)  # ~3.5 min on 2 CPU cores with the default cohort
    batch_size: int = Field(32, ge=2)
    lr: float = Field(2e-3, gt=0)
    tasks: tuple[str, ...] = tuple(CATALOG.tasks)
    modalities: tuple[str, ...] = tuple(CATALOG.modalities)
    real_cells: bool = True  # also train/evaluate cell types on scanpy's pbmc68k_reduced
    # Modality dropout, so every subset a request may carry is seen in training.
    drop_optional: float = Field(0.3, ge=0, le=1)
    drop_alternative: float = Field(0.4, ge=0, le=1)  # each present member of an any-of group
    drop_required: float = Field(0.1, ge=0, le=1)  # lets ablations (e.g. VQA image-only) be fair


def _answerable(task: str, modalities: set[str]) -> bool:
    spec = CATALOG.task(task)
    return set(spec.all_of) <= modalities and (
        not spec.any_of or bool(modalities & set(spec.any_of))
    )


def modality_dropout(task: TaskData, present: Tensor, s: TrainSettings, gen) -> Tensor:
    spec = task.spec
    p = torch.tensor(
        [
            s.drop_required
            if m in spec.all_of
            else s.drop_alternative
            if m in spec.any_of
            else s.drop_optional
            for m in spec.accepted
        ]
    )
    keep = present & (torch.rand(present.shape, generator=gen) >= p)
    # Never leave an item with nothing, nor with no member of a required any-of group.
    group = torch.tensor([m in spec.any_of for m in spec.accepted])
    if group.any():
        lost = ~(keep & group).any(1)
        keep[lost] |= present[lost] & group
    empty = ~keep.any(1)
    keep[empty] = present[empty]
    return keep


def real_cell_tensors(pipelines: dict[str, ModalityPipeline]) -> CohortTensors:
    counts, labels = load_pbmc68k()
    scrna = pipelines["scrna"]
    batch = scrna.collate([scrna.preprocess(GeneCounts(c)) for c in counts])
    spec = CATALOG.task("cell_type_classification")
    present = torch.tensor([[m == "scrna" for m in spec.accepted]] * len(labels))
    target = torch.as_tensor(labels, dtype=torch.long)
    task = TaskData(spec, {"scrna": "scrna"}, present, present, target)
    return CohortTensors({"scrna": batch}, {spec.id: task}, len(labels))


@dataclass(frozen=True)
class Split:
    train: Tensor
    validation: Tensor
    test: Tensor


def split(n: int, settings: TrainSettings) -> Split:
    """A deterministic train / validation / test split of n items."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(settings.seed))
    n_test = max(1, round(n * settings.test_fraction))
    n_val = max(1, round(n * settings.validation_fraction))
    return Split(order[n_test + n_val :], order[n_test : n_test + n_val], order[:n_test])


@dataclass
class Prepared:
    """The cohort tensors and their deterministic split, from the settings alone."""

    data: CohortTensors
    split: Split
    real: CohortTensors | None = None
    real_split: Split | None = None

    def evaluate(self, model: Model) -> dict:
        metrics = evaluate(model, self.data, self.split.train, self.split.test)
        metrics["calibration"] = calibration_report(model, self.data, self.split.test)
        metrics["out_of_distribution"] = {
            m: {"threshold": round(float(model.task_models.novelty[m].threshold), 4)}
            | flagged_share(model, [(self.data, self.split.test)], m)
            for m in self.modalities()
        }
        if self.real is not None:
            real = evaluate(model, self.real, self.real_split.train, self.real_split.test)
            metrics["real_data"] = {REAL_CELLS: real["tasks"]}
        return metrics

    def modalities(self) -> list[str]:
        return sorted({m for task in self.data.tasks.values() for m in task.sources})

    def fit_trust(self, model: Model) -> None:
        """Per task the temperature, per modality the OOD statistics (training embeddings) and
        threshold (validation embeddings); the real cells count as in-distribution too."""
        model.eval()
        for t, task in self.data.tasks.items():
            raw, target = task_raw(model, self.data, task, self.split.validation)
            model.task_models.tasks[t].temperature.fill_(
                fit_temperature(output_of(task.spec), raw, target)
            )
        train = [(self.data, self.split.train)]
        validation = [(self.data, self.split.validation)]
        if self.real is not None:  # pooled() takes from each part the modalities it has
            train.append((self.real, self.real_split.train))
            validation.append((self.real, self.real_split.validation))
        for m in self.modalities():
            model.task_models.novelty[m].fit(pooled(model, train, m), pooled(model, validation, m))


def prepare(settings: TrainSettings, pipelines: dict[str, ModalityPipeline]) -> Prepared:
    tasks = [t for t in settings.tasks if _answerable(t, set(pipelines))]
    started = time.monotonic()
    cohort = generate_cohort(settings.patients, settings.seed)
    log.info("cohort of %d generated in %.1fs", len(cohort), time.monotonic() - started)
    data = build_tensors(cohort, pipelines, tasks)
    prepared = Prepared(data, split(data.n, settings))
    if settings.real_cells and "cell_type_classification" in tasks:
        prepared.real = real_cell_tensors(pipelines)
        prepared.real_split = split(prepared.real.n, settings)
    log.info("tensors ready in %.1fs", time.monotonic() - started)
    return prepared


def train(out: Path, settings: TrainSettings, config: ModelConfig) -> Bundle:
    torch.manual_seed(settings.seed)
    np.random.seed(settings.seed)
    started = time.monotonic()
    all_pipelines = build_pipelines(config)
    pipelines = {m: all_pipelines[m] for m in settings.modalities}
    prep = prepare(settings, pipelines)
    data, train_idx, real = prep.data, prep.split.train, prep.real
    model = Model(all_pipelines, config)
    trainable = [p for m in pipelines for p in model.encoders[m].parameters()]
    trainable += list(model.task_models.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(train_idx) / settings.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, settings.lr, total_steps=settings.epochs * steps_per_epoch, pct_start=0.15
    )
    gen = torch.Generator().manual_seed(settings.seed)
    model.train()
    for epoch in range(settings.epochs):
        order = train_idx[torch.randperm(len(train_idx), generator=gen)]
        epoch_loss = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * settings.batch_size : (step + 1) * settings.batch_size]
            total = _step_loss(model, data, idx, settings, gen)
            if real is not None:
                pick = torch.randint(len(prep.real_split.train), (len(idx),), generator=gen)
                ridx = prep.real_split.train[pick]
                total = total + _step_loss(model, real, ridx, settings, gen)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            nn.utils.clip_grad_norm_(trainable, 2.0)
            optimizer.step()
            schedule.step()
            epoch_loss += total.item()
        log.info(
            "epoch %d/%d loss %.3f (%.0fs)",
            epoch + 1,
            settings.epochs,
            epoch_loss / steps_per_epoch,
            time.monotonic() - started,
        )
    train_seconds = time.monotonic() - started

    prep.fit_trust(model)
    metrics = prep.evaluate(model)
    held = prep.split
    info = {
        "training": {
            "data": f"synthetic cohort: {settings.patients} patients, seed {settings.seed}, "
            f"{len(held.validation)} for validation, {len(held.test)} held out"
            + (
                f"; {REAL_CELLS}: {real.n} real cells, {len(prep.real_split.test)} held out"
                if real is not None
                else ""
            ),
            "settings": settings.model_dump(mode="json"),
            "trained_tasks": list(data.tasks),
            "trained_modalities": list(pipelines),
            "seconds": round(train_seconds, 1),
        },
        "metrics": metrics,
    }
    encoders = {m: model.encoders[m].state_dict() for m in all_pipelines}
    return save_bundle(out, config, encoders, model.task_models.state_dict(), info)


def _step_loss(model: Model, data: CohortTensors, idx: Tensor, s: TrainSettings, gen) -> Tensor:
    total = torch.zeros(())
    for task in data.tasks.values():
        # Train on every modality the patient has (a VQA lesion shows on all their images),
        # dropped at random so that each subset a request may carry is seen.
        present = modality_dropout(task, task.available[idx], s, gen)
        raw = model.task_outputs(data, task, idx, present)
        total = total + output_of(task.spec).loss(raw, task.target[idx])
    return total


def train_default(out: Path, tasks: Sequence[str] | None = None) -> Bundle:
    settings = TrainSettings() if tasks is None else TrainSettings(tasks=tuple(tasks))
    return train(out, settings, ModelConfig())


def evaluate_bundle(path: Path) -> dict:
    """Re-create the bundle's held-out split from its recorded settings and evaluate it."""
    bundle = load_bundle(path)
    settings = TrainSettings.model_validate(bundle.manifest["training"]["settings"])
    model = Model.from_bundle(bundle)
    return prepare(settings, {m: model.pipelines[m] for m in settings.modalities}).evaluate(model)
