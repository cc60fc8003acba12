"""Continual-learning metrics: pure functions of the accuracy matrix (no Lightning, no torch).

``R[i][j]`` is the score (accuracy, or macro-F1) on task ``j`` after training task ``i`` (0-based, T tasks in the
order they were trained); ``b[j]`` is the score on task ``j`` before any training (seeded fresh adapters and heads).
Metrics that need two tasks (BWT, FWT, forgetting) are ``None`` for a one-task sequence. Negative values are never
clamped: negative transfer and negative forgetting (a task improving later) are results.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mtl.errors import MTLConfigError


def _mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


@dataclass(frozen=True)
class AccuracyMatrix:
    """R (T x T) for tasks in training order, b (before training) and each task's test size.

    ``source`` names where the scores come from (a run folder or file) in the error for a non-finite score.
    """

    tasks: tuple[str, ...]
    after: tuple[tuple[float, ...], ...]
    before: tuple[float, ...] | None = None
    test_sizes: tuple[int, ...] | None = None
    source: str = "accuracy matrix"

    def __post_init__(self) -> None:
        size = len(self.tasks)
        if size == 0:
            raise ValueError("an accuracy matrix needs at least one task")
        if len(self.after) != size or any(len(row) != size for row in self.after):
            raise ValueError(f"R must be {size} x {size} for tasks {list(self.tasks)}")
        for name, vector in (("before", self.before), ("test_sizes", self.test_sizes)):
            if vector is not None and len(vector) != size:
                raise ValueError(f"{name} must hold {size} values, one per task")
        # every metric reads R and b through this class: a NaN here would otherwise vanish inside max() or turn a
        # mean into nan, and a broken matrix would print as a confident forgetting or transfer figure
        cells = [(f"R[{i}][{j}] (task {self.tasks[j]} after training {self.tasks[i]})", value)
                 for i, row in enumerate(self.after) for j, value in enumerate(row)]
        cells += [(f"b[{j}] (task {self.tasks[j]} before training)", value)
                  for j, value in enumerate(self.before or ())]
        for where, value in cells:
            if not math.isfinite(value):
                raise MTLConfigError(f"{self.source}: {where} is {value}, expected a finite score; no metric is "
                                     "computed from a matrix with a failed evaluation in it")

    @property
    def size(self) -> int:
        """T, the number of tasks."""
        return len(self.tasks)

    @property
    def final(self) -> tuple[float, ...]:
        """The last row: every task's score after the whole sequence."""
        return self.after[-1]


def accuracy(r: AccuracyMatrix) -> float:
    """ACC: mean over tasks of the score after the last task."""
    return _mean(r.final)


def weighted_accuracy(r: AccuracyMatrix) -> float:
    """ACC weighted by test-set size (Avalanche's stream accuracy: correct over all test examples)."""
    if r.test_sizes is None:
        raise ValueError("weighted accuracy needs test_sizes")
    return math.fsum(a * n for a, n in zip(r.final, r.test_sizes)) / sum(r.test_sizes)


def average_incremental_accuracy(r: AccuracyMatrix) -> float:
    """Mean over i of the mean score on the tasks seen so far, R[i, :i+1]."""
    return _mean([_mean(r.after[i][: i + 1]) for i in range(r.size)])


def backward_transfer(r: AccuracyMatrix) -> float | None:
    """BWT = mean over j < T-1 of R[T-1, j] - R[j, j] (Lopez-Paz & Ranzato 2017, the paper's formula).

    The GEM authors' released code divides the same sum by T instead of T - 1 (and FWT's too); this follows the paper.
    """
    return _mean([r.final[j] - r.after[j][j] for j in range(r.size - 1)])


def forward_transfer(r: AccuracyMatrix) -> float | None:
    """FWT = mean over j >= 1 of R[j-1, j] - b[j] (Lopez-Paz & Ranzato 2017): what earlier tasks give an unseen one.

    As for BWT, the GEM authors' released code divides the same T-1 terms by T instead of T - 1; this follows the paper.
    """
    if r.before is None:
        raise ValueError("forward transfer needs the scores before training (before)")
    return _mean([r.after[j - 1][j] - r.before[j] for j in range(1, r.size)])


def forgetting_per_task(r: AccuracyMatrix, max_based: bool = False) -> list[float]:
    """Forgetting of each task j < T-1: R[j, j] - R[T-1, j], or with ``max_based`` (Chaudhry et al. 2018)
    max over l in [j, T-2] of R[l, j] - R[T-1, j]."""
    out = []
    for j in range(r.size - 1):
        best = max(r.after[l][j] for l in range(j, r.size - 1)) if max_based else r.after[j][j]
        out.append(best - r.final[j])
    return out


def forgetting(r: AccuracyMatrix, max_based: bool = False) -> float | None:
    """Mean forgetting over j < T-1: first-vs-last (Avalanche) or max-based (Chaudhry et al. 2018)."""
    return _mean(forgetting_per_task(r, max_based))


def intransigence(r: AccuracyMatrix, joint: Sequence[float]) -> float:
    """Mean over j of a*_j - R[j, j], with a* the score of training every task jointly (Chaudhry et al. 2018)."""
    return _mean([joint[j] - r.after[j][j] for j in range(r.size)])


def single_task_transfer(r: AccuracyMatrix, single: Sequence[float]) -> float:
    """Mean over j of R[j, j] - the score of an adapter trained on task j alone."""
    return _mean([r.after[j][j] - single[j] for j in range(r.size)])


def all_metrics(r: AccuracyMatrix, joint: Sequence[float] | None = None,
                single: Sequence[float] | None = None) -> dict[str, Any]:
    """Every metric that the given inputs define, by name (None where a metric needs two tasks)."""
    out: dict[str, Any] = {"acc": accuracy(r), "avg_incremental_acc": average_incremental_accuracy(r),
                           "bwt": backward_transfer(r), "forgetting": forgetting(r),
                           "forgetting_max": forgetting(r, max_based=True)}
    if r.test_sizes is not None:
        out["acc_weighted"] = weighted_accuracy(r)
    if r.before is not None:
        out["fwt"] = forward_transfer(r)
    if joint is not None:
        out["intransigence"] = intransigence(r, joint)
    if single is not None:
        out["single_task_transfer"] = single_task_transfer(r, single)
    return out
