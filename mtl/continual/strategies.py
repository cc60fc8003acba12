"""Continual-learning strategies: what the runner does around each stage of a task sequence.

A strategy says which tasks each stage trains and how the model is first built (an adapter per task, or one
shared adapter), and gets hooks: ``stage_data`` (what the stage trains on), ``before_task``, ``extra_loss`` (added
to every training step's loss), ``after_task`` (record what it needs, e.g. fingerprints or a Fisher), ``verify``
(check its promise at the end) and ``fusion_setup`` (a second fit after the stage's own: a fusion over trained
adapters, whose route ``routes`` then records). What it must keep across a restart goes in ``state`` (JSON, saved in
state.json after every stage) or in files it writes with ``save`` into the stage's folder and reads with ``load``.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from mtl import storage
from mtl.assembly import FusionSetup
from mtl.kinds import kind_of

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

    def stage_data(self, tasks: list[str]) -> dict[str, Any]:
        """Extra `TaskDataModule` arguments for the stage training ``tasks`` (``tasks``: what it trains on)."""
        return {}

    def fusion_setup(self, order: list[str], tasks: list[str]) -> FusionSetup | None:
        """A fusion to train after the stage's own fit, for its one task (None: no second fit)."""
        return None

    def routes(self) -> dict[str, str]:
        """Tasks answered through a fusion: task -> fusion name (used to build and evaluate every later stage)."""
        return {}

    def load(self, folder: Path) -> None:
        """Read the tensors this strategy keeps from the previous stage's folder (``save`` wrote them)."""

    def save(self, folder: Path) -> None:
        """Write the tensors this strategy keeps into the stage's folder (exported atomically with the adapters)."""

    def stored_bytes(self, module: AdapterTrainer, data: TaskDataModule) -> dict[str, int]:
        """What the method keeps to go on learning, in bytes: adapters and heads, plus its own memory."""
        seen: dict[str, dict[int, int]] = {}
        for task in module.model.tasks:
            kind = "fusions_and_heads" if module.model.target(task).is_fusion else "adapters_and_heads"
            for name, p in module.model.task_parameters(task).items():
                seen.setdefault(kind, {})[id(p)] = p.numel() * p.element_size()  # a shared adapter counts once
        return {kind: sum(sizes.values()) for kind, sizes in sorted(seen.items())}

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
        for name, saved in self.state["fingerprints"].items():
            task = saved.get("task", name)  # a fusion's entry names the task whose probe batch it reads
            now = fingerprint(module, data, task, self.probe_size, route=name)
            tasks[name] = {"unchanged": all(now[k] == saved[k] for k in now), "trained_at_stage": saved["stage"], **now}
        return {"verified": bool(tasks) and all(t["unchanged"] for t in tasks.values()), "tasks": tasks}


class Fusion(PerTask):
    """per_task's adapters and, from the second task on, an AdapterFusion over every earlier adapter plus the new
    task's own, trained after that adapter (a second fit of the stage, on the same data); the task is then answered
    through its fusion. Nothing trained before is touched, so forgetting is zero, checked as in per_task for every
    adapter, head and fusion."""

    name = "fusion"
    description = "a new adapter per task, then a fusion over it and every earlier adapter"
    SUFFIX = "_fusion"

    def __init__(self, probe_size: int, config: dict[str, Any]) -> None:
        super().__init__(probe_size)
        self.config = config
        self.state = {"fingerprints": {}, "routes": {}}

    def fusion_setup(self, order: list[str], tasks: list[str]) -> FusionSetup | None:
        earlier = order[:order.index(tasks[0])]
        if not earlier:
            return None
        return FusionSetup(name=tasks[0] + self.SUFFIX, adapters=[*earlier, tasks[0]], config=dict(self.config))

    def routes(self) -> dict[str, str]:
        return dict(self.state["routes"])

    def after_task(self, stage: int, tasks: list[str], module: AdapterTrainer, data: TaskDataModule) -> None:
        super().after_task(stage, tasks, module, data)
        for task in tasks:
            route = module.routes[task]
            if route != task:
                self.state["routes"][task] = route
                self.state["fingerprints"][route] = {"stage": stage, "task": task,
                                                     **fingerprint(module, data, task, self.probe_size, route=route)}


