"""What every router shares: the interface, its files, and running the model for inference.

A router picks a task per row for texts that come without one (``route``), and answers with that task's head
(``predict``: the chosen task and its label index). Saved routers are a folder with ``router.json`` (kind,
tasks, settings) and, where the router has state, ``router.safetensors``; `mtl.routing.load.load_router`
reads either kind back.
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

    def predict(self, model: MTLModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> list[tuple[str, int]]:
        """(chosen task, label index) per row."""

    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write the router folder atomically."""


@contextmanager
def inference(model: MTLModel) -> Iterator[None]:
    """Eval mode (no dropout) and no gradients for the block; the model's mode is restored afterwards."""
    with model.eval_mode(), torch.no_grad():
        yield


def check_classification(model: MTLModel, tasks: Sequence[str]) -> None:
    """Every task is in the model and has a classification head with at least two labels (one line otherwise)."""
    missing = [t for t in tasks if t not in model.records]
    if missing:
        raise MTLConfigError(f"router task(s) {missing} are not in the model (model tasks: {model.tasks})")
    wrong = [f"{t} ({model.heads[t].problem}, {model.heads[t].num_outputs} outputs)" for t in tasks
             if model.heads[t].problem != "classification" or model.heads[t].num_outputs < 2]
    if wrong:
        raise MTLConfigError(f"routed prediction needs classification heads with at least 2 labels, got {wrong}")


def rows_of(chosen: Sequence[str], logits: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Each row's logits from ``{task: logits of the rows routed to it, in input order}``."""
    seen = dict.fromkeys(logits, 0)
    rows = []
    for task in chosen:
        rows.append(logits[task][seen[task]])
        seen[task] += 1
    return rows
