"""The report's summaries over seeds: intervals that cover the truth, paired differences."""

import math

import torch

from multimed.models.catalog import CATALOG
from multimed.models.evaluate import interval
from multimed.models.outputs import output_of
from multimed.models.report import Scored, summarise

TASK = "breast_cancer_classification"


def _runs(accuracies, n: int = 400, flip_seed: int = 0) -> list[Scored]:
    """One seed per accuracy: a 2-class model right on exactly that share of n items (which
    ones: by flip_seed)."""
    out = []
    for s, accuracy in enumerate(accuracies):
        gen = torch.Generator().manual_seed(100 * s + flip_seed)
        target = torch.randint(2, (n,), generator=gen)
        right = torch.randperm(n, generator=gen) < round(accuracy * n)
        predicted = torch.where(right, target, 1 - target)
        out.append(Scored(TASK, torch.eye(2)[predicted], target))
    return out


def _binomial_width(accuracies, n: int) -> float:
    """The normal 95 % interval's width for the mean of these seeds' accuracies on n items."""
    variance = sum(p * (1 - p) / n for p in accuracies) / len(accuracies) ** 2
    return 2 * 1.96 * math.sqrt(variance)


def test_each_seed_is_reported_and_the_interval_is_of_their_mean():
    """Seeds of different accuracy: each is reported as itself, the mean is theirs, and the
    interval, bootstrapped over every seed's items, is around their mean (not one seed's) with
    the width sampling gives it, so it narrows as items grow."""
    truths = (0.7, 0.8, 0.9)
    widths = {}
    for n in (100, 1600):
        row = summarise(_runs(truths, n))
        assert row["seeds"] == list(truths) and row["mean"] == 0.8
        lo, hi = row["interval"]
        assert 0.7 < lo < 0.8 < hi < 0.9, (n, row)
        widths[n] = hi - lo
        assert 0.7 < widths[n] / _binomial_width(truths, n) < 1.3, (n, row)
    assert widths[1600] < widths[100] / 2.5  # ~1/sqrt(16)


def test_one_models_interval_has_the_binomial_width():
    """A single model's bootstrap interval (evaluate.interval) around its accuracy p on n items
    is about 2 * 1.96 * sqrt(p (1 - p) / n) wide, whatever the items."""
    output = output_of(CATALOG.task(TASK))
    for flip_seed in range(3):
        for n in (100, 1600):
            (run,) = _runs((0.8,), n, flip_seed)
            lo, hi = interval(output, run.raw, run.target)
            assert lo < 0.8 < hi, (n, lo, hi)
            assert 0.75 < (hi - lo) / _binomial_width((0.8,), n) < 1.25, (n, lo, hi)


def test_a_paired_difference_sees_what_two_unpaired_intervals_cannot():
    """The same items scored by two models, one right on 1 % more of them: the paired interval
    excludes 0 though each model's own intervals overlap."""
    a = _runs((0.8, 0.8, 0.8), n=2000)
    b = []
    for run in a:
        predicted = run.raw.argmax(-1).clone()
        wrong = torch.nonzero(predicted != run.target).flatten()
        predicted[wrong[: len(run.target) // 100]] = run.target[wrong[: len(run.target) // 100]]
        b.append(Scored(run.task, torch.eye(2)[predicted], run.target))
    difference = summarise(b, against=a)
    assert abs(difference["mean"] - 0.01) < 1e-6
    assert difference["interval"][0] > 0
    assert summarise(a)["interval"][1] > summarise(b)["interval"][0]  # overlap unpaired
    same = summarise(a, against=a)
    assert same["mean"] == 0 and same["interval"] == [0, 0]
