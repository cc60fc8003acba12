"""`TagScores`: a tagger's entity scores or word accuracy over whole sentences, as a torchmetrics ``Metric``.

Rows may be windows of one sentence (`mtl.kinds.word_windows`): the metric keeps, for every labelled token, its
sentence, its word, the true and the predicted tag, and joins each sentence's words in order before counting, so an
entity across a window boundary counts once and the result equals scoring the sentences whole. The kept tensors
are concatenated across processes under DDP.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from mtl.kinds.base import IGNORE
from mtl.kinds.entities import entity_counts, scores


class TagScores(Metric):
    """``f1``, ``precision``, ``recall`` (entities) or ``acc`` (words) of a tagger with tags ``labels``."""

    full_state_update = False

    def __init__(self, name: str, labels: list[str]) -> None:
        super().__init__()
        self.name, self.labels = name, list(labels)
        for state in ("example", "word", "true", "pred"):
            self.add_state(state, default=[], dist_reduce_fx="cat")

    def update(self, preds: torch.Tensor, target: torch.Tensor, example: torch.Tensor, word_ids: torch.Tensor) -> None:
        """One batch: predicted and true tag per token ([rows, tokens]), each row's sentence, each token's word."""
        keep = target != IGNORE
        self.example.append(example.to(target.device).unsqueeze(1).expand_as(target)[keep])
        self.word.append(word_ids.to(target.device)[keep])
        self.true.append(target[keep])
        self.pred.append(preds[keep])

    def compute(self) -> torch.Tensor:
        """The score over every sentence seen."""
        true, pred = dim_zero_cat(self.true), dim_zero_cat(self.pred)
        if self.name == "acc":
            return (true == pred).double().mean()
        rows = zip(dim_zero_cat(self.example).tolist(), dim_zero_cat(self.word).tolist(), true.tolist(), pred.tolist())
        sentences: dict[int, tuple[list[str], list[str]]] = {}
        for e, _, t, p in sorted(rows):  # each sentence's words in order
            gold, guess = sentences.setdefault(e, ([], []))
            gold.append(self.labels[t])
            guess.append(self.labels[p])
        result = scores(*entity_counts([g for g, _ in sentences.values()], [p for _, p in sentences.values()]))
        return torch.tensor(result[self.name], dtype=torch.float64)
