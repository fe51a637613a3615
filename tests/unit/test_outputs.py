"""Every output kind through its strategy: head shape, predictions, loss, metric, baseline."""

import numpy as np
import pytest
import torch

from multimed.models.catalog import CATALOG, OutputKind
from multimed.models.cohort.synthetic import generate_cohort
from multimed.models.heads import Head
from multimed.models.outputs import OUTPUTS, output_of

DIM = 16


@pytest.fixture(scope="module")
def cohort():
    return generate_cohort(40, seed=1)


def _spec(kind: OutputKind):
    return next(spec for spec in CATALOG.tasks.values() if spec.output is kind)


def _fits(shape: tuple[int, ...], dims: tuple[int, ...]) -> bool:
    return len(shape) == len(dims) and all(d in (-1, s) for s, d in zip(shape, dims, strict=True))


def test_every_kind_has_one_strategy():
    assert set(OUTPUTS) == set(OutputKind)
    for kind, output in OUTPUTS.items():
        assert output.kind is kind and output_of(kind) is output
    for spec in CATALOG.tasks.values():
        assert output_of(spec) is OUTPUTS[spec.output]


@pytest.mark.parametrize("kind", list(OutputKind))
def test_score_dims_match_head_and_predictions(kind):
    spec, output = _spec(kind), output_of(kind)
    dims = output.score_dims(len(spec.labels))
    assert (-1 in dims) == output.per_token
    torch.manual_seed(0)
    raw = Head(spec, DIM)(torch.randn(3, DIM), torch.randn(3, 5, DIM))
    assert _fits(tuple(raw.shape[1:]), dims)
    predictions = output.predictions(spec.labels, torch.randn(raw.shape))
    assert len(predictions) == 3
    for p in predictions:
        assert p.kind is kind and p.labels == spec.labels
        assert _fits(np.shape(p.scores), dims)
        assert set(p.predicted) <= set(spec.labels)
        assert output.predicts_labels or p.predicted == []  # regression: scores are values


@pytest.mark.parametrize("kind", list(OutputKind))
def test_loss_is_finite_and_perfect_predictions_score_best(kind, cohort):
    spec, output = _spec(kind), output_of(kind)
    n = len(spec.labels)
    target = output.targets([p.labels[spec.id] for p in cohort])
    torch.manual_seed(0)
    tokens = torch.randn(len(cohort), target.shape[-1], DIM) if output.per_token else None
    raw = Head(spec, DIM)(torch.randn(len(cohort), DIM), tokens)
    loss = output.loss(raw, target)
    assert loss.ndim == 0 and torch.isfinite(loss)
    if target.dtype == torch.long:  # class indices: logits peaked at the true class
        perfect = 10.0 * torch.nn.functional.one_hot(target.clamp(min=0), n).float()
    else:  # multi-hot or values: the targets themselves rank and fit perfectly
        perfect = target.clone()
    assert output.metric(perfect, target) == pytest.approx(1.0)  # accuracy, AUROC, R²: best is 1
    assert output.metric(raw.detach(), target) < 1.0
    assert output.baseline(target[:30], target[30:]) < 1.0
