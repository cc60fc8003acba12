"""Multi-label classification: any subset of ``labels`` per text, one sigmoid per label."""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from mtl.errors import MTLConfigError
from mtl.kinds.base import TaskKind


class Multilabel(TaskKind):
    """A label in a file is a name, a list of names, or one 0/1 value per label; stored multi-hot."""

    name = "multilabel"
    metric_titles = {"acc": "label accuracy", "f1": "macro-F1"}
    metric_names = ("acc", "f1")
    default_metrics = ("acc", "f1")
    headline = "acc"

    def read_label(self, value: Any, names: list[str], where: str) -> list[float]:
        """Names (one or a list) or ``len(names)`` numbers -> a multi-hot list of floats."""
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            unknown = [v for v in value if v not in names]
            if unknown:
                raise MTLConfigError(f"{where}: label {unknown[0]!r} not in labels, expected one of {names}")
            return [float(n in value) for n in names]
        if isinstance(value, list) and len(value) == len(names) and all(isinstance(v, (int, float)) for v in value):
            return [float(v) for v in value]
        raise MTLConfigError(f"{where}: got {value!r}, expected a list of label names or {len(names)} 0/1 values")

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, per_batch: float | None = None) -> torch.Tensor:
        """Binary cross-entropy per label (mean; ``per_batch`` does not apply)."""
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))

    def predict(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(0/1 per label at probability 0.5, the probabilities)."""
        probs = logits.sigmoid()
        return (probs > 0.5).long(), probs

    def metric(self, name: str, labels: list[str], spec: dict[str, Any] | None = None, stage: str = "val") -> Any:
        """Micro accuracy over label decisions (``acc``) or macro F1 (``f1``)."""
        from torchmetrics.classification import MultilabelAccuracy, MultilabelF1Score  # torchmetrics imports Lightning's utilities

        if name == "acc":
            return MultilabelAccuracy(len(labels), average="micro")
        return MultilabelF1Score(len(labels), average="macro")

    def answer(self, labels: list[str] | None, logits: torch.Tensor) -> dict[str, Any]:
        """The names above probability 0.5, the highest probability and every label's."""
        names = labels or [str(i) for i in range(logits.shape[-1])]
        probs = torch.sigmoid(logits.float())
        return {"label": [n for n, p in zip(names, probs.tolist()) if p > 0.5], "score": float(probs.max()),
                "scores": dict(zip(names, probs.tolist()))}