class Shared(Strategy):
    """One adapter trained on every task in turn, a head per task (the naive baseline: it forgets)."""

    name = "shared"
    adapter_sharing = "shared"
    description = "one adapter trained on each task in turn, a head per task"


class Replay(Shared):
    """The shared adapter plus a reservoir buffer of earlier tasks' training examples, mixed into every later task's
    batches: a fraction ``ratio`` of the training batches come from the buffer (through the task sampler)."""

    name = "replay"
    description = "one adapter, earlier tasks' examples replayed from a reservoir buffer"

    def __init__(self, size: int, ratio: float, seed: int) -> None:
        super().__init__()
        self.size, self.ratio, self.seed = size, ratio, seed
        self.state = {"buffer": [], "seen": 0}  # (task, row of its train split); examples offered so far

    def stage_data(self, tasks: list[str]) -> dict[str, Any]:
        rows: dict[str, list[int]] = {}
        for task, row in self.state["buffer"]:
            if task not in tasks:
                rows.setdefault(task, []).append(row)
        if not rows or self.ratio == 0:
            return {}
        total = sum(len(r) for r in rows.values())
        weights = {t: (1.0 - self.ratio) / len(tasks) for t in tasks}
        weights.update({t: self.ratio * len(r) / total for t, r in rows.items()})
        return {"tasks": [*tasks, *rows], "train_subsets": {t: sorted(r) for t, r in rows.items()},
                "task_weights": weights}

    def after_task(self, stage: int, tasks: list[str], module: AdapterTrainer, data: TaskDataModule) -> None:
        buffer, seen = self.state["buffer"], self.state["seen"]
        for task in tasks:  # reservoir sampling: every example offered so far is in the buffer with equal chance
            rng = random.Random(f"{self.seed}:{task}")
            # a multiple-choice example is several rows: its first stands for it (the data module reads it whole)
            group = data.rows_per_example(task)
            for row in range(0, len(data.task_datasets[task]["train"]), group):
                if len(buffer) < self.size:
                    buffer.append([task, row])
                else:
                    slot = rng.randrange(seen + 1)
                    if slot < self.size:
                        buffer[slot] = [task, row]
                seen += 1
        self.state["seen"] = seen

    def stored_bytes(self, module: AdapterTrainer, data: TaskDataModule) -> dict[str, int]:
        # the buffer as the batches hold it: int64 token ids and labels (one per example; a tagger's window: one per
        # token, and a word id per token and its sentence's row)
        def values(row: dict[str, Any]) -> int:
            labels = row["labels"]
            return len(row["input_ids"]) + (len(labels) if isinstance(labels, list) else 1) + \
                len(row.get("word_ids") or []) + ("example" in row)

        tokens = sum(values(data.task_datasets[t]["train"][row + j]) for t, row in self.state["buffer"]
                     for j in range(data.rows_per_example(t)))
        return {**super().stored_bytes(module, data), "replay_buffer": 8 * tokens}


