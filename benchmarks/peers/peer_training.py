"""What the AdapterHub peer fits that keep their best epoch (QA, multiple choice) share: their command-line budget,
the model with its adapter and head, train mode, and the epoch loop (train, score the validation split, keep the best
trainable state, restore it). Runs in the peer venv; never imports mtl."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from adapterhub_fit import model_dir  # this folder: run as a script from here
from adapterhub_tagging_fit import bf16_native


def fit_arguments(description: str, task: str, epochs: int, lr: float, max_length: int) -> argparse.ArgumentParser:
    """A parser with the arguments every best-epoch peer fit takes (the rows, the budget, precision, threads, seed, a
    smoke cap), with this fit's defaults; a fit adds its own before parsing."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rows", type=Path, required=True)
    parser.add_argument("--task", default=task)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--warmup", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    parser.add_argument("--max-length", type=int, default=max_length)
    parser.add_argument("--no-backbone-dropout", action="store_true")
    parser.add_argument("--max-train", type=int, help="the first N train rows only (a smoke run)")
    return parser


def start(args: argparse.Namespace) -> tuple[bool, Callable]:
    """Threads and seed as the arguments say; (bf16 or not, the autocast context to train and score in): bf16 where
    asked, or with ``auto`` where the CPU computes bf16 natively (mtl's rule)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and bf16_native())
    return bf16, (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext


def adapter_model(task: str, add_head: Callable[[Any], None]) -> Any:
    """AdapterHub's model on the MiniLM folder with a SeqBn r16 adapter ``task`` and the head ``add_head`` adds, only
    those two trainable (``train_adapter``); its loggers quiet unless TRANSFORMERS_VERBOSITY is set."""
    from adapters import AutoAdapterModel, SeqBnConfig
    from transformers.utils import logging as hf_logging

    if "TRANSFORMERS_VERBOSITY" not in os.environ:
        hf_logging.set_verbosity_error()
        # adapters 1.3.0 logs this from set_active_adapters() before the new setup is active; spurious here
        logging.getLogger("adapters.model_mixin").addFilter(
            lambda record: "none are activated for the forward pass" not in record.getMessage())
    model = AutoAdapterModel.from_pretrained(str(model_dir()))
    model.add_adapter(task, config=SeqBnConfig(reduction_factor=16))
    add_head(model)
    model.train_adapter(task)
    return model


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
