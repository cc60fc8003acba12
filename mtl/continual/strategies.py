"""Continual-learning strategies: what the runner does around each stage of a task sequence.

A strategy says which tasks each stage trains and how the model is first built (an adapter per task, or one
shared adapter), and gets three hooks: ``before_task`` (set up the stage's module and data), ``extra_loss`` (added
to every training step's loss) and ``after_task`` (record what it needs, e.g. fingerprints). What it must keep
across a restart goes in ``state`` (JSON), which the runner saves after every stage and restores on resume.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from mtl.data.module import TaskDataModule
    from mtl.lit import AdapterTrainer


class Strategy:
    """The protocol, with do-nothing hooks: one task per stage, an adapter and head per task."""

    name = ""
    adapter_sharing = "per_task"
    description = ""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def stages(self, order: list[str]) -> list[list[str]]:
        """The tasks trained at each stage, in order."""
        return [[task] for task in order]

    def before_task(self, stage: int, tasks: list[str], module: AdapterTrainer, data: TaskDataModule) -> None:
        """Called after the stage's module and data are built, before its Trainer fits."""

    def extra_loss(self, module: AdapterTrainer, batch: dict[str, Any]) -> torch.Tensor | None:
        """A term added to each training step's loss (None: nothing)."""
        return None

    def after_task(self, stage: int, tasks: list[str], module: AdapterTrainer, data: TaskDataModule) -> None:
        """Called after the stage is trained and evaluated, before its state is saved."""

    def verify(self, module: AdapterTrainer, data: TaskDataModule) -> dict[str, Any] | None:
        """At the end of the sequence: a check of what the strategy promises (None: it promises nothing)."""
        return None


class PerTask(Strategy):
    """A new adapter and head per task; earlier ones are frozen for good, so forgetting is zero by construction.

    The runner checks it: right after a task is trained, the SHA-256 of its tensors and of its logits on a fixed
    probe batch are recorded; at the end both are recomputed for every task and must be unchanged.
    """

    name = "per_task"
    description = "a new adapter and head per task, earlier ones frozen"

    def __init__(self, probe_size: int = 16) -> None:
        super().__init__()
        self.probe_size = probe_size
        self.state = {"fingerprints": {}}

    def after_task(self, stage: int, tasks: list[str], module: AdapterTrainer, data: TaskDataModule) -> None:
        for task in tasks:
            self.state["fingerprints"][task] = {"stage": stage, **fingerprint(module, data, task, self.probe_size)}

    def verify(self, module: AdapterTrainer, data: TaskDataModule) -> dict[str, Any]:
        tasks = {}
        for task, saved in self.state["fingerprints"].items():
            now = fingerprint(module, data, task, self.probe_size)
            tasks[task] = {"unchanged": all(now[k] == saved[k] for k in now), "trained_at_stage": saved["stage"], **now}
        return {"verified": bool(tasks) and all(t["unchanged"] for t in tasks.values()), "tasks": tasks}


class Shared(Strategy):
    """One adapter trained on every task in turn, a head per task (the naive baseline: it forgets)."""

    name = "shared"
    adapter_sharing = "shared"
    description = "one adapter trained on each task in turn, a head per task"


class Joint(Strategy):
    """Every task trained at once with the multi-task sampler: the upper bound a* (one stage)."""

    name = "joint"
    description = "all tasks trained together (multi-task sampler), one stage"

    def stages(self, order: list[str]) -> list[list[str]]:
        return [list(order)]


STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (PerTask, Shared, Joint)}


def build_strategy(name: str, probe_size: int) -> Strategy:
    """The strategy called ``name`` (the runner has checked the name)."""
    return PerTask(probe_size) if name == PerTask.name else STRATEGIES[name]()


def tensors_sha256(module: AdapterTrainer, task: str) -> str:
    """SHA-256 over a task's adapter and head tensors (names, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, param in sorted(module.model.task_parameters(task).items()):
        value = param.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def fingerprint(module: AdapterTrainer, data: TaskDataModule, task: str, probe_size: int) -> dict[str, str]:
    """SHA-256 of a task's tensors and of its logits on the probe batch (plain forward, eval mode)."""
    batch = data.first_examples(task, "test", probe_size)
    model = module.model
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        inputs = [batch.get(k) for k in ("input_ids", "attention_mask", "token_type_ids")]
        logits = model(*[x.to(device) if x is not None else None for x in inputs], tasks=[task])[task]
    finally:
        model.train(was_training)
    raw = logits.float().cpu().contiguous().numpy().tobytes()
    return {"tensors_sha256": tensors_sha256(module, task), "probe_logits_sha256": hashlib.sha256(raw).hexdigest()}
