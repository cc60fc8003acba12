"""The pooled head of the text-level task kinds (classification, multilabel, regression); their losses and what a
prediction is belong to the kinds (`mtl.kinds`)."""

from __future__ import annotations

import torch
from torch import nn

from mtl.errors import MTLConfigError

POOLINGS = ("mean", "cls")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """Mean over real tokens, or the first ([CLS]) token."""
    if pooling == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        return hidden.mean(dim=1)
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class TaskHead(nn.Module):
    """Pooling, then dropout -> Linear(H, H) -> tanh -> dropout -> Linear(H, outputs)."""

    def __init__(self, hidden_size: int, num_outputs: int, problem: str = "classification",
                 pooling: str = "mean", dropout: float = 0.1) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise MTLConfigError(f"head pooling '{pooling}' is unknown, expected one of {list(POOLINGS)}")
        self.problem = problem  # the task's kind (its loss and predictions): mtl.kinds
        self.pooling = pooling
        self.num_outputs = num_outputs
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, num_outputs)

    def settings(self) -> dict[str, object]:
        """The constructor arguments (what an exported head's config stores)."""
        return {"num_outputs": self.num_outputs, "problem": self.problem, "pooling": self.pooling,
                "dropout": self.dropout.p}

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Logits (or regression values) per row."""
        pooled = pool(hidden, attention_mask, self.pooling)
        return self.out(self.dropout(torch.tanh(self.dense(self.dropout(pooled)))))
