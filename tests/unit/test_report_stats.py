"""The report's summaries over seeds: intervals that cover the truth, paired differences."""

import torch

from multimed.models.report import Scored, summarise


def _runs(accuracy: float, n: int = 400, seeds: int = 3, flip_seed: int = 0) -> list[Scored]:
    """Seeds of a 2-class model right on `accuracy` of n items (which ones: by flip_seed)."""
    out = []
    for s in range(seeds):
        gen = torch.Generator().manual_seed(100 * s + flip_seed)
        target = torch.randint(2, (n,), generator=gen)
        right = torch.rand(n, generator=gen) < accuracy
        predicted = torch.where(right, target, 1 - target)
        out.append(Scored("breast_cancer_classification", torch.eye(2)[predicted], target))
    return out


def test_the_interval_covers_the_true_accuracy_and_narrows_with_items():
    small, large = summarise(_runs(0.8, n=100)), summarise(_runs(0.8, n=1600))
    for row in (small, large):
        lo, hi = row["interval"]
        assert lo < 0.8 < hi and lo <= row["mean"] <= hi and len(row["seeds"]) == 3
    width = {k: r["interval"][1] - r["interval"][0] for k, r in (("s", small), ("l", large))}
    assert width["l"] < width["s"] / 2.5  # ~1/sqrt(16)


def test_a_paired_difference_sees_what_two_unpaired_intervals_cannot():
    """The same items scored by two models, one right on 1 % more of them: the paired interval
    excludes 0 though each model's own intervals overlap."""
    a = _runs(0.80, n=2000)
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
