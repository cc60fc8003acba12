"""`AnswerScores`: extractive QA's exact match or F1 over examples, as a torchmetrics ``Metric``.

It keeps, per window of an example, the score of the window's best span and that span's exact match and F1
(`mtl.kinds.answer_match`), and counts each example once, at its best-scoring window.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


class AnswerScores(Metric):
    """``exact`` or ``f1`` over examples; ``update`` takes per window (example, span score, its exact match, its F1)
    and each example counts once, with the window whose span scores highest."""

    full_state_update = False

    def __init__(self, name: str) -> None:
        super().__init__()
        if name not in ("exact", "f1"):
            raise ValueError(f"metric '{name}': expected 'exact' or 'f1'")
        self.name = name
        for state in ("example", "score", "value"):
            self.add_state(state, default=[], dist_reduce_fx="cat")

    def update(self, example: torch.Tensor, score: torch.Tensor, exact: torch.Tensor, f1: torch.Tensor) -> None:
        """One batch of windows."""
        self.example.append(example.long())
        self.score.append(score.float())
        self.value.append((exact if self.name == "exact" else f1).float())

    def compute(self) -> torch.Tensor:
        """The mean over examples of the value at each example's best-scoring window."""
        if not self.example:
            return torch.tensor(0.0)
        example, score, value = (torch.cat(s) if isinstance(s, list) else s for s in (self.example, self.score,
                                                                                      self.value))
        best: dict[int, tuple[float, float]] = {}
        for e, s, v in zip(example.tolist(), score.tolist(), value.tolist()):
            if e not in best or s > best[e][0]:
                best[e] = (s, v)
        return torch.tensor(sum(v for _, v in best.values()) / len(best))
