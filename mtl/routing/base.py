"""What every router shares: the interface, its files, and running the model for inference.

A router picks a task per row for texts that come without one (``route``), and answers with that task's head
(``predict``: the chosen task and its label index). Saved routers are a folder with ``router.json`` (kind,
tasks, settings) and, where the router has state, ``router.safetensors``; `mtl.routing.load.load_router`
reads either kind back.

A router picks one task for a whole text (an encoder row): classifiers and taggers alike. A tagger's rows are
windows of a sentence; each window is a text to a router (a sentence longer than one window may have its windows
routed apart). A tagger's answer on a row is its logits for every token, ``[tokens, tags]``, and its label a tag
index per token (`label_of`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Protocol

import torch

from mtl.errors import MTLConfigError

if TYPE_CHECKING:
    from pathlib import Path

    from mtl.model import MTLModel

ROUTER_CONFIG, ROUTER_WEIGHTS = "router.json", "router.safetensors"
ROUTER_FORMAT_VERSION = 1
ROUTABLE = ("classification", "token_classification")  # kinds of heads a router may pick: one answer per text or token


class Router(Protocol):
    """The routing contract both routers follow (and `routing_report` relies on)."""

    kind: str

    @property
    def tasks(self) -> list[str]:
        """The tasks it routes to, in order."""

    def add_batch(self, model: MTLModel, task: str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  token_type_ids: torch.Tensor | None = None) -> None:
        """Learn from a batch of ``task``'s training rows (as tasks arrive, one batch at a time)."""

    def route(self, model: MTLModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              token_type_ids: torch.Tensor | None = None) -> list[str]:
        """The chosen task per row."""

    def routed_logits(self, model: MTLModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      token_type_ids: torch.Tensor | None = None) -> tuple[list[str], list[torch.Tensor]]:
        """The chosen task per row and that row's logits from the chosen head."""

    def predict(self, model: MTLModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> list[tuple[str, int | list[int]]]:
        """(chosen task, label index; a tagger's: one per token) per row."""

    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write the router folder atomically."""


@contextmanager
def inference(model: MTLModel) -> Iterator[None]:
    """Eval mode (no dropout) and no gradients for the block; the model's mode is restored afterwards."""
    with model.eval_mode(), torch.no_grad():
        yield


def routable(model: MTLModel, task: str) -> bool:
    """Whether a router may pick ``task``: a classifier or a tagger with at least two labels (a softmax to score)."""
    head = model.heads[task]
    return head.problem in ROUTABLE and head.num_outputs >= 2


def check_routable(model: MTLModel, tasks: Sequence[str]) -> None:
    """Every task is in the model and has a classification or tagging head with at least two labels (one line
    otherwise)."""
    missing = [t for t in tasks if t not in model.records]
    if missing:
        raise MTLConfigError(f"router task(s) {missing} are not in the model (model tasks: {model.tasks})")
    wrong = [f"{t} ({model.heads[t].problem}, {model.heads[t].num_outputs} outputs)" for t in tasks
             if not routable(model, t)]
    if wrong:
        raise MTLConfigError(f"routed prediction needs {' or '.join(ROUTABLE)} heads with at least 2 labels, "
                             f"got {wrong}")


def label_of(logits: torch.Tensor) -> int | list[int]:
    """One row's answer from its logits: a classifier's label index (``[labels]``), or a tagger's tag index per token
    (``[tokens, tags]``; padding included: the row's mask says which tokens are real)."""
    return int(logits.argmax(-1)) if logits.ndim == 1 else logits.argmax(-1).tolist()


def rows_of(chosen: Sequence[str], logits: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Each row's logits from ``{task: logits of the rows routed to it, in input order}``."""
    seen = dict.fromkeys(logits, 0)
    rows = []
    for task in chosen:
        rows.append(logits[task][seen[task]])
        seen[task] += 1
    return rows
