"""`AnswerScores`: extractive QA's exact match or F1 over examples, as a torchmetrics ``Metric``.

It keeps, per window of an example, the score of the window's best span, that span's exact match and F1
(`mtl.kinds.answer_match`), the window's null score ([CLS] as start and end) and what an empty answer would score,
and counts each example once: at its best-scoring window, or as "no answer" where the task allows one and the
example's null score (its lowest over windows) beats its best span by more than the no-answer threshold.

The threshold (SQuAD 2.0's null score difference) belongs to the task: validation chooses it, as the value that
maximises the metric over the validation examples, and writes it into the task's spec (``no_answer_threshold``);
test, predictions and the server read it from there.
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric

from mtl.kinds.answer_match import THRESHOLD_KEY, best_threshold, no_answer_threshold


class AnswerScores(Metric):
    """``exact`` or ``f1`` over examples; ``update`` takes per window (example, span score, null score, the span's
    exact match and F1, an empty answer's score). With ``spec`` holding ``no_answer: true``, an example may be
    answered "no answer": ``choose`` (validation) picks the threshold on the examples seen and writes it into
    ``spec``; otherwise (test) the spec's threshold applies (0 until one was chosen)."""

    full_state_update = False

    def __init__(self, name: str, spec: dict[str, Any] | None = None, choose: bool = False) -> None:
        super().__init__()
        if name not in ("exact", "f1"):
            raise ValueError(f"metric '{name}': expected 'exact' or 'f1'")
        self.name, self.spec, self.choose = name, spec, choose
        # both scores are kept whatever the name: ``exact`` and ``f1`` then hold equal states, which is what a
        # MetricCollection's compute groups assume of metrics whose states it finds equal (it shares them)
        for state in ("example", "score", "null", "exact", "f1", "empty"):
            self.add_state(state, default=[], dist_reduce_fx="cat")

    def update(self, example: torch.Tensor, score: torch.Tensor, null: torch.Tensor, exact: torch.Tensor,
               f1: torch.Tensor, empty: torch.Tensor) -> None:
        """One batch of windows."""
        self.example.append(example.long())
        self.score.append(score.float())
        self.null.append(null.float())
        self.exact.append(exact.float())
        self.f1.append(f1.float())
        self.empty.append(empty.float())

    def compute(self) -> torch.Tensor:
        """The mean over examples of the value of each example's answer (see the class docstring)."""
        if not self.example:
            return torch.tensor(0.0)
        columns = [torch.cat(s) if isinstance(s, list) else s for s in (self.example, self.score, self.null,
                                                                         getattr(self, self.name), self.empty)]
        best: dict[int, list[float]] = {}  # example -> [span score, span value, lowest null score, empty value]
        for e, s, n, v, u in zip(*(c.tolist() for c in columns)):
            if e not in best:
                best[e] = [s, v, n, u]
                continue
            if s > best[e][0]:
                best[e][:2] = [s, v]
            best[e][2] = min(best[e][2], n)
        values = [v for _, v, _, _ in best.values()]
        diffs, empties = [n - s for s, _, n, _ in best.values()], [u for *_, u in best.values()]
        if self.choose and no_answer_threshold(self.spec) is not None:
            self.spec[THRESHOLD_KEY] = best_threshold(diffs, values, empties)
        threshold = no_answer_threshold(self.spec)
        if threshold is None:
            return torch.tensor(sum(values) / len(values))
        kept = [u if d > threshold else v for d, v, u in zip(diffs, values, empties)]
        return torch.tensor(sum(kept) / len(kept))
