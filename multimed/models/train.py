"""Multitask training of encoders, per-task fusion and heads on the synthetic cohort (plus the
real pbmc68k_reduced cells for cell types), written out as a bundle."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from multimed.models.bundle import Bundle, load_bundle, save_bundle
from multimed.models.catalog import CATALOG
from multimed.models.cohort.dataset import CohortTensors, Split, TaskData, build_tensors
from multimed.models.cohort.real import RealPart, real_parts
from multimed.models.cohort.synthetic import Patient, generate_cohort
from multimed.models.config import Frozen, ModelConfig
from multimed.models.evaluate import (
    calibration_report,
    evaluate,
    flagged_share,
    novelty_inputs,
    task_raw,
)
from multimed.models.modalities.base import ModalityPipeline
from multimed.models.modalities.registry import build_pipelines
from multimed.models.model import Model
from multimed.models.outputs import output_of
from multimed.models.trust import fit_temperature

log = logging.getLogger(__name__)
CLIP_NORM = 2.0  # per encoder and per task model (see fit)


class TrainSettings(Frozen):
    patients: int = Field(1500, ge=20)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    # Calibration temperatures and OOD thresholds are fitted here: never on the test split.
    validation_fraction: float = Field(0.15, gt=0, lt=0.5)
    seed: int = 0
    # ~4 min on 2 CPU cores with the default cohort. 20 rather than 12: on validation (seed 0)
    # findings AUROC 0.80 -> 0.89, expression R² 0.53 -> 0.67, motor imagery 0.84 -> 0.90.
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(32, ge=2)
    lr: float = Field(2e-3, gt=0)
    tasks: tuple[str, ...] = tuple(CATALOG.tasks)
    modalities: tuple[str, ...] = tuple(CATALOG.modalities)
    # Also train and evaluate on the real data of the tasks (cohort/real.py): cell types on
    # scanpy's pbmc68k_reduced, secondary structure on MDAnalysisTests' protein chains.
    real_data: bool = True
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
    patients: list[Patient]  # the synthetic cohort, whose latent state gives the ceilings
    real: dict[str, RealPart] = field(default_factory=dict)

    def evaluate(self, model: Model) -> dict:
        tested = [self.patients[i] for i in self.split.test]
        metrics = evaluate(model, self.data, self.split.train, self.split.test, tested)
        metrics["calibration"] = calibration_report(model, self.data, self.split.test)
        metrics["out_of_distribution"] = {
            m: {"threshold": round(float(model.task_models.novelty[m].threshold), 4)}
            | flagged_share(model, [(self.data, self.split.test)], m)
            for m in self.modalities()
        }
        if self.real:
            metrics["real_data"] = {name: _evaluate_real(model, p) for name, p in self.real.items()}
        return metrics

    def modalities(self) -> list[str]:
        return sorted({m for task in self.data.tasks.values() for m in task.sources})

    def restricted(self, tasks: Sequence[str], modalities: Sequence[str]) -> Prepared:
        """The same cohort and split for fewer tasks and modalities (one left out is never
        sent, in training or in evaluation): the separately trained models of a comparison."""
        allowed = set(modalities)

        def narrow(task: TaskData) -> TaskData:
            mask = torch.tensor([m in allowed for m in task.spec.accepted])
            sources = {m: key for m, key in task.sources.items() if m in allowed}
            return TaskData(
                task.spec, sources, task.present & mask, task.available & mask, task.target
            )

        kept = {t: narrow(self.data.tasks[t]) for t in tasks if t in self.data.tasks}
        real = {n: p for n, p in self.real.items() if p.task in kept and p.modality in allowed}
        return replace(self, data=CohortTensors(self.data.inputs, kept, self.data.n), real=real)

    def fit_trust(self, model: Model) -> None:
        """Per task the temperature, per modality the OOD statistics (training embeddings) and
        threshold (validation embeddings); the real data counts as in distribution too."""
        model.eval()
        for t, task in self.data.tasks.items():
            raw, target = task_raw(model, self.data, task, self.split.validation)
            model.task_models.tasks[t].temperature.fill_(
                fit_temperature(output_of(task.spec), raw, target)
            )
        # novelty_inputs() takes from each part what it has; real data is in distribution too
        train = [(self.data, self.split.train)]
        train += [(p.data, p.split.train) for p in self.real.values()]
        validation = [(self.data, self.split.validation)]
        validation += [(p.data, p.split.validation) for p in self.real.values()]
        for m in self.modalities():
            model.task_models.novelty[m].fit(
                novelty_inputs(model, train, m), novelty_inputs(model, validation, m)
            )


def prepare(settings: TrainSettings, pipelines: dict[str, ModalityPipeline]) -> Prepared:
    tasks = [t for t in settings.tasks if _answerable(t, set(pipelines))]
    started = time.monotonic()
    cohort = generate_cohort(settings.patients, settings.seed)
    log.info("cohort of %d generated in %.1fs", len(cohort), time.monotonic() - started)
    data = build_tensors(cohort, pipelines, tasks)
    prepared = Prepared(data, split(data.n, settings), cohort)
    if settings.real_data:
        prepared.real = real_parts(pipelines, tasks)
    log.info("tensors ready in %.1fs", time.monotonic() - started)
    return prepared


def seeded_model(pipelines: dict[str, ModalityPipeline], config: ModelConfig, seed: int) -> Model:
    """A fresh model whose initial weights (and dropout draws after) follow the seed."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    return Model(pipelines, config)


