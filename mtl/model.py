"""`MTLModel`: a frozen encoder, adapter slots and per-task heads. Plain `nn.Module`, no Lightning.

The forward contract (routing is data): beside the tokens, the caller says which task each row
belongs to. ``tasks="bbc"`` runs the whole batch through one task; ``tasks=["a", "b"]`` runs every
row through every listed task (rows are replicated inside the first adapter slot of those tasks,
so everything below it runs once); ``row_tasks=[...]`` names one task per row.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from mtl.adapters.bottleneck import BottleneckAdapter
from mtl.adapters.config import AdapterConfig, as_adapter_config
from mtl.adapters.inject import AdapterSlot, Routing, RoutingContext, inject_slots, repeat_rows
from mtl.arch import attention_mask_4d, embed, layer_list
from mtl.backbone import DEFAULT_BACKBONE, load_backbone
from mtl.errors import MTLConfigError
from mtl.heads import TaskHead

log = logging.getLogger("mtl")
_TASK_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


class MTLModel(nn.Module):
    """Frozen backbone + per-task adapters (in slots) + per-task heads, keyed by task name."""

    def __init__(self, backbone: str | PreTrainedModel = DEFAULT_BACKBONE, backbone_dropout: bool = False,
                 chunk_rows: int | None = 32) -> None:
        super().__init__()
        if isinstance(backbone, str):
            self.backbone_name = backbone
            backbone = load_backbone(backbone)
        else:
            self.backbone_name = getattr(backbone.config, "_name_or_path", "") or backbone.config.model_type
            for p in backbone.parameters():
                p.requires_grad_(False)
        self.backbone = backbone
        self.backbone_dropout = backbone_dropout
        self.chunk_rows = chunk_rows  # replicated multi-task rows per pack above the shared layers (None: all)
        self.context = RoutingContext()
        self.__dict__["slots"] = inject_slots(backbone, self.context)  # they live inside self.backbone
        self.heads = nn.ModuleDict()
        self.task_adapter: dict[str, str] = {}  # task -> adapter name (the same unless adapters are shared)
        self.adapter_configs: dict[str, AdapterConfig] = {}
        self.task_meta: dict[str, dict[str, Any]] = {}
        self.frozen: set[str] = set()
        self._reported_drops: set[tuple[str, int]] = set()
        self.train(False)

    # ---- structure -------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        """Width of the backbone's hidden states."""
        return self.backbone.config.hidden_size

    @property
    def num_layers(self) -> int:
        """Number of transformer layers."""
        return len(self.slots)

    @property
    def tasks(self) -> list[str]:
        """Task names in the order they were added."""
        return list(self.heads.keys())

    def add_task(self, name: str, num_outputs: int, adapter: AdapterConfig | str | dict = "pfeiffer",
                 problem: str = "classification", pooling: str = "mean", head_dropout: float = 0.1,
                 labels: Sequence[str] | None = None, spec: dict[str, Any] | None = None,
                 overwrite: bool = False, adapter_name: str | None = None) -> None:
        """Add a new head for ``name`` and a fresh (identity) adapter.

        ``adapter_name`` lets several tasks share one adapter (each keeps its own head): the first task that
        names it creates it, later ones reuse it and must give the same adapter config.
        """
        key = adapter_name or name
        for value, what in ((name, "task name"), (key, "adapter name")):
            if not _TASK_NAME.match(value or ""):
                raise MTLConfigError(f"{what} '{value}' is invalid, expected letters, digits, '_' or '-'")
        if name in self.heads:
            if not overwrite:
                raise MTLConfigError(f"task '{name}' already exists (set overwrite: true to replace it)")
            self.remove_task(name)
        config = as_adapter_config(adapter)
        shared_with = [t for t, k in self.task_adapter.items() if k == key]
        if shared_with and self.adapter_configs[shared_with[0]] != config:
            raise MTLConfigError(f"task '{name}': adapter '{key}' already exists with another config "
                                 f"(used by {shared_with})")
        device = next(self.backbone.parameters()).device
        if not shared_with:
            for index in config.layers(self.num_layers):
                for position in config.positions:
                    self.slots[index][position].adapters[key] = BottleneckAdapter(self.hidden_size, config).to(device)
        self.heads[name] = TaskHead(self.hidden_size, num_outputs, problem, pooling, head_dropout).to(device)
        self.task_adapter[name] = key
        self.adapter_configs[name] = config
        self.task_meta[name] = {"labels": list(labels) if labels is not None else None, "spec": spec,
                                "head": {"num_outputs": num_outputs, "problem": problem, "pooling": pooling,
                                         "dropout": head_dropout}}
        self.train(self.training)

    def remove_task(self, name: str) -> None:
        """Drop a task's head, and its adapter unless another task shares it."""
        self._check_tasks([name])
        key = self.task_adapter.pop(name)
        if key not in self.task_adapter.values():
            for slot in self.iter_slots():
                if key in slot.adapters:
                    del slot.adapters[key]
        del self.heads[name]
        self.adapter_configs.pop(name)
        self.task_meta.pop(name)
        self.frozen.discard(name)

    def iter_slots(self) -> Iterator[AdapterSlot]:
        """Every slot, layer by layer."""
        for per_layer in self.slots:
            yield from per_layer.values()

    def task_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """A task's adapter and head parameters under stable names (the adapter file's keys)."""
        self._check_tasks([name])
        key = self.task_adapter[name]
        params = {}
        for slot in self.iter_slots():
            if key in slot.adapters:
                for param_name, p in slot.adapters[key].named_parameters():
                    params[f"adapters.{slot.layer_index}.{slot.position}.{param_name}"] = p
        for param_name, p in self.heads[name].named_parameters():
            params[f"head.{param_name}"] = p
        return params

    def backbone_digest(self) -> str:
        """SHA-256 of the frozen backbone's tensors (names and bytes; adapters excluded)."""
        digest = hashlib.sha256()
        for key, value in sorted(self.backbone.state_dict().items()):
            if ".adapters." not in key:
                digest.update(key.encode())
                digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def adapter_layers(self, name: str) -> list[int]:
        """Layer indices where task ``name`` has an adapter."""
        key = self.task_adapter[name]
        return sorted({s.layer_index for s in self.iter_slots() if key in s.adapters})

    # ---- states: active (routable), trainable (requires_grad), frozen (for good) -------------
    def set_trainable(self, names: Sequence[str]) -> None:
        """Make exactly these tasks' adapters and heads trainable; every other task gets requires_grad=False."""
        names = list(names)
        self._check_tasks(names)
        frozen = sorted(set(names) & self.frozen)
        if frozen:
            raise MTLConfigError(f"tasks {frozen} are frozen for good and cannot be trained again")
        for task in self.tasks:
            for p in self.task_parameters(task).values():
                p.requires_grad_(task in names)

    def freeze_task(self, name: str) -> None:
        """Freeze a task for good: no gradients, and `set_trainable` refuses it from now on."""
        for p in self.task_parameters(name).values():
            p.requires_grad_(False)
        self.frozen.add(name)

    def trainable_tasks(self) -> list[str]:
        """Tasks with at least one trainable tensor."""
        return [t for t in self.tasks if any(p.requires_grad for p in self.task_parameters(t).values())]

    def parameter_table(self) -> str:
        """A table of parameters per task: adapter, head, state."""
        rows = [("task", "adapter", "head", "layers", "state")]
        for task in self.tasks:
            params = self.task_parameters(task)
            adapter = sum(p.numel() for k, p in params.items() if k.startswith("adapters."))
            head = sum(p.numel() for k, p in params.items() if k.startswith("head."))
            trainable = any(p.requires_grad for p in params.values())
            state = "frozen" if task in self.frozen else ("trainable" if trainable else "inactive-grad")
            shared = "" if self.task_adapter[task] == task else f" (shared '{self.task_adapter[task]}')"
            rows.append((task, f"{adapter:,}{shared}", f"{head:,}", str(len(self.adapter_layers(task))), state))
        backbone = sum(p.numel() for p in self.backbone.parameters()) - sum(
            p.numel() for s in self.iter_slots() for p in s.adapters.parameters())
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        lines.append(f"backbone (frozen): {backbone:,} parameters")
        return "\n".join(lines)

    def train(self, mode: bool = True) -> MTLModel:
        """Train mode for adapters and heads; frozen backbone layers stay in eval mode unless backbone_dropout."""
        super().train(mode)
        if mode and not self.backbone_dropout:
            self.backbone.eval()
            for slot in self.iter_slots():
                slot.adapters.train(True)
        return self

    # ---- forward -------------------------------------------------------------------------------
    def _check_tasks(self, names: Sequence[str]) -> None:
        unknown = [t for t in names if t not in self.heads]
        if unknown:
            raise MTLConfigError(f"no adapter for task(s) {unknown}; known tasks: {self.tasks}")

    def first_adapter_layer(self, adapter_names: Sequence[str], drops: dict[str, int] | None = None) -> int:
        """Lowest layer index where any of these adapters is active (num_layers if none)."""
        drops = drops or {}
        return min((s.layer_index for s in self.iter_slots() for key in adapter_names
                    if key in s.adapters and s.layer_index >= drops.get(key, 0)), default=self.num_layers)

    def drop_depths(self, tasks: Sequence[str], drop_first: int | None) -> dict[str, int]:
        """Adapter-free first layers per adapter for this call: ``drop_first`` or each adapter's configured depth."""
        drops = {}
        for task in tasks:
            config = self.adapter_configs[task]
            depth = config.drop_first if drop_first is None else drop_first
            if not self.training and not config.trained_with_depth(depth) and (task, depth) not in self._reported_drops:
                self._reported_drops.add((task, depth))
                log.warning("task '%s': evaluating with adapters dropped in the first %d layers; it was trained with "
                            "%d dropped", task, depth, config.drop_first)
            drops[self.task_adapter[task]] = depth
        return drops

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, token_type_ids: torch.Tensor | None,
               groups: list[tuple[str, slice]], copies: int = 1, drops: dict[str, int] | None = None,
               prefix: torch.Tensor | None = None, prefix_layers: int = 0) -> torch.Tensor:
        """Embeddings, then the layer loop with ``groups`` (adapter name, rows) routed from the first layer that has
        any of those adapters; ``drops`` gives each adapter's adapter-free first layers (AdapterDrop).

        ``prefix`` holds precomputed hidden states after the first ``prefix_layers`` layers (the frozen-prefix
        cache), so those layers are skipped. With ``copies > 1`` the layers below the first adapter layer run once;
        that layer runs once up to its first adapter slot, which makes one copy of the rows per group (what the
        layer computes before that slot is the same for every task). Layers above run on packs of at most
        ``chunk_rows`` rows (whole groups), since very large batches run slower per row on CPUs than moderate ones.
        """
        drops = drops or {}
        hidden = embed(self.backbone, input_ids, token_type_ids) if prefix is None else prefix
        mask = attention_mask_4d(self.backbone, hidden, attention_mask)
        start = self.first_adapter_layer([key for key, _ in groups], drops)
        if start < prefix_layers:
            raise ValueError(f"an adapter is active in layer {start}, inside the {prefix_layers} precomputed layers")
        hidden = self.run_layers(hidden, mask, [], prefix_layers, start)
        if copies == 1:
            return self.run_layers(hidden, mask, groups, start, self.num_layers, drops)
        rows = hidden.shape[0]
        replicated = start < self.num_layers and all(s.can_replicate for s in self.slots[start].values())
        if replicated:
            hidden = self.run_layers(hidden, mask, groups, start, start + 1, drops, replicate=copies)
            if hidden.shape[0] != rows * copies:
                raise RuntimeError(f"layer {start} did not replicate the rows for {copies} tasks")
            start += 1
        outputs, done = [], 0
        for pack in self._packs([key for key, _ in groups], rows):
            pack_hidden = hidden[done * rows:(done + len(pack)) * rows] if replicated else repeat_rows(hidden, len(pack))
            pack_groups = [(key, slice(i * rows, (i + 1) * rows)) for i, key in enumerate(pack)]
            outputs.append(self.run_layers(pack_hidden, repeat_rows(mask, len(pack)), pack_groups, start,
                                           self.num_layers, drops))
            done += len(pack)
        return torch.cat(outputs, dim=0)

    @torch.no_grad()
    def prefix_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      token_type_ids: torch.Tensor | None, layers: int) -> torch.Tensor:
        """Hidden states after the first ``layers`` layers with no adapter and the backbone in eval mode."""
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            hidden = embed(self.backbone, input_ids, token_type_ids)
            mask = attention_mask_4d(self.backbone, hidden, attention_mask)
            return self.run_layers(hidden, mask, [], 0, layers)
        finally:
            self.backbone.train(was_training)

    def run_layers(self, hidden: torch.Tensor, mask: torch.Tensor | None, groups: list[tuple[str, slice]],
                   first: int, last: int, drops: dict[str, int] | None = None, replicate: int = 1) -> torch.Tensor:
        """Run layers ``first .. last-1``; an adapter is skipped in the layers below its drop depth.

        ``replicate > 1``: the rows come in once and the first slot with an adapter copies them (`Routing`).
        """
        drops = drops or {}
        layers = layer_list(self.backbone)
        for index in range(first, last):
            routed = [(key if index >= drops.get(key, 0) else None, rows) for key, rows in groups]
            with self.context.use(Routing(routed, replicate if index == first else 1)):
                hidden = layers[index](hidden, mask)
        return hidden

    def _packs(self, keys: list[str], rows: int) -> list[list[str]]:
        """Consecutive groups of adapter names whose replicated rows fit in ``chunk_rows`` (at least one each)."""
        per_pack = max(1, (self.chunk_rows or rows * len(keys)) // rows)
        return [keys[i:i + per_pack] for i in range(0, len(keys), per_pack)]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, tasks: str | Sequence[str] | None = None,
                row_tasks: Sequence[str] | None = None, drop_first: int | None = None,
                prefix: torch.Tensor | None = None, prefix_layers: int = 0, **_: Any) -> dict[str, torch.Tensor]:
        """Logits per task: ``{task: logits}`` for the rows routed to that task (in input order).

        ``drop_first`` overrides every adapter's AdapterDrop depth for this call (robust dropping, or evaluating
        with more layers dropped; the latter is logged once per task and depth). ``prefix`` / ``prefix_layers``:
        hidden states after the first layers, precomputed (see `prefix_states`).
        """
        if (tasks is None) == (row_tasks is None):
            raise ValueError("give exactly one of tasks= (whole batch) or row_tasks= (one task per row)")
        if row_tasks is not None:
            return self._forward_rows(input_ids, attention_mask, token_type_ids, list(row_tasks), drop_first)
        names = [tasks] if isinstance(tasks, str) else list(dict.fromkeys(tasks))
        self._check_tasks(names)
        batch = input_ids.shape[0]
        # one copy of the rows per distinct adapter: tasks that share an adapter share its hidden states
        keys = list(dict.fromkeys(self.task_adapter[t] for t in names))
        if len(keys) == 1:
            rows = {keys[0]: slice(None)}
        else:
            rows = {k: slice(i * batch, (i + 1) * batch) for i, k in enumerate(keys)}
        hidden = self.encode(input_ids, attention_mask, token_type_ids, list(rows.items()), copies=len(keys),
                             drops=self.drop_depths(names, drop_first), prefix=prefix, prefix_layers=prefix_layers)
        return {t: self.heads[t](hidden[rows[self.task_adapter[t]]], attention_mask) for t in names}

    def _forward_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      token_type_ids: torch.Tensor | None, row_tasks: list[str],
                      drop_first: int | None = None) -> dict[str, torch.Tensor]:
        if len(row_tasks) != input_ids.shape[0]:
            raise ValueError(f"row_tasks has {len(row_tasks)} names for {input_ids.shape[0]} rows")
        names = list(dict.fromkeys(row_tasks))
        self._check_tasks(names)
        # group rows by task (stable, so each task keeps its rows in input order) to route contiguous ranges
        order = sorted(range(len(row_tasks)), key=lambda r: names.index(row_tasks[r]))
        index = torch.tensor(order, device=input_ids.device)
        ids, mask, types = (t.index_select(0, index) if t is not None else None
                            for t in (input_ids, attention_mask, token_type_ids))
        bounds, start = {}, 0
        for task in names:
            count = row_tasks.count(task)
            bounds[task] = slice(start, start + count)
            start += count
        groups = [(self.task_adapter[t], s) for t, s in bounds.items()]
        hidden = self.encode(ids, mask, types, groups, drops=self.drop_depths(names, drop_first))
        return {t: self.heads[t](hidden[s], mask[s] if mask is not None else None) for t, s in bounds.items()}

    # ---- files -----------------------------------------------------------------------------------
    def save_task(self, name: str, directory: str | Path, overwrite: bool = False) -> Path:
        """Write ``directory/<name>/`` (adapter.safetensors + adapter_config.json) atomically."""
        from mtl.io import save_task

        return save_task(self, name, directory, overwrite=overwrite)

    def load_task(self, path: str | Path, overwrite: bool = False) -> str:
        """Load one exported task directory into this model; returns the task name."""
        from mtl.io import load_task

        return load_task(self, path, overwrite=overwrite)

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path, backbone: str | PreTrainedModel | None = None) -> MTLModel:
        """Backbone + every task exported under ``checkpoint_dir/adapters/``."""
        from mtl.io import load_model

        return load_model(cls, checkpoint_dir, backbone=backbone)

