"""The epoch loop of the AdapterHub peer fits that keep their best epoch (QA, multiple choice): train, score the
validation split, keep the best trainable state, restore it. Runs in the peer venv; never imports mtl."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


def train_mode(model: Any, backbone_dropout: bool) -> None:
    """Training mode: the whole model (the backbone's dropout on, AdapterHub's default), or only the heads and
    adapters (``backbone_dropout`` False)."""
    if backbone_dropout:
        model.train()
        return
    from adapters.methods.modeling import Adapter

    model.eval()
    model.heads.train()
    for module in model.modules():
        if isinstance(module, Adapter):
            module.train()


def fit_best(model: Any, batches: Iterable[dict], optimizer: Any, scheduler: Any, epochs: int, autocast: Callable,
             clock: Any, score: Callable[[], float], log: Callable[[str], None]) -> tuple[int, float, list[float]]:
    """``epochs`` passes over ``batches`` (the loss is the one the model returns), each followed by ``score()`` (the
    validation headline, higher is better); the best epoch's trainable parameters are restored at the end. Returns
    (best epoch, its score, every epoch's score)."""
    best, best_epoch, best_state, scores = float("-inf"), -1, None, []
    for epoch in range(epochs):
        with clock("train"):
            for batch in batches:
                with autocast():
                    loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        with clock("validation"):
            value = score()
        scores.append(round(value, 4))
        log(f"  epoch {epoch}: last loss {loss.item():.4f}, validation {value:.4f}")
        if value > best:
            best, best_epoch = value, epoch
            best_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.load_state_dict(best_state, strict=False)
    return best_epoch, best, scores
