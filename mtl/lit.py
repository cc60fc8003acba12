"""The `LightningModule`: steps, per-task metrics, optimizer over trainable tensors, trimmed checkpoints."""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from mtl.adapters.config import AdapterConfig, as_adapter_config
from mtl.arch import layer_list
from mtl.backbone import DEFAULT_BACKBONE
from mtl.data.spec import TaskSpec, load_task_spec
from mtl.errors import MTLConfigError
from mtl.metrics import build_metrics
from mtl.model import MTLModel
from mtl.prefix_cache import PrefixCache, cache_key

# the frozen backbone runs in eval mode on purpose (no dropout in frozen layers; see MTLModel.train)
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


def head_outputs(spec: TaskSpec) -> int:
    """Number of head outputs a task needs."""
    return 1 if spec.problem == "regression" else len(spec.labels)


class AdapterTrainer(L.LightningModule):
    """Trains the adapters and heads of ``tasks`` over a frozen backbone, and exports them.

    Args:
        tasks: task names (``tasks/<name>.yaml``) or spec paths; linked from ``data.tasks``.
        backbone: backbone alias, local directory or cached hub name.
        adapter: adapter settings (``type: pfeiffer | houlsby | parallel`` plus overrides).
        tasks_dir: folder of task specs; linked from ``data.tasks_dir``.
        lr: peak learning rate (adapters on small data want about 1e-3).
        weight_decay: AdamW weight decay (not applied to biases).
        warmup_ratio: fraction of the training steps with linear warm-up, then linear decay to 0.
        head_pooling: ``mean`` over real tokens or ``cls``.
        head_dropout: dropout inside the heads while training.
        backbone_dropout: run the frozen backbone's dropout while training (off by default: faster, see README).
        run_dir: run folder; adapters are exported to ``<run_dir>/adapters/<task>/`` when fit ends.
        overwrite: replace already exported adapters (and loaded tasks) of the same task names.
        export: export trained tasks when fit ends.
        adapter_sharing: ``per_task`` (one adapter per task) or ``shared`` (one adapter for all ``tasks``, each
            with its own head: the classic multi-task adapter baseline).
        load_from: a run folder whose exported adapters are loaded first, frozen, before ``tasks`` are added
            (adding a task to a trained system); set ``run_dir`` to the same folder to export beside them.
        eval_tasks: loaded tasks that are evaluated but not trained; linked from ``data.eval_tasks``.
        drop_seed: seed of the per-batch depths drawn for ``adapter.robust_drop``.
        cache_frozen_prefix: compute each training/validation example's hidden states after the first
            ``adapter.drop_first`` layers once (first epoch) and reuse them, so later epochs run only the layers
            above. Exact only for fixed dropping: refused with robust_drop, backbone_dropout, or trainable
            parameters in those layers. The cached layers run in eval mode (no dropout).
        cache_memory_mb: memory for the cache; rows beyond it go to a memory-mapped file in ``cache_dir``.
        cache_dtype: float32, or bfloat16 / float16 to halve the cache (see benchmarks/RESULTS.md for accuracy).
        cache_dir: folder for the on-disk part (default ``<run_dir>/prefix_cache``); reused by later runs with
            the same backbone, depth, tokenizer and data.
    """

    def __init__(self, tasks: list[str], backbone: str = DEFAULT_BACKBONE, adapter: AdapterConfig | dict | None = None,
                 tasks_dir: str = "tasks", lr: float = 1e-3, weight_decay: float = 0.01, warmup_ratio: float = 0.1,
                 head_pooling: str = "mean", head_dropout: float = 0.1, backbone_dropout: bool = False,
                 run_dir: str = "checkpoints/run", overwrite: bool = False, export: bool = True,
                 adapter_sharing: str = "per_task", load_from: str | None = None,
                 eval_tasks: list[str] | None = None, drop_seed: int = 0, cache_frozen_prefix: bool = False,
                 cache_memory_mb: float = 2048, cache_dtype: str = "float32", cache_dir: str | None = None) -> None:
        super().__init__()
        adapter = as_adapter_config(adapter) if adapter is not None else AdapterConfig()
        # hparams hold plain types only, so checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters(ignore=["adapter"])
        self.hparams["adapter"] = adapter.to_dict()
        if adapter_sharing not in ("per_task", "shared"):
            raise MTLConfigError(f"model.adapter_sharing: '{adapter_sharing}', expected per_task or shared")
        if not tasks and not load_from:
            raise MTLConfigError("model.tasks: empty, expected at least one task name (or model.load_from)")
        self.model = MTLModel(backbone, backbone_dropout=backbone_dropout)
        if load_from:
            self._load_trained(load_from)
        self.specs: dict[str, TaskSpec] = {}
        for name in tasks:
            spec = load_task_spec(name, tasks_dir)
            self.specs[spec.name] = spec
            if spec.name in self.model.tasks and not overwrite:
                raise MTLConfigError(f"task '{spec.name}' is already trained in {load_from} "
                                     f"(set model.overwrite: true to train it again from scratch)")
            self.model.add_task(spec.name, head_outputs(spec), adapter, problem=spec.problem, pooling=head_pooling,
                                head_dropout=head_dropout, labels=spec.labels, spec=spec.to_dict(), overwrite=True,
                                adapter_name="shared" if adapter_sharing == "shared" else None)
        self.model.set_trainable(list(self.specs))
        for name in eval_tasks or []:
            spec = load_task_spec(name, tasks_dir)
            if spec.name not in self.model.tasks:
                raise MTLConfigError(f"data.eval_tasks: task '{spec.name}' has no trained adapter "
                                     f"(expected it under {load_from or 'model.load_from'}/adapters/)")
            have = self.model.heads[spec.name].num_outputs
            if have != head_outputs(spec):
                raise MTLConfigError(f"{spec.spec_file}: labels: {head_outputs(spec)} labels, but the adapter of "
                                     f"'{spec.name}' has a head with {have} outputs")
            self.specs[spec.name] = spec
        self._drop_rng: random.Random | None = None
        self.prefix_cache: PrefixCache | None = None
        self.val_metrics = self._metrics("val")
        self.test_metrics = self._metrics("test")

    def _metrics(self, stage: str) -> nn.ModuleDict:
        return nn.ModuleDict({name: build_metrics(spec.problem, spec.metrics, head_outputs(spec), f"{stage}/{name}/")
                              for name, spec in self.specs.items()})

    def _load_trained(self, folder: str) -> None:
        """Load every exported task under ``folder`` and freeze it for good."""
        from mtl.io import load_task, read_task_config, task_dirs

        for path in task_dirs(folder):
            exported_on = read_task_config(path).get("backbone")
            if exported_on != self.model.backbone_name:
                raise MTLConfigError(f"{path}/adapter_config.json: adapter trained for backbone '{exported_on}', "
                                     f"but model.backbone is '{self.model.backbone_name}'")
            self.model.freeze_task(load_task(self.model, path))

    @property
    def run_dir(self) -> Path:
        """Where this run exports its adapters."""
        return Path(self.hparams.run_dir)

    # ---- steps ---------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Any], drop_first: int | None = None, split: str | None = None) -> torch.Tensor:
        """Logits of the batch's task (from the frozen-prefix cache when it is on and ``split`` is cached)."""
        task = batch["task"]
        ids, mask, types = batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids")
        cache = self.prefix_cache
        if cache is not None and (task, split) in cache.sizes and "index" in batch:
            k = cache.k

            def compute(rows: torch.Tensor) -> torch.Tensor:
                pick = lambda t: t.index_select(0, rows) if t is not None else None  # noqa: E731
                return self.model.prefix_states(pick(ids), pick(mask), pick(types), k)

            prefix = cache.fetch((task, split), batch["index"].tolist(), mask, compute)
            return self.model(ids, mask, types, tasks=task, prefix=prefix, prefix_layers=k)[task]
        return self.model(ids, mask, types, tasks=task, drop_first=drop_first)[task]

    def robust_drop_depth(self, task: str) -> int | None:
        """For robust AdapterDrop: this training batch's adapter-free first layers, n ~ U[0, L-1] (seeded)."""
        if not self.model.adapter_configs[task].robust_drop:
            return None
        if self._drop_rng is None:
            self._drop_rng = random.Random(self.hparams.drop_seed)
        return self._drop_rng.randrange(self.model.num_layers)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits = self(batch, drop_first=self.robust_drop_depth(batch["task"]), split="train")
        loss = self.model.heads[batch["task"]].loss(logits, batch["labels"])
        size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        if len(self.hparams.tasks) > 1:
            self.log(f"train/{batch['task']}/loss", loss, batch_size=size)
        return loss

    def _eval_step(self, batch: dict[str, Any], metrics: nn.ModuleDict, stage: str) -> None:
        task = batch["task"]
        logits = self(batch, split="validation" if stage == "val" else None)
        loss = self.model.heads[task].loss(logits, batch["labels"])
        self.log(f"{stage}/{task}/loss", loss, batch_size=batch["input_ids"].shape[0], add_dataloader_idx=False)
        head = self.model.heads[task]
        target = batch["labels"]
        preds = logits.squeeze(-1) if head.problem == "regression" else logits
        metrics[task].update(preds, target.long() if head.problem != "regression" else target)

    def _eval_epoch_end(self, metrics: nn.ModuleDict, stage: str) -> None:
        values: dict[str, list[torch.Tensor]] = {}
        for task, collection in metrics.items():
            if not any(m.update_called for m in collection.values()):
                continue
            for key, value in collection.compute().items():
                self.log(key, value, prog_bar=key.endswith("/acc"), add_dataloader_idx=False)
                values.setdefault(key.rsplit("/", 1)[1], []).append(value)
            collection.reset()
        for metric, vals in values.items():
            self.log(f"{stage}/avg/{metric}", torch.stack(vals).mean(), add_dataloader_idx=False)

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end(self.val_metrics, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end(self.test_metrics, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """One row per example and task: label and its probability (a batch with task None runs every task)."""
        tasks = self.model.tasks if batch["task"] is None else [batch["task"]]
        logits = self.model(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"), tasks=tasks)
        size = batch["input_ids"].shape[0]
        index = batch.get("index", torch.arange(size)).tolist()
        texts = batch.get("text") or [None] * size
        rows = []
        for task in tasks:
            head = self.model.heads[task]
            labels = self.model.task_meta[task]["labels"]
            pred, score = head.predict(logits[task])
            for i, text, p, s in zip(index, texts, pred.tolist(), score.tolist()):
                label = labels[p] if head.problem == "classification" and labels else p
                rows.append({"task": task, "index": i, "label": label, "score": s, "text": text})
        return rows

    # ---- optimisation --------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (no_decay if name.endswith("bias") else decay).append(p)
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": self.hparams.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=self.hparams.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(total * self.hparams.warmup_ratio)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return max(0.0, (total - step) / max(1, total - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- lifecycle -----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.cache_frozen_prefix and self.prefix_cache is None:
            self.prefix_cache = self._build_prefix_cache()

    def _build_prefix_cache(self) -> PrefixCache:
        """Check that caching is exact for this run, then key the cache by everything the states depend on."""
        trainable = self.model.trainable_tasks()
        configs = [self.model.adapter_configs[t] for t in trainable]
        if any(c.robust_drop for c in configs):
            raise MTLConfigError("model.cache_frozen_prefix: not exact with adapter.robust_drop (the prefix changes "
                                 "per batch); use a fixed adapter.drop_first")
        if self.model.backbone_dropout:
            raise MTLConfigError("model.cache_frozen_prefix: not exact with model.backbone_dropout: true "
                                 "(cached layers must be deterministic)")
        k = min((c.drop_first for c in configs), default=0)
        if k < 1:
            raise MTLConfigError("model.cache_frozen_prefix: needs adapter.drop_first >= 1 (no adapter in the "
                                 "layers to cache)")
        below = [f"{name} (layer {i})" for i, layer in enumerate(layer_list(self.model.backbone)[:k])
                 for name, p in layer.named_parameters() if p.requires_grad]
        if below:
            raise MTLConfigError(f"model.cache_frozen_prefix: trainable parameter {below[0]} lies in the first {k} "
                                 f"layers")
        data = self.trainer.datamodule
        sizes, fingerprints = {}, []
        for task in trainable:
            for split in ("train", "validation"):
                dataset = data.task_datasets[task][split]
                sizes[(task, split)] = len(dataset)
                fingerprints.append((task, split, dataset._fingerprint))
        key = cache_key(self.model.backbone_digest(), k, self.model.backbone_name, len(data.tokenizer), fingerprints,
                        self.hparams.cache_dtype)
        folder = self.hparams.cache_dir or self.run_dir / "prefix_cache"
        print(f"frozen-prefix cache: layers 1..{k} computed once per example (eval mode), key {key}")
        return PrefixCache(k, key, sizes, self.model.hidden_size, self.hparams.cache_dtype,
                           self.hparams.cache_memory_mb, folder)

    def on_train_epoch_end(self) -> None:
        cache = self.prefix_cache
        if cache is not None:
            self.log("cache/hit_rate", cache.hits / max(1, cache.hits + cache.misses))
            cache.hits = cache.misses = 0

    def on_fit_start(self) -> None:
        if not self.model.trainable_tasks():
            raise MTLConfigError("model.tasks: no task to train (loaded tasks are frozen); name new tasks in data.tasks")
        if self.hparams.export and not self.hparams.overwrite:
            for task in self.model.trainable_tasks():
                target = self.run_dir / "adapters" / task
                if target.exists():
                    raise MTLConfigError(f"{target}: adapter already exists (set model.overwrite: true to replace it)")
        if self.trainer.is_global_zero:
            print(self.model.parameter_table())

    def on_fit_end(self) -> None:
        if not (self.hparams.export and self.trainer.is_global_zero):
            return
        best = getattr(self.trainer.checkpoint_callback, "best_model_path", "")
        if best and Path(best).is_file():
            self.load_trainable(best)
            print(f"restored the best checkpoint before export: {best}")
        for task in self.model.trainable_tasks():
                path = self.model.save_task(task, self.run_dir / "adapters", overwrite=self.hparams.overwrite)
                print(f"exported {task} -> {path}")

    def load_trainable(self, ckpt_path: str | Path) -> None:
        """Load the trainable tensors of a (trimmed) Lightning checkpoint into this module."""
        checkpoint = torch.load(ckpt_path, map_location=self.device, weights_only=True)
        missing = self.load_state_dict(checkpoint["state_dict"], strict=False).unexpected_keys
        if missing:
            raise MTLConfigError(f"{ckpt_path}: tensors {missing[:3]} do not belong to this model")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the frozen backbone (and frozen adapters) come from their own files: keep only trainable tensors
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key, value in self.state_dict().items():
            state.setdefault(key, value)

    def train(self, mode: bool = True) -> AdapterTrainer:
        """Keep the backbone's own train/eval policy (see `MTLModel.train`)."""
        super().train(mode)
        self.model.train(mode)
        return self
