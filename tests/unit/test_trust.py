"""Temperature scaling and the out-of-distribution score (models/trust.py) on data whose answer
is known: logits drawn at a known temperature, Gaussians shifted by a known amount."""

from __future__ import annotations

import math

import torch

from multimed.models.catalog import CATALOG, OutputKind
from multimed.models.config import ModelConfig
from multimed.models.modalities.base import EncoderOutput
from multimed.models.outputs import output_of
from multimed.models.tasks import TaskModels
from multimed.models.trust import Novelty, calibration, fit_temperature

SINGLE = output_of(OutputKind.SINGLE_LABEL)


def _overconfident(n: int, true_t: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose labels were drawn from softmax(logits / true_t): a model that much too sure."""
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randn(n, 5, generator=gen) * 3
    target = torch.multinomial((raw / true_t).softmax(-1), 1, generator=gen).squeeze(1)
    return raw, target


def test_the_fitted_temperature_is_the_one_the_labels_were_drawn_at():
    raw, target = _overconfident(20_000, true_t=2.5, seed=0)
    assert math.isclose(fit_temperature(SINGLE, raw, target), 2.5, rel_tol=0.05)


def test_calibration_lowers_ece_and_nll_on_held_out_outputs():
    raw, target = _overconfident(5_000, true_t=2.5, seed=1)
    t = fit_temperature(SINGLE, raw, target)
    held_raw, held_target = _overconfident(5_000, true_t=2.5, seed=2)
    before, after = (
        calibration(SINGLE, held_raw, held_target),
        calibration(SINGLE, held_raw / t, held_target),
    )
    assert after["ece"] < before["ece"] / 3
    assert after["nll"] < before["nll"] and after["brier"] < before["brier"]
    assert after["ece"] < 0.02


def test_regression_keeps_temperature_one():
    raw = torch.randn(50, 3)
    assert fit_temperature(output_of(OutputKind.REGRESSION), raw, raw) == 1.0


def test_novelty_accepts_95_percent_and_flags_a_shift():
    gen = torch.Generator().manual_seed(3)
    scale = torch.linspace(0.5, 2, 16)
    train, validation, test = (torch.randn(n, 16, generator=gen) * scale for n in (4000, 2000, 999))
    novelty = Novelty()
    assert not any(f.flagged for f in novelty.flags(test * 100))  # unfitted: nothing flagged
    novelty.fit(train, validation)
    in_distribution = sum(f.flagged for f in novelty.flags(test)) / len(test)
    assert 0.03 < in_distribution < 0.07
    shifted = novelty.flags(test + 2 * scale)  # two standard deviations on every axis
    assert sum(f.flagged for f in shifted) / len(test) > 0.99
    noisier = novelty(test * 1.5).mean()
    assert noisier > novelty(test).mean() * 1.3  # more noise, higher score


def test_novelty_statistics_travel_in_a_state_dict():
    """Fitted, its statistics are sized by the features; a fresh one loads them (a bundle)."""
    gen = torch.Generator().manual_seed(4)
    train, validation = torch.randn(500, 24, generator=gen), torch.randn(200, 24, generator=gen)
    train[:, 5] = 1.0  # a dead unit: constant in training, it must not divide by zero
    fitted = Novelty()
    fitted.fit(train, validation[:, :24])
    loaded = Novelty()
    loaded.load_state_dict(fitted.state_dict())
    probe = torch.randn(7, 24, generator=gen)
    assert torch.isfinite(fitted(probe)).all()
    torch.testing.assert_close(loaded(probe), fitted(probe))
    assert float(loaded.threshold) == float(fitted.threshold)


def test_served_scores_are_divided_by_the_task_temperature():
    tasks = TaskModels(ModelConfig()).eval()
    task = "bone_age_classification"
    outputs = {"xray": EncoderOutput(torch.randn(2, ModelConfig().embed_dim))}
    raw = tasks.tasks[task]({"xray": outputs["xray"].pooled}, {"xray": torch.ones(2, dtype=bool)})
    tasks.tasks[task].temperature.fill_(3.0)
    served = torch.tensor([p.scores for p in tasks.predict(task, outputs)])
    assert torch.allclose(served, (raw / 3.0).softmax(-1), atol=1e-6)
    assert CATALOG.task(task).output == OutputKind.SINGLE_LABEL
