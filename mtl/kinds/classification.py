"""Classification: one class per text (or sentence pair), from the pooled hidden states."""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from mtl.errors import MTLConfigError
from mtl.kinds.base import TaskKind


class Classification(TaskKind):
    """Softmax over ``labels``; a label in a file is a name of ``labels`` or its index."""

    name = "classification"
    metric_titles = {"acc": "accuracy", "f1": "macro-F1"}
    metric_names = ("acc", "f1")
    default_metrics = ("acc", "f1")
    headline = "acc"
    has_classes = True
    label_dtype = torch.long

    def check_labels(self, labels: list[str]) -> str | None:
        """At least two classes."""
        return None if len(labels) >= 2 else "at least 2 label names"

    def read_label(self, value: Any, names: list[str], where: str) -> int:
        """A class index (float-integers too) or a class name -> the index."""
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value < len(names):
                hint = " (an unlabelled split?)" if value < 0 else ""
                raise MTLConfigError(f"{where}: label index {value} out of range{hint}, expected 0..{len(names) - 1}")
            return value
        if isinstance(value, str) and value in names:
            return names.index(value)
        raise MTLConfigError(
            f"{where}: label {value!r} not in labels, expected one of {names} "
            "(or map it with source.label_map / drop it with source.keep_labels)"
        )

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, per_batch: float | None = None) -> torch.Tensor:
        """Cross-entropy (one term per row: the mean, ``per_batch`` does not apply)."""
        return F.cross_entropy(logits, labels.long())

    def predict(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class index, its softmax probability)."""
        confidence, pred = logits.softmax(-1).max(-1)
        return pred, confidence

    def metric(self, name: str, labels: list[str], spec: dict[str, Any] | None = None, stage: str = "val") -> Any:
        """Micro accuracy (``acc``) or macro F1 (``f1``)."""
        from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score  # torchmetrics imports Lightning's utilities

        if name == "acc":
            return MulticlassAccuracy(len(labels), average="micro")
        return MulticlassF1Score(len(labels), average="macro")

    def file_row(self, labels: list[str] | None, pred: Any, score: Any) -> dict[str, Any]:
        """The class name (the index when the task has no names) and its probability."""
        return {"label": labels[pred] if labels else pred, "score": score}

    def answer(self, labels: list[str] | None, logits: torch.Tensor) -> dict[str, Any]:
        """The best class, its probability and every class's probability."""
        names = labels or [str(i) for i in range(logits.shape[-1])]
        probs = torch.softmax(logits.float(), dim=-1)
        best = int(probs.argmax())
        return {"label": names[best], "score": float(probs[best]), "scores": dict(zip(names, probs.tolist()))}
