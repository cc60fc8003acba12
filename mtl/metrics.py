"""Per-task torchmetrics: the task kind's metrics (`mtl.kinds`) under ``<stage>/<route>/<metric>`` names."""

from __future__ import annotations

from typing import Any

from torchmetrics import MetricCollection

from mtl.errors import MTLConfigError
from mtl.kinds import kind_of


def build_metrics(problem: str, names: list[str], labels: list[str], prefix: str,
                  spec: dict[str, Any] | None = None, stage: str = "val") -> MetricCollection:
    """A `MetricCollection` named ``<prefix><metric>`` (e.g. ``val/bbc_news/acc``) for a task with these labels, at
    ``stage`` of the task whose saved spec is ``spec`` (`TaskKind.metric`)."""
    kind = kind_of(problem)
    unknown = [n for n in names if n not in kind.metric_names]
    if unknown:
        raise MTLConfigError(f"metrics {unknown} are not available for {problem} tasks, expected some of "
                             f"{sorted(kind.metric_names)}")
    return MetricCollection({n: kind.metric(n, labels, spec, stage) for n in names}, prefix=prefix)