class EWC(Shared):
    """The shared adapter plus online EWC: (lambda / 2) * sum_i F_i (theta_i - theta*_i)^2 over the adapter's
    parameters, with the diagonal Fisher of each finished task accumulated as F <- gamma * F + F_task."""

    name = "ewc"
    description = "one adapter, online EWC penalty over its parameters"
    FILE = "ewc.safetensors"

    def __init__(self, lam: float, gamma: float) -> None:
        super().__init__()
        self.lam, self.gamma = lam, gamma
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    def _params(self, module: AdapterTrainer) -> dict[str, torch.nn.Parameter]:
        return module.model.part_parameters(("adapter", "shared"))

    def extra_loss(self, module: AdapterTrainer, batch: dict[str, Any]) -> torch.Tensor | None:
        if not self.fisher:
            return None
        total = 0.0
        for name, p in self._params(module).items():
            fisher, anchor = self.fisher[name].to(p.device), self.anchor[name].to(p.device)
            total = total + (fisher * (p - anchor) ** 2).sum()
        return 0.5 * self.lam * total

    def after_task(self, stage: int, tasks: list[str], module: AdapterTrainer, data: TaskDataModule) -> None:
        params = self._params(module)
        fisher = diagonal_fisher(module, data.train_dataloader(), params)
        for name, value in fisher.items():
            self.fisher[name] = self.gamma * self.fisher[name] + value if name in self.fisher else value
        self.anchor = {name: p.detach().cpu().clone() for name, p in params.items()}

    def save(self, folder: Path) -> None:
        if self.fisher:
            save_file({**{f"fisher.{k}": v.contiguous() for k, v in self.fisher.items()},
                       **{f"anchor.{k}": v.contiguous() for k, v in self.anchor.items()}}, str(folder / self.FILE))

    def load(self, folder: Path) -> None:
        file = folder / self.FILE
        tensors = storage.read_tensors(file) if file.is_file() else {}
        self.fisher = {k[len("fisher."):]: v for k, v in tensors.items() if k.startswith("fisher.")}
        self.anchor = {k[len("anchor."):]: v for k, v in tensors.items() if k.startswith("anchor.")}

    def stored_bytes(self, module: AdapterTrainer, data: TaskDataModule) -> dict[str, int]:
        size = sum(v.numel() * v.element_size() for v in [*self.fisher.values(), *self.anchor.values()])
        return {**super().stored_bytes(module, data), "fisher_and_anchor": size}


def diagonal_fisher(module: AdapterTrainer, batches: Any, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher: the mean over training batches of the squared gradient of the batch loss
    (as Avalanche's EWC computes it), in eval mode (no dropout)."""
    model = module.model
    sums = {name: torch.zeros_like(p, device="cpu") for name, p in params.items()}
    count = 0
    try:
        with model.eval_mode(), torch.enable_grad():
            for batch in batches:
                module.zero_grad(set_to_none=True)
                route = module.routes[batch["task"]]
                loss = kind_of(model.heads[route].problem).loss(module(batch, split="train"), batch["labels"])
                loss.backward()
                for name, p in params.items():
                    if p.grad is not None:
                        sums[name] += p.grad.detach().cpu() ** 2
                count += 1
    finally:
        module.zero_grad(set_to_none=True)
    return {name: value / max(count, 1) for name, value in sums.items()}


class Joint(Strategy):
    """Every task trained at once with the multi-task sampler: the upper bound a* (one stage)."""

    name = "joint"
    description = "all tasks trained together (multi-task sampler), one stage"

    def stages(self, order: list[str]) -> list[list[str]]:
        return [list(order)]


STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (PerTask, Shared, Replay, EWC, Fusion, Joint)}


def build_strategy(config: Any, seed: int) -> Strategy:
    """The strategy a `ContinualConfig` names, with its settings (the runner has checked them)."""
    if config.strategy == PerTask.name:
        return PerTask(config.probe_size)
    if config.strategy == Replay.name:
        return Replay(config.replay_size, config.replay_ratio, seed)
    if config.strategy == EWC.name:
        return EWC(config.ewc_lambda, config.ewc_gamma)
    if config.strategy == Fusion.name:
        return Fusion(config.probe_size, config.fusion)
    return STRATEGIES[config.strategy]()


def tensors_sha256(module: AdapterTrainer, task: str) -> str:
    """SHA-256 over a task's adapter and head tensors (names, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, param in sorted(module.model.task_parameters(task).items()):
        value = param.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def fingerprint(module: AdapterTrainer, data: TaskDataModule, task: str, probe_size: int,
                route: str | None = None) -> dict[str, str]:
    """SHA-256 of the tensors of ``route`` (default: the task itself; or a fusion answering it) and of its logits on
    the task's probe batch (plain forward, eval mode, the backbone's attention kernel as loaded)."""
    route = route or task
    batch = data.first_examples(task, "test", probe_size)
    model = module.model
    device = next(model.parameters()).device
    inputs = [batch.get(k) for k in ("input_ids", "attention_mask", "token_type_ids")]
    with model.eval_mode(), model.loaded_attention():
        logits = model(*[x.to(device) if x is not None else None for x in inputs], tasks=[route])[route]
    raw = logits.float().cpu().contiguous().numpy().tobytes()
    return {"tensors_sha256": tensors_sha256(module, route), "probe_logits_sha256": hashlib.sha256(raw).hexdigest()}
