"""`EntropyRouter`: run every task's head in one multi-task forward, keep the most confident one per row.

Confidence is the normalised prediction entropy H(softmax(logits)) / log(C) of a C-label head: 0 for a
certain head, 1 for a uniform one, so heads with different label counts compare on one scale. A tagger's head
answers every token: its entropy for a text is the mean over the row's real tokens (attention mask 1: the special
tokens too, as the prototype router's features count them; never the padding) of each token's normalised
entropy over its T tags, on the same [0, 1] scale (`text_entropy`). Nothing is fitted; the cost is one forward
with every task (the layers below the first adapter layer run once).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mtl.atomic import write_dir_atomic, write_json_atomic
from mtl.errors import MTLConfigError
from mtl.routing.base import ROUTER_CONFIG, ROUTER_FORMAT_VERSION, check_routable, inference, label_of, routable

if TYPE_CHECKING:
    from mtl.model import MTLModel


def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dimension divided by log(labels), per row, in float64."""
    labels = logits.shape[-1]
    if labels < 2:
        raise ValueError(f"normalised entropy needs at least 2 labels, got {labels}")
    # entr(0) = 0, so a label with probability 0 adds nothing instead of 0 * log 0 = nan
    return torch.special.entr(logits.double().softmax(-1)).sum(-1) / math.log(labels)


def text_entropy(logits: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One normalised entropy per row (text), float64: a classifier's (``[rows, labels]``) as `normalized_entropy`
    gives it; a tagger's (``[rows, tokens, tags]``) the mean of its tokens' normalised entropies over the row's real
    tokens (``attention_mask`` 1; every token without a mask). A row without a real token counts as uncertain (1)."""
    per = normalized_entropy(logits)
    if per.ndim == 1:
        return per
    if per.ndim != 2:
        raise ValueError(f"logits of shape {tuple(logits.shape)}, expected [rows, labels] or [rows, tokens, tags]")
    if attention_mask is None:
        return per.mean(-1)
    mask = attention_mask.to(per.device, torch.float64)
    if mask.shape != per.shape:
        raise ValueError(f"attention mask of shape {tuple(mask.shape)} for tagger logits {tuple(logits.shape)}")
    real = mask.sum(-1)
    return torch.where(real > 0, (per * mask).sum(-1) / real.clamp(min=1), torch.ones_like(real))


class EntropyRouter:
    """Routes each row to the classification or tagging head with the lowest normalised entropy (stateless)."""

    kind = "entropy"

    def __init__(self, tasks: Sequence[str] | None = None) -> None:
        self._tasks = list(dict.fromkeys(tasks)) if tasks is not None else None

    @property
    def tasks(self) -> list[str]:
        """The fixed tasks in order, or [] for every classification and tagging task the model has at call time."""
        return list(self._tasks or [])

    def tasks_for(self, model: MTLModel) -> list[str]:
        """The tasks this router compares on ``model`` (checked: present, classification or tagging)."""
        tasks = self._tasks if self._tasks is not None else [t for t in model.tasks if routable(model, t)]
        if not tasks:
            raise MTLConfigError("no task trained yet: the model has no classification or tagging task for the entropy "
                                 "router to route to")
        check_routable(model, tasks)
        return list(tasks)

    def add_batch(self, model: MTLModel, task: str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  token_type_ids: torch.Tensor | None = None) -> None:
        """Nothing to fit; a fixed task list gains ``task`` (so both routers grow the same way as tasks arrive)."""
        check_routable(model, [task])
        if self._tasks is not None and task not in self._tasks:
            self._tasks.append(task)

    @staticmethod
    def choose(logits: dict[str, torch.Tensor], attention_mask: torch.Tensor | None = None) -> list[str]:
        """Per row, the task whose logits have the lowest normalised entropy (`text_entropy`: a tagger's over the
        row's real tokens, by ``attention_mask``; ties: the first task in order)."""
        names = list(logits)
        scores = torch.stack([text_entropy(logits[t], attention_mask) for t in names], dim=1)
        return [names[i] for i in scores.argmin(dim=1).tolist()]  # argmin returns the first of equal minima

    def routed_logits(self, model: MTLModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      token_type_ids: torch.Tensor | None = None) -> tuple[list[str], list[torch.Tensor]]:
        """The chosen task per row and that row's logits from the chosen head."""
        tasks = self.tasks_for(model)
        with inference(model):
            logits = model(input_ids, attention_mask, token_type_ids, tasks=tasks)
        chosen = self.choose(logits, attention_mask)
        return chosen, [logits[t][row] for row, t in enumerate(chosen)]

    def route(self, model: MTLModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              token_type_ids: torch.Tensor | None = None) -> list[str]:
        """The chosen task per row."""
        return self.routed_logits(model, input_ids, attention_mask, token_type_ids)[0]

    def predict(self, model: MTLModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> list[tuple[str, int | list[int]]]:
        """(chosen task, label index; a tagger's: one per token) per row, from the same single forward that routed
        it."""
        chosen, logits = self.routed_logits(model, input_ids, attention_mask, token_type_ids)
        return [(t, label_of(row)) for t, row in zip(chosen, logits)]

    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write ``folder/router.json`` (kind and the fixed tasks, if any) atomically."""
        target = Path(folder)
        if target.exists() and not overwrite:
            raise MTLConfigError(f"{target}: already exists (pass overwrite=True to replace it)")
        config = {"format_version": ROUTER_FORMAT_VERSION, "kind": self.kind, "tasks": self._tasks}
        return write_dir_atomic(target, lambda tmp: write_json_atomic(tmp / ROUTER_CONFIG, config))

