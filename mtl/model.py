"""`MTLModel`: a frozen encoder, adapter and fusion slots, and per-task heads. Plain `nn.Module`, no Lightning.

The forward contract (routing is data): beside the tokens, the caller says which task each row belongs to.
``tasks="bbc"`` runs the whole batch through one task; ``tasks=["a", "b"]`` runs every row through every listed
task (rows are replicated inside the first adapter slot of those tasks, so everything below it runs once);
``row_tasks=[...]`` names one task per row. A task routes to its adapter, or to a fusion over several adapters
(AdapterFusion stage 2); both are planned here, in one place, and applied by the slots.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from mtl import model_files
from mtl.adapters.bottleneck import BottleneckAdapter
from mtl.adapters.config import AdapterConfig, as_adapter_config
from mtl.adapters.inject import AdapterSlot, Observer, Routing, RoutingContext, Target, inject_slots
from mtl.arch import LayerInputs, arch_spec, layer_list, repeat_rows
from mtl.backbone import DEFAULT_BACKBONE, load_backbone
from mtl.errors import MTLConfigError
from mtl.fusion.config import FusionConfig, as_fusion_config
from mtl.fusion.layer import FusionLayer
from mtl.kinds import kind_of
from mtl.names import check_name
from mtl.part_pool import PartPool
from mtl.registry import Part, PartState, TaskRecord

log = logging.getLogger("mtl")
Group = tuple[Target, slice]


class MTLModel(nn.Module):
    """Frozen backbone + adapters and fusion layers (in slots) + per-task heads, keyed by name."""

    def __init__(self, backbone: str | PreTrainedModel = DEFAULT_BACKBONE, backbone_dropout: bool = False,
                 chunk_rows: int | None = 32, fast_fusion: bool = True) -> None:
        super().__init__()
        if isinstance(backbone, str):
            self.backbone_name = backbone
            backbone = load_backbone(backbone)
        else:
            self.backbone_name = getattr(backbone.config, "_name_or_path", "") or backbone.config.model_type
            for p in backbone.parameters():
                p.requires_grad_(False)
        self.backbone = backbone
        self.loaded_kernel = backbone.config._attn_implementation  # training may switch it (model.attention)
        self.backbone_dropout = backbone_dropout
        self.chunk_rows = chunk_rows  # replicated multi-task rows per pack above the shared layers (None: all)
        self.fast_fusion = fast_fusion  # the exact fast fusion path (False: per-adapter keys and values)
        self.context = RoutingContext()
        self.__dict__["loop"] = arch_spec(backbone).loop  # how this family's layers are called (mtl.arch)
        self.__dict__["slots"] = inject_slots(backbone, self.context)  # they live inside self.backbone
        self.heads = nn.ModuleDict()
        self.records: dict[str, TaskRecord] = {}
        self.adapter_configs: dict[str, AdapterConfig] = {}
        self.fusion_configs: dict[str, FusionConfig] = {}
        self.states: dict[Part, PartState] = {}
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
        """Routable task names (plain tasks and fusion targets) in the order they were added."""
        return list(self.records)

    def iter_slots(self) -> Iterator[AdapterSlot]:
        """Every slot, layer by layer."""
        for per_layer in self.slots:
            yield from per_layer.values()

    def target(self, task: str) -> Target:
        """What a task's rows run through."""
        self._check_tasks([task])
        return self.records[task].target

    def add_task(self, name: str, num_outputs: int, adapter: AdapterConfig | str | dict = "pfeiffer",
                 problem: str = "classification", pooling: str = "mean", head_dropout: float = 0.1,
                 labels: Sequence[str] | None = None, spec: dict[str, Any] | None = None,
                 overwrite: bool = False, adapter_name: str | None = None, pool: PartPool | None = None) -> None:
        """Add a new head for ``name`` and a fresh (identity) adapter.

        ``adapter_name`` lets several tasks share one adapter (each keeps its own head): the first task that
        names it creates it, later ones reuse it and must give the same adapter config. ``pool``: take the modules
        from there when it holds some of these shapes (their values are stale: for a caller that fills them all).
        """
        key = adapter_name or name
        check_name(name, "task name")
        check_name(key, "adapter name")
        self._make_room(name, overwrite)
        config = as_adapter_config(adapter)
        if key in self.fusion_configs:
            raise MTLConfigError(f"adapter name '{key}' is already a fusion name")
        if key in self.adapter_configs:
            if self.adapter_configs[key] != config:
                users = [t for t, r in self.records.items() if r.target.name == key]
                raise MTLConfigError(f"task '{name}': adapter '{key}' already exists with another config (used by {users})")
        else:
            device = next(self.backbone.parameters()).device
            places = [(index, position) for index in config.layers(self.num_layers) for position in config.positions]
            build = lambda: {place: BottleneckAdapter(self.hidden_size, config).to(device) for place in places}
            modules = pool.take(("adapter", config, device), build) if pool is not None else build()
            for (index, position), module in modules.items():
                self.slots[index][position].adapters[key] = module
            self.adapter_configs[key] = config
            self.states[("adapter", key)] = PartState()
        self._add_record(TaskRecord(name, Target(key), list(labels) if labels is not None else None, spec),
                         num_outputs, problem, pooling, head_dropout, pool)

    def add_fusion(self, name: str, adapters: Sequence[str], num_outputs: int,
                   config: FusionConfig | str | dict = "dynamic", problem: str = "classification",
                   pooling: str = "mean", head_dropout: float = 0.1, labels: Sequence[str] | None = None,
                   spec: dict[str, Any] | None = None, overwrite: bool = False) -> None:
        """Add fusion ``name``: a fusion layer at every location of ``adapters`` (in this order) and a head.

        ``name`` is then routable like any task; the fused adapters stay as they are (and keep their states).
        """
        check_name(name, "fusion name")
        adapters = list(adapters)
        unknown = [a for a in adapters if a not in self.adapter_configs]
        if unknown:
            raise MTLConfigError(f"fusion '{name}': unknown adapter(s) {unknown}, expected some of {sorted(self.adapter_configs)}")
        if len(set(adapters)) < 2 or len(set(adapters)) != len(adapters):
            raise MTLConfigError(f"fusion '{name}': adapters {adapters}, expected at least two distinct adapters")
        if name in self.adapter_configs:
            raise MTLConfigError(f"fusion name '{name}' is already an adapter name")
        locations = {a: self.adapter_locations(a) for a in adapters}
        configs = {a: self.adapter_configs[a] for a in adapters}
        if len({tuple(v) for v in locations.values()}) > 1:
            raise MTLConfigError(f"fusion '{name}': adapters sit at different locations "
                                 f"({', '.join(f'{a}: {len(v)} slots' for a, v in locations.items())}); "
                                 f"expected the same layers and positions")
        rules = {(c.parallel, c.original_ln_before, c.residual_before_ln) for c in configs.values()}
        if len(rules) > 1 or any(c.parallel for c in configs.values()):
            raise MTLConfigError(f"fusion '{name}': adapters {adapters} must be sequential (pfeiffer or houlsby) "
                                 f"with the same input and residual rules, got types "
                                 f"{[configs[a].type for a in adapters]}")
        self._make_room(name, overwrite)
        config = as_fusion_config(config)
        dropout = config.dropout_prob
        if dropout is None:
            dropout = getattr(self.backbone.config, "attention_probs_dropout_prob",
                              getattr(self.backbone.config, "attention_dropout", 0.0))
        device = next(self.backbone.parameters()).device
        for index, position in locations[adapters[0]]:
            self.slots[index][position].fusions[name] = FusionLayer(self.hidden_size, config, dropout).to(device)
        self.fusion_configs[name] = config
        self.states[("fusion", name)] = PartState()
        self._add_record(TaskRecord(name, Target(name, tuple(adapters)), list(labels) if labels is not None else None,
                                    spec), num_outputs, problem, pooling, head_dropout)

    def _make_room(self, name: str, overwrite: bool) -> None:
        if name in self.records:
            if not overwrite:
                raise MTLConfigError(f"task '{name}' already exists (set overwrite: true to replace it)")
            self.remove_task(name)

    def _add_record(self, record: TaskRecord, num_outputs: int, problem: str, pooling: str, dropout: float,
                    pool: PartPool | None = None) -> None:
        device = next(self.backbone.parameters()).device
        kind = kind_of(problem)
        build = lambda: kind.build_head(self.hidden_size, num_outputs, pooling, dropout).to(device)
        key = ("head", kind.head_settings(num_outputs, pooling, dropout), device)  # as remove_task keeps heads
        self.heads[record.name] = pool.take(key, build) if pool is not None else build()
        self.states[("head", record.name)] = PartState()
        self.records[record.name] = record
        # the new parts take the model's mode; a whole-model train() would walk every module, a cost that grows with
        # every task (18 ms per load in a server with 64 tasks resident)
        self.heads[record.name].train(self.training)
        for slot in self.iter_slots():
            for parts in (slot.adapters, slot.fusions):
                if record.target.name in parts:
                    parts[record.target.name].train(self.training)

    def remove_task(self, name: str, pool: PartPool | None = None) -> None:
        """Drop a task's head, and its adapter or fusion unless something else still uses it; ``pool``: keep the
        head and adapter modules there for a later task of the same shapes."""
        self._check_tasks([name])
        record = self.records.pop(name)
        head = self.heads.pop(name)
        self.states.pop(("head", name))
        device = next(self.backbone.parameters()).device
        if pool is not None:
            pool.put(("head", head.settings(), device), head)
        target = record.target
        used = {r.target.name for r in self.records.values()} | {a for r in self.records.values() for a in r.target.fused}
        if target.name not in used:
            freed = {}
            for index, per_layer in enumerate(self.slots):
                for position, slot in per_layer.items():
                    modules = slot.fusions if target.is_fusion else slot.adapters
                    if target.name in modules:
                        freed[(index, position)] = modules.pop(target.name)
            config = (self.fusion_configs if target.is_fusion else self.adapter_configs).pop(target.name)
            self.states.pop(record.route_part)
            if pool is not None and not target.is_fusion:
                pool.put(("adapter", config, device), freed)

    def adapter_locations(self, adapter: str) -> list[tuple[int, str]]:
        """(layer, position) of every slot that holds this adapter."""
        return [(s.layer_index, s.position) for s in self.iter_slots() if adapter in s.adapters]

    def adapter_layers(self, name: str) -> list[int]:
        """Layer indices where task ``name`` has an adapter or fusion layer."""
        target = self.target(name)
        return sorted({s.layer_index for s in self.iter_slots() if s.has(target)})

    def part_parameters(self, part: Part) -> dict[str, nn.Parameter]:
        """A part's parameters under stable names (the keys of its exported file)."""
        kind, name = part
        if kind == "head":
            return {f"head.{k}": p for k, p in self.heads[name].named_parameters()}
        params = {}
        for slot in self.iter_slots():
            modules = slot.fusions if kind == "fusion" else slot.adapters
            if name in modules:
                for k, p in modules[name].named_parameters():
                    params[f"{kind}s.{slot.layer_index}.{slot.position}.{k}"] = p
        return params

    def task_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """A task's own parameters (adapter or fusion, and head) under stable names."""
        self._check_tasks([name])
        return {k: p for part in self.records[name].parts for k, p in self.part_parameters(part).items()}

    def backbone_digest(self) -> str:
        """SHA-256 of the frozen backbone's tensors (names and bytes; adapters and fusions excluded)."""
        digest = hashlib.sha256()
        for key, value in sorted(self.backbone.state_dict().items()):
            if ".adapters." not in key and ".fusions." not in key:
                digest.update(key.encode())
                digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    # ---- files: the familiar one-call entry points; `mtl.model_files` does the work ------------------
    def save_pretrained(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Every task and fusion in one folder written atomically (`mtl.model_files.save_pretrained`)."""
        return model_files.save_pretrained(self, folder, overwrite)

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path, backbone: str | PreTrainedModel | None = None) -> MTLModel:
        """Backbone + every task and fusion exported under ``checkpoint_dir`` (a router is loaded beside the model:
        `mtl.deployment.Deployment`)."""
        model = cls(backbone if backbone is not None else model_files.run_backbone(checkpoint_dir))
        model_files.load_run(model, checkpoint_dir)
        return model

    # ---- states: active (routable), trainable (requires_grad), frozen (for good) -------------
    def set_trainable(self, names: Sequence[str], parts: Sequence[Part] = ()) -> None:
        """Make exactly these tasks' own parts (plus ``parts``) trainable; everything else gets requires_grad=False."""
        self._check_tasks(list(names))
        wanted = {part for name in names for part in self.records[name].parts} | set(parts)
        frozen = sorted(p for p in wanted if self.states[p].frozen)
        if frozen:
            raise MTLConfigError(f"{', '.join(f'{k} {n!r}' for k, n in frozen)} frozen for good, cannot be trained again "
                                 "(loaded or finished parts never change; to retrain, train it into a new run folder "
                                 "without loading it, or under another task name)")
        for part in self.states:
            for p in self.part_parameters(part).values():
                p.requires_grad_(part in wanted)

    def freeze(self, part: Part) -> None:
        """Freeze one part for good: no gradients, and `set_trainable` refuses it from now on."""
        for p in self.part_parameters(part).values():
            p.requires_grad_(False)
        self.states[part].frozen = True

    def freeze_task(self, name: str) -> None:
        """Freeze a task's own parts (adapter or fusion, and head) for good."""
        self._check_tasks([name])
        for part in self.records[name].parts:
            self.freeze(part)

    def is_frozen(self, name: str) -> bool:
        """Whether every part a task owns is frozen for good."""
        return all(self.states[p].frozen for p in self.records[name].parts)

    def set_active(self, part: Part, active: bool) -> None:
        """Allow or refuse routing rows to a part (an inactive part's tasks raise an error when called)."""
        self.states[part].active = active

    def trainable_tasks(self) -> list[str]:
        """Tasks with at least one trainable tensor in their own parts."""
        return [t for t in self.tasks if any(p.requires_grad for p in self.task_parameters(t).values())]

    def parameter_table(self) -> str:
        """A table of parameters per part: kind, name, size, layers, state, tasks that use it."""
        rows = [("part", "name", "parameters", "layers", "state", "used by")]
        for (kind, name), state in self.states.items():
            params = self.part_parameters((kind, name))
            trainable = any(p.requires_grad for p in params.values())
            status = "frozen" if state.frozen else ("trainable" if trainable else "no-grad")
            status += "" if state.active else ", inactive"
            users = [t for t, r in self.records.items() if (kind == "head" and t == name) or
                     (kind != "head" and (r.target.name == name or name in r.target.fused))]
            layers = {int(k.split(".")[1]) for k in params if kind != "head"}
            rows.append((kind, name, f"{sum(p.numel() for p in params.values()):,}", str(len(layers)) if layers else "-",
                         status, ",".join(users)))
        frozen_backbone = sum(p.numel() for k, p in self.backbone.named_parameters()
                              if ".adapters." not in k and ".fusions." not in k)
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.append(f"backbone (frozen): {frozen_backbone:,} parameters")
        return "\n".join(lines)

    def train(self, mode: bool = True) -> MTLModel:
        """Train mode for adapters, fusions and heads; frozen backbone layers stay in eval mode unless backbone_dropout."""
        super().train(mode)
        if mode and not self.backbone_dropout:
            self.backbone.eval()
            for slot in self.iter_slots():
                slot.adapters.train(True)
                slot.fusions.train(True)
        return self

    @contextmanager
    def eval_mode(self) -> Iterator[None]:
        """Eval mode (no dropout) for the block; the previous train/eval mode is restored afterwards."""
        was_training = self.training
        self.train(False)
        try:
            yield
        finally:
            self.train(was_training)

    @contextmanager
    def loaded_attention(self) -> Iterator[None]:
        """The backbone's attention kernel as loaded for the block, then the current one again: for numbers that must
        repeat bit for bit whichever kernel a fit picked (the kernels differ by rounding)."""
        config = self.backbone.config
        current = config._attn_implementation
        if current != self.loaded_kernel:
            self.backbone.set_attn_implementation(self.loaded_kernel)
        try:
            yield
        finally:
            if config._attn_implementation != current:
                self.backbone.set_attn_implementation(current)

    # ---- planning ------------------------------------------------------------------------------
    def _check_tasks(self, names: Sequence[str], routable: bool = False) -> None:
        """Every name is a known task; with ``routable``, also active (only routing rows needs that)."""
        unknown = [t for t in names if t not in self.records]
        if unknown:
            raise MTLConfigError(f"no adapter for task(s) {unknown}; known tasks: {self.tasks}")
        if not routable:
            return
        inactive = [t for t in names for p in self.records[t].parts if not self.states[p].active]
        if inactive:
            raise MTLConfigError(f"task(s) {sorted(set(inactive))} are inactive (set_active to route rows to them)")

    def first_adapter_layer(self, targets: Sequence[Target], drops: dict[str, int] | None = None) -> int:
        """Lowest layer index where any of these targets is active (num_layers if none)."""
        drops = drops or {}
        # no min(..., default=): torch.compile cannot trace that keyword and would break the graph here
        layers = [s.layer_index for s in self.iter_slots() for t in targets
                  if s.has(t) and s.layer_index >= drops.get(t.name, 0)]
        return min(layers) if layers else self.num_layers

    def drop_depths(self, tasks: Sequence[str], drop_first: int | None) -> dict[str, int]:
        """Adapter-free first layers per target for this call: ``drop_first`` or each adapter's configured depth."""
        drops = {}
        for task in tasks:
            target = self.records[task].target
            if target.is_fusion:  # fusion layers exist only where all fused adapters do
                drops[target.name] = drop_first or 0
                continue
            config = self.adapter_configs[target.name]
            depth = config.drop_first if drop_first is None else drop_first
            if not self.training and not config.trained_with_depth(depth) and (task, depth) not in self._reported_drops:
                self._reported_drops.add((task, depth))
                log.warning("task '%s': evaluating with adapters dropped in the first %d layers; it was trained with "
                            "%d dropped", task, depth, config.drop_first)
            drops[target.name] = depth
        return drops

    def fusion_temperatures(self, step: int | None) -> dict[str, float]:
        """Each fusion's softmax temperature: annealed over optimiser ``step`` in training, final in evaluation."""
        return {name: c.temperature_at(step if self.training else None) for name, c in self.fusion_configs.items()}

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, tasks: str | Sequence[str] | None = None,
                row_tasks: Sequence[str] | None = None, drop_first: int | None = None,
                prefix: torch.Tensor | None = None, prefix_layers: int = 0, fusion_step: int | None = None,
                observe: Observer | None = None) -> dict[str, torch.Tensor]:
        """Logits per task: ``{task: logits}`` for the rows routed to that task (in input order).

        ``drop_first`` overrides every adapter's AdapterDrop depth for this call. ``prefix`` / ``prefix_layers``:
        hidden states after the first layers, precomputed (see `prefix_states`). ``fusion_step``: the optimiser
        step that sets each fusion's temperature while training. ``observe`` receives fusion attention weights.
        """
        if (tasks is None) == (row_tasks is None):
            raise ValueError("give exactly one of tasks= (whole batch) or row_tasks= (one task per row)")
        batch = input_ids.shape[0]
        if row_tasks is not None:
            row_tasks = list(row_tasks)
            if len(row_tasks) != batch:
                raise ValueError(f"row_tasks has {len(row_tasks)} names for {batch} rows")
            names = list(dict.fromkeys(row_tasks))
            self._check_tasks(names, routable=True)
            # group rows by task (stable, so each task keeps its rows in input order) to route contiguous ranges
            order = sorted(range(batch), key=lambda r: names.index(row_tasks[r]))
            if order != list(range(batch)):
                index = torch.tensor(order, device=input_ids.device)
                input_ids, attention_mask, token_type_ids, prefix = (
                    t.index_select(0, index) if t is not None else None
                    for t in (input_ids, attention_mask, token_type_ids, prefix))
            rows, start = {}, 0
            for task in names:
                rows[task] = slice(start, start + row_tasks.count(task))
                start = rows[task].stop
            groups = [(self.records[t].target, rows[t]) for t in names]
            copies = 1
        else:
            names = [tasks] if isinstance(tasks, str) else list(dict.fromkeys(tasks))
            self._check_tasks(names, routable=True)
            # one copy of the rows per distinct target: tasks that share an adapter share its hidden states
            targets = list(dict.fromkeys(self.records[t].target for t in names))
            copies = len(targets)
            spans = {t: slice(None) if copies == 1 else slice(i * batch, (i + 1) * batch) for i, t in enumerate(targets)}
            groups = list(spans.items())
            rows = {t: spans[self.records[t].target] for t in names}
        routing = Routing(temperatures=self.fusion_temperatures(fusion_step), fast_fusion=self.fast_fusion,
                          observe=observe)
        hidden = self.encode(input_ids, attention_mask, token_type_ids, groups, copies=copies,
                             drops=self.drop_depths(names, drop_first), prefix=prefix, prefix_layers=prefix_layers,
                             routing=routing)
        masks = {t: attention_mask if copies > 1 or attention_mask is None else attention_mask[rows[t]] for t in names}
        return {t: self.heads[t](hidden[rows[t]], masks[t]) for t in names}

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, token_type_ids: torch.Tensor | None,
               groups: list[Group], copies: int = 1, drops: dict[str, int] | None = None,
               prefix: torch.Tensor | None = None, prefix_layers: int = 0, routing: Routing | None = None) -> torch.Tensor:
        """Embeddings, then the layer loop with ``groups`` (target, rows) routed from the first layer that has any
        of those targets; ``drops`` gives each target's adapter-free first layers (AdapterDrop).

        ``prefix`` holds precomputed hidden states after the first ``prefix_layers`` layers (the frozen-prefix
        cache), so those layers are skipped. With ``copies > 1`` the layers below the first adapter layer run once;
        that layer runs once up to its first slot with an adapter, which makes one copy of the rows per group.
        Layers above run on packs of at most ``chunk_rows`` rows (whole groups), since very large batches run
        slower per row on CPUs than moderate ones. ``routing`` carries the per-call settings (temperatures...).
        """
        if isinstance(groups, (str, Target)) or not all(
                isinstance(g, tuple) and len(g) == 2 and isinstance(g[0], (Target, type(None))) for g in groups):
            raise TypeError(f"encode: groups must be a list of (Target, slice) pairs (see MTLModel.target), got "
                            f"{groups!r:.80}; for a task's logits call the model with tasks=")
        drops = drops or {}
        base = routing or Routing(temperatures=self.fusion_temperatures(None), fast_fusion=self.fast_fusion)
        hidden = self.loop.embed(self.backbone, input_ids, token_type_ids, attention_mask) if prefix is None else prefix
        inputs = self.loop.inputs(self.backbone, hidden, attention_mask)
        targets = [t for t, _ in groups]
        start = self.first_adapter_layer(targets, drops)
        if start < prefix_layers:
            raise ValueError(f"an adapter is active in layer {start}, inside the {prefix_layers} precomputed layers")
        hidden = self.run_layers(hidden, inputs, [], prefix_layers, start)
        if copies == 1:
            hidden = self.run_layers(hidden, inputs, groups, start, self.num_layers, drops, base=base)
            return self.loop.finish(self.backbone, hidden)
        rows = hidden.shape[0]
        replicated = start < self.num_layers and all(s.can_replicate for s in self.slots[start].values())
        if replicated:
            hidden = self.run_layers(hidden, inputs, groups, start, start + 1, drops, replicate=copies, base=base)
            start += 1
        outputs, done = [], 0
        for pack in self._packs(targets, rows):
            pack_hidden = hidden[done * rows:(done + len(pack)) * rows] if replicated else repeat_rows(hidden, len(pack))
            pack_groups = [(t, slice(i * rows, (i + 1) * rows)) for i, t in enumerate(pack)]
            outputs.append(self.run_layers(pack_hidden, inputs.repeat(len(pack)), pack_groups, start,
                                           self.num_layers, drops, base=base))
            done += len(pack)
        return self.loop.finish(self.backbone, torch.cat(outputs, dim=0))

    @torch.no_grad()
    def prefix_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      token_type_ids: torch.Tensor | None, layers: int) -> torch.Tensor:
        """Hidden states after the first ``layers`` layers with no adapter and the backbone in eval mode."""
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            hidden = self.loop.embed(self.backbone, input_ids, token_type_ids, attention_mask)
            return self.run_layers(hidden, self.loop.inputs(self.backbone, hidden, attention_mask), [], 0, layers)
        finally:
            self.backbone.train(was_training)

    def run_layers(self, hidden: torch.Tensor, inputs: LayerInputs, groups: list[Group], first: int, last: int,
                   drops: dict[str, int] | None = None, replicate: int = 1, base: Routing | None = None) -> torch.Tensor:
        """Run layers ``first .. last-1``; a target is skipped in the layers below its drop depth.

        ``replicate > 1``: the rows come in once and layer ``first``'s first slot with an adapter copies them.
        """
        drops, base = drops or {}, base or Routing()
        layers = layer_list(self.backbone)
        for index in range(first, last):
            routed = [(t if index >= drops.get(t.name, 0) else None, rows) for t, rows in groups]
            copies, at = 1, None
            if replicate > 1 and index == first:
                copies = replicate
                at = next(p for p, s in self.slots[index].items() if any(s.has(t) for t, _ in routed))
            routing = dataclasses.replace(base, groups=routed, replicate=copies, replicate_at=at)
            with self.context.use(routing):
                hidden = self.loop.call(self.backbone, index, layers[index], hidden, inputs)
        return hidden

    def _packs(self, targets: list[Target], rows: int) -> list[list[Target]]:
        """Consecutive groups of targets whose replicated rows fit in ``chunk_rows`` (at least one each)."""
        per_pack = max(1, (self.chunk_rows or rows * len(targets)) // rows)
        return [targets[i:i + per_pack] for i in range(0, len(targets), per_pack)]

    def value_regularization(self) -> torch.Tensor:
        """Σ reg_weight · ‖I − V‖²_F over the fusion layers that train and regularise (0 if none)."""
        total = torch.zeros((), device=next(self.backbone.parameters()).device)
        for slot in self.iter_slots():
            for name, fusion in slot.fusions.items():
                config = self.fusion_configs[name]
                if config.regularization and any(p.requires_grad for p in fusion.parameters()):
                    total = total + config.reg_weight * fusion.value_regularization()
        return total
