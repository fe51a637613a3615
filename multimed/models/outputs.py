"""Output kinds as strategies: one object per catalog `OutputKind` carrying all that differs
between kinds (the head's input, loss, predictions, metric, baseline, and how labels are encoded
for training and for labels.json). Callers look a kind up with `output_of` and never branch on
it; a new kind is its catalog value plus one object here.

Shapes: raw head outputs are [B, n] for n labels, or [B, L, n] for per-token kinds; targets are
what `targets` builds from the synthetic cohort's labels (see `cohort.synthetic.Patient`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from multimed.models.catalog import OutputKind, TaskSpec

IGNORE = -100  # target of the padding positions of per-token tasks


@dataclass(frozen=True)
class Prediction:
    """One item's task output in the shared output kinds."""

    kind: OutputKind
    labels: tuple[str, ...]
    scores: list[float] | list[list[float]]  # per label (REGRESSION: the values); per token
    predicted: list[str]  # top label (single/answer), labels over threshold (multi), per-token


@dataclass(frozen=True)
class Output(ABC):
    """What one output kind does, from the head's input to its metric."""

    kind: OutputKind
    per_token: ClassVar[bool] = False  # raw outputs and scores carry a token axis
    predicts_labels: ClassVar[bool] = True  # `Prediction.predicted` names labels
    # Scores are probabilities from logits, so a temperature calibrates them (models/trust.py).
    calibrated: ClassVar[bool] = True

    def score_dims(self, n_labels: int) -> tuple[int, ...]:
        """One item's raw output (and scores) shape; -1 where the length varies."""
        return (n_labels,)

    def head_width(self, dim: int) -> int:
        """Input width of the head for fused embeddings of width `dim`."""
        return dim

    def head_input(self, fused: Tensor, tokens: Tensor | None) -> Tensor:
        """What the head reads: fused [B, D] (per-token kinds add tokens [B, L, D])."""
        return fused

    def cat(self, chunks: Sequence[Tensor]) -> Tensor:
        """Raw outputs of consecutive batches -> one."""
        return torch.cat(chunks)

    @abstractmethod
    def targets(self, labels: Sequence[object]) -> Tensor:
        """The cohort's labels of N items -> the training target tensor."""

    @abstractmethod
    def to_json(self, label: object, names: tuple[str, ...]) -> object:
        """One item's label in the cohort's encoding -> by name, for labels.json."""

    @abstractmethod
    def loss(self, raw: Tensor, target: Tensor) -> Tensor: ...

    @abstractmethod
    def predictions(
        self, labels: tuple[str, ...], raw: Tensor, token_mask: Tensor | None = None
    ) -> list[Prediction]:
        """Raw outputs [B, ...] -> B predictions (`token_mask` [B, L]: True at real tokens)."""

    @abstractmethod
    def metric(self, raw: Tensor, target: Tensor) -> float: ...

    @abstractmethod
    def baseline(self, train: Tensor, test: Tensor) -> float:
        """The metric of a predictor that ignores its inputs, fitted on the training targets."""

    def events(self, raw: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """-> (probability, outcome) per scored event, both [E], outcome 0/1: what calibration
        compares (ECE, Brier). Kinds without probabilities have none."""
        raise NotImplementedError(f"{self.kind} scores are not probabilities")


class SingleLabel(Output):
    """One of n labels (a closed answer vocabulary too); scored by accuracy."""

    def targets(self, labels):
        return torch.tensor(labels, dtype=torch.long)

    def to_json(self, label, names):
        return names[label]

    def loss(self, raw, target):
        return nn.functional.cross_entropy(raw, target)

    def predictions(self, labels, raw, token_mask=None):
        out = []
        for i in range(raw.shape[0]):
            p = raw[i].softmax(-1)
            out.append(Prediction(self.kind, labels, p.tolist(), [labels[int(p.argmax())]]))
        return out

    def metric(self, raw, target):
        return float((raw.argmax(-1) == target).float().mean())

    def baseline(self, train, test):
        majority = torch.bincount(train).argmax()
        return float((test == majority).float().mean())

    def events(self, raw, target):
        return _top_label(raw, target)


def _top_label(raw: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """The top label's probability, and whether it was right."""
    p = raw.softmax(-1)
    return p.max(-1).values, (p.argmax(-1) == target).float()


def _float_rows(labels: Sequence[object]) -> Tensor:
    return torch.tensor(np.stack([np.asarray(v, dtype=np.float32) for v in labels]))


class MultiLabel(Output):
    """Any subset of n labels (multi-hot targets); scored by macro AUROC."""

    def targets(self, labels):
        return _float_rows(labels)

    def to_json(self, label, names):
        return [name for name, on in zip(names, label, strict=True) if on]

    def loss(self, raw, target):
        # Summed over labels, each a binary task of its own: the mean over five findings gave
        # the task a fifth of a single-label task's weight (validation AUROC 0.89 -> 0.93).
        per_label = nn.functional.binary_cross_entropy_with_logits(
            raw, target.float(), reduction="none"
        )
        return per_label.sum(-1).mean()

    def predictions(self, labels, raw, token_mask=None):
        out = []
        for i in range(raw.shape[0]):
            p = raw[i].sigmoid()
            chosen = [lab for lab, s in zip(labels, p.tolist(), strict=True) if s >= 0.5]
            out.append(Prediction(self.kind, labels, p.tolist(), chosen))
        return out

    def metric(self, raw, target):
        # Imported here: scikit-learn costs most of a second, and serving never scores.
        from sklearn.metrics import roc_auc_score

        return float(roc_auc_score(target.numpy(), raw.numpy(), average="macro"))

    def baseline(self, train, test):
        return self.metric(torch.full(test.shape, 0.5), test)

    def events(self, raw, target):
        return raw.sigmoid().flatten(), target.float().flatten()  # each label a yes/no


class Regression(Output):
    """A value per label; the scores are the values; scored by R²."""

    predicts_labels = False
    calibrated = False

    def targets(self, labels):
        return _float_rows(labels)

    def to_json(self, label, names):
        return [float(v) for v in label]

    def loss(self, raw, target):
        return nn.functional.mse_loss(raw, target)

    def predictions(self, labels, raw, token_mask=None):
        return [Prediction(self.kind, labels, raw[i].tolist(), []) for i in range(raw.shape[0])]

    def metric(self, raw, target):
        from sklearn.metrics import r2_score  # see MultiLabel.metric

        return float(r2_score(target.numpy(), raw.numpy()))

    def baseline(self, train, test):
        return self.metric(train.mean(0).expand(test.shape[0], -1), test)


class PerToken(Output):
    """One of n labels per token of the task's `token_modality`; scored by per-token accuracy.
    Targets are padded with IGNORE to the longest item; raw outputs are as long as their
    batch's longest item, so targets are cut to the raw length before use."""

    per_token = True

    def score_dims(self, n_labels):
        return (-1, n_labels)

    def head_width(self, dim):
        return dim * 2

    def head_input(self, fused, tokens):
        # Each token sees its own embedding plus the whole-input summary.
        context = fused.unsqueeze(1).expand(-1, tokens.shape[1], -1)
        return torch.cat([tokens, context], -1)

    def cat(self, chunks):
        longest = max(c.shape[1] for c in chunks)
        return torch.cat([nn.functional.pad(c, (0, 0, 0, longest - c.shape[1])) for c in chunks])

    def targets(self, labels):
        longest = max(len(v) for v in labels)
        out = torch.full((len(labels), longest), IGNORE, dtype=torch.long)
        for i, v in enumerate(labels):
            out[i, : len(v)] = torch.as_tensor(np.asarray(v), dtype=torch.long)
        return out

    def to_json(self, label, names):
        return "".join(names[i] for i in label)

    def loss(self, raw, target):
        target = target[:, : raw.shape[1]]
        mask = target >= 0
        return nn.functional.cross_entropy(raw[mask], target[mask])

    def predictions(self, labels, raw, token_mask=None):
        out = []
        for i in range(raw.shape[0]):
            tokens = raw[i] if token_mask is None else raw[i][token_mask[i]]
            p = tokens.softmax(-1)
            out.append(Prediction(self.kind, labels, p.tolist(), [labels[j] for j in p.argmax(-1)]))
        return out

    def metric(self, raw, target):
        target = target[:, : raw.shape[1]]
        mask = target >= 0
        return float((raw.argmax(-1)[mask] == target[mask]).float().mean())

    def baseline(self, train, test):
        majority = torch.bincount(train[train >= 0]).argmax()
        mask = test >= 0
        return float((test[mask] == majority).float().mean())

    def events(self, raw, target):
        target = target[:, : raw.shape[1]]
        mask = target >= 0
        return _top_label(raw[mask], target[mask])


def _register(*outputs: Output) -> dict[OutputKind, Output]:
    registry: dict[OutputKind, Output] = {}
    for output in outputs:
        if output.kind in registry:
            raise ValueError(f"duplicate output kind {output.kind!r}")
        registry[output.kind] = output
    missing = set(OutputKind) - set(registry)
    if missing:
        raise ValueError(f"output kinds without a strategy: {sorted(missing)}")
    return registry


OUTPUTS = _register(
    SingleLabel(OutputKind.SINGLE_LABEL),
    MultiLabel(OutputKind.MULTI_LABEL),
    Regression(OutputKind.REGRESSION),
    PerToken(OutputKind.PER_TOKEN),
    SingleLabel(OutputKind.ANSWER),  # an answer is one label of a closed vocabulary
)


def output_of(spec_or_kind: TaskSpec | OutputKind) -> Output:
    kind = spec_or_kind.output if isinstance(spec_or_kind, TaskSpec) else spec_or_kind
    return OUTPUTS[kind]
