"""Regression: one number per text (``labels`` names the target)."""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from mtl.errors import MTLConfigError
from mtl.kinds.base import TaskKind


class Regression(TaskKind):
    """Mean squared error on one output; a label in a file is a number."""

    name = "regression"
    metric_names = ("mse", "pearson")
    default_metrics = ("mse", "pearson")
    headline = "pearson"

    def check_labels(self, labels: list[str]) -> str | None:
        """Exactly one name: the target."""
        return None if len(labels) == 1 else "exactly one name (the target)"

    def read_label(self, value: Any, names: list[str], where: str) -> float:
        """A number."""
        try:
            return float(value)
        except (TypeError, ValueError):
            raise MTLConfigError(f"{where}: label {value!r} is not a number, expected a float") from None

    def head_outputs(self, labels: list[str]) -> int:
        """One value."""
        return 1

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, per_batch: float | None = None) -> torch.Tensor:
        """Mean squared error (``per_batch`` does not apply)."""
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))

    def predict(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(value, value)."""
        values = logits.squeeze(-1)
        return values, values

    def metric(self, name: str, labels: list[str], spec: dict[str, Any] | None = None, stage: str = "val") -> Any:
        """Mean squared error (``mse``) or Pearson's r (``pearson``)."""
        from torchmetrics import MeanSquaredError, PearsonCorrCoef  # torchmetrics imports Lightning's utilities

        return MeanSquaredError() if name == "mse" else PearsonCorrCoef()

    def metric_inputs(self, logits: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        """(values, targets) as floats."""
        return logits.squeeze(-1), batch["labels"]

    def answer(self, labels: list[str] | None, logits: torch.Tensor) -> dict[str, Any]:
        """The value (no label, no scores)."""
        value = logits.float().tolist()
        return {"label": None, "score": value[0] if len(value) == 1 else value, "scores": None}
