"""Per-task torchmetrics: the task kind's metrics (`mtl.kinds`) under ``<stage>/<route>/<metric>`` names."""

from __future__ import annotations

from torchmetrics import MetricCollection

from mtl.errors import MTLConfigError
from mtl.kinds import kind_of


def build_metrics(problem: str, names: list[str], labels: list[str], prefix: str) -> MetricCollection:
    """A `MetricCollection` named ``<prefix><metric>`` (e.g. ``val/bbc_news/acc``) for a task with these labels."""
    kind = kind_of(problem)
    unknown = [n for n in names if n not in kind.metric_names]
    if unknown:
        raise MTLConfigError(f"metrics {unknown} are not available for {problem} tasks, expected some of "
                             f"{sorted(kind.metric_names)}")
    return MetricCollection({n: kind.metric(n, labels) for n in names}, prefix=prefix)
