"""Per-task torchmetrics, built from a task's problem type and metric names."""

from __future__ import annotations

from torchmetrics import MeanSquaredError, MetricCollection, PearsonCorrCoef
from torchmetrics.classification import (MulticlassAccuracy, MulticlassF1Score, MultilabelAccuracy,
                                         MultilabelF1Score)

from mtl.errors import MTLConfigError

METRICS = {
    "classification": {"acc": lambda n: MulticlassAccuracy(n, average="micro"),
                       "f1": lambda n: MulticlassF1Score(n, average="macro")},
    "multilabel": {"acc": lambda n: MultilabelAccuracy(n, average="micro"),
                   "f1": lambda n: MultilabelF1Score(n, average="macro")},
    "regression": {"mse": lambda n: MeanSquaredError(), "pearson": lambda n: PearsonCorrCoef()},
}


def build_metrics(problem: str, names: list[str], num_outputs: int, prefix: str) -> MetricCollection:
    """A `MetricCollection` named ``<prefix><metric>`` (e.g. ``val/bbc_news/acc``)."""
    table = METRICS[problem]
    unknown = [n for n in names if n not in table]
    if unknown:
        raise MTLConfigError(f"metrics {unknown} are not available for {problem} tasks, expected some of {sorted(table)}")
    return MetricCollection({n: table[n](num_outputs) for n in names}, prefix=prefix)