def fit(prep: Prepared, settings: TrainSettings, model: Model) -> float:
    """Train the encoders of the prepared tasks' modalities, their fusions and heads, then fit
    calibration and OOD statistics on validation. -> training seconds."""
    started = time.monotonic()
    data, train_idx = prep.data, prep.split.train
    # Gradients are clipped per encoder and per task model: clipped all together, one task's
    # large gradient shrank every other's step (summing the findings loss over its labels cost
    # motor imagery 0.90 -> 0.76 on validation until the clipping was split).
    groups = [list(model.encoders[m].parameters()) for m in prep.modalities()]
    groups += [list(t.parameters()) for t in model.task_models.tasks.values()]
    trainable = [p for group in groups for p in group]
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
            for part in prep.real.values():
                # At most a quarter of a small real set per step (41 training chains).
                n = min(len(idx), max(1, len(part.split.train) // 4))
                pick = torch.randint(len(part.split.train), (n,), generator=gen)
                total = total + _step_loss(model, part.data, part.split.train[pick], settings, gen)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            for group in groups:
                nn.utils.clip_grad_norm_(group, CLIP_NORM)
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
    seconds = time.monotonic() - started
    prep.fit_trust(model)
    return seconds


def train(out: Path, settings: TrainSettings, config: ModelConfig) -> Bundle:
    all_pipelines = build_pipelines(config)
    prep = prepare(settings, {m: all_pipelines[m] for m in settings.modalities})
    model = seeded_model(all_pipelines, config, settings.seed)
    train_seconds = fit(prep, settings, model)
    metrics = prep.evaluate(model)
    held = prep.split
    info = {
        "training": {
            "data": f"synthetic cohort: {settings.patients} patients, seed {settings.seed}, "
            f"{len(held.validation)} for validation, {len(held.test)} held out"
            + "".join(
                f"; {name}: {p.data.n} real items, {len(p.split.test)} held out"
                for name, p in prep.real.items()
            ),
            "settings": settings.model_dump(mode="json"),
            "trained_tasks": list(prep.data.tasks),
            "trained_modalities": prep.modalities(),
            "seconds": round(train_seconds, 1),
        },
        "metrics": metrics,
    }
    encoders = {m: model.encoders[m].state_dict() for m in all_pipelines}
    return save_bundle(out, config, encoders, model.task_models.state_dict(), info)


def _evaluate_real(model: Model, part: RealPart) -> dict:
    """The task's row on the real test split, with the logistic regression beside it."""
    rows = evaluate(model, part.data, part.split.train, part.split.test)["tasks"]
    rows[part.task]["logistic_regression"] = round(part.baseline(), 4)
    return rows


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
