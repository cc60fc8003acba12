"""Exact match and F1 of extractive answers as SQuAD's evaluation script counts them.

An answer is normalised (lower case; punctuation removed; the articles a / an / the removed; whitespace collapsed),
then compared with each gold answer; a question scores its best match over its gold answers. F1 is over the
normalised words (their multiset overlap). A question without gold answers (SQuAD 2.0's unanswerable) scores 1 when
the prediction is empty, else 0. `AnswerScores` keeps, per window of an example, the score of its best span and that
span's exact match and F1, and counts each example once, at its best-scoring window.
"""

from __future__ import annotations

import re
import string
from collections import Counter

import torch
from torchmetrics import Metric

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, golds: list[str]) -> float:
    """1.0 if the normalised prediction equals a normalised gold answer (or both are empty), else 0.0."""
    if not golds:
        return float(not normalize_answer(prediction))
    return float(any(normalize_answer(prediction) == normalize_answer(g) for g in golds))


def f1_score(prediction: str, golds: list[str]) -> float:
    """The best word-overlap F1 of the normalised prediction against each gold answer."""
    if not golds:
        return float(not normalize_answer(prediction))
    words = normalize_answer(prediction).split()
    best = 0.0
    for gold in golds:
        gold_words = normalize_answer(gold).split()
        if not words or not gold_words:  # an empty side matches only another empty side
            best = max(best, float(words == gold_words))
            continue
        common = sum((Counter(words) & Counter(gold_words)).values())
        if common:
            precision, recall = common / len(words), common / len(gold_words)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


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
