"""The `LightningModule`: steps, per-task metrics, optimizer over trainable tensors, trimmed checkpoints."""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torchmetrics import MeanMetric

from mtl import model_files
from mtl import storage
from mtl.adapters.config import AdapterConfig, as_adapter_config
from mtl.assembly import FusionSetup, as_fusion_setup, assemble
from mtl.backbone import DEFAULT_BACKBONE
from mtl.checkpoint_io import loadable_checkpoint
from mtl.data.module import refuse_on_every_rank
from mtl.data.spec import load_task_specs
from mtl.errors import MTLConfigError, MTLWriteError
from mtl.fusion.report import attention_report
from mtl.kinds import kind_of
from mtl.kinds.base import example_form
from mtl.metrics import build_metrics
from mtl.precision import attention_kernel, check_attention
from mtl.preflight import writable_folder
from mtl.prefix_cache import DTYPES, PrefixCache
from mtl.routing import ROUTER_CONFIG, EntropyRouter, Router, load_router

# the frozen backbone runs in eval mode on purpose (no dropout in frozen layers; see MTLModel.train)
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
# under DDP the per-task values logged at epoch end are torchmetrics results, already added up over the ranks
warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\('(val|test)/")


class AdapterTrainer(L.LightningModule):
    """Trains the adapters and heads of ``tasks`` (or a fusion over trained adapters) on a frozen backbone, and exports them.

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
        run_dir: run folder; adapters are exported to ``<run_dir>/adapters/<task>/``, fusions to
            ``<run_dir>/fusions/<name>/`` when fit ends.
        overwrite: replace already exported adapters (and loaded tasks) of the same task names.
        export: export trained tasks when fit ends.
        adapter_sharing: ``per_task`` (one adapter per task) or ``shared`` (one adapter for all ``tasks``, each
            with its own head: the classic multi-task adapter baseline).
        load_from: a run folder whose exported adapters are loaded first, frozen, before ``tasks`` are added
            (adding a task to a trained system); set ``run_dir`` to the same folder to export beside them.
        eval_tasks: loaded tasks that are evaluated but not trained; linked from ``data.eval_tasks``.
        fusion: AdapterFusion stage 2 (``name``, ``adapters``, ``config``, ``unfreeze_adapters``): train a fusion
            over adapters loaded from ``load_from`` for the one task in ``tasks``; only the fusion layers and its
            head train.
        continue_training: a task of ``tasks`` that ``load_from`` already has continues from its loaded adapter and
            head instead of being refused (how the continual runner trains each stage).
        router: predict without a task id: ``auto`` (the router saved with the model in ``load_from``), ``entropy``
            (every head at once, the most confident answers) or a saved router folder (e.g.
            ``<continual run>/steps/NN-<task>/router``). Each text of ``data.predict_file`` then
            gets one row, from the task the router picks, instead of one row per task.
        drop_seed: seed of the per-batch depths drawn for ``adapter.robust_drop``.
        cache_frozen_prefix: compute each training/validation example's hidden states after the first
            ``adapter.drop_first`` layers once (first epoch) and reuse them, so later epochs run only the layers
            above. Exact only for fixed dropping: refused with robust_drop, backbone_dropout, or trainable
            parameters in those layers. The cached layers run in eval mode (no dropout).
        cache_memory_mb: memory for the cache; rows beyond it go to a memory-mapped file in ``prefix_cache_dir``.
        cache_dtype: float32, or bfloat16 / float16 to halve the cache (see benchmarks/RESULTS.md for accuracy).
        prefix_cache_dir: folder for the on-disk part (default ``<run_dir>/prefix_cache``); reused by later runs with
            the same backbone, depth, tokenizer and data.
        test_after_fit: ``train.py fit`` ends by testing the best checkpoint on every task's test split, in the
            same process (backbone loaded and data tokenised once); false skips it.
        attention: the backbone's attention kernel: ``auto`` (eager under bf16 on the CPU, where it trains faster
            than SDPA; the backbone's own elsewhere), ``sdpa`` or ``eager``. Numerics differ only by rounding.
        compile: run the model through ``torch.compile`` (inductor, dynamic shapes) for fit and its test. Off by
            default: on 2 CPU cores compiling took 40-60 s and a step gained at most about 10% (0.97-1.23x across
            runs), a loss for the quickstart and about even for 30 epochs (benchmarks/RESULTS.md "torch.compile").
    """

    def __init__(self, tasks: list[str], backbone: str = DEFAULT_BACKBONE, adapter: AdapterConfig | dict | None = None,
                 tasks_dir: str = "tasks", lr: float = 1e-3, weight_decay: float = 0.01, warmup_ratio: float = 0.1,
                 head_pooling: str = "mean", head_dropout: float = 0.1, backbone_dropout: bool = False,
                 run_dir: str = "checkpoints/run", overwrite: bool = False, export: bool = True,
                 adapter_sharing: str = "per_task", load_from: str | None = None,
                 eval_tasks: list[str] | None = None, fusion: FusionSetup | dict | None = None,
                 continue_training: bool = False, eval_routes: dict[str, str] | None = None,
                 router: str | None = None, drop_seed: int = 0,
                 cache_frozen_prefix: bool = False, cache_memory_mb: float = 2048, cache_dtype: str = "float32",
                 prefix_cache_dir: str | None = None, test_after_fit: bool = True, attention: str = "auto",
                 compile: bool = False) -> None:
        super().__init__()
        check_attention(attention)
        adapter = as_adapter_config(adapter) if adapter is not None else AdapterConfig()
        fusion = as_fusion_setup(fusion)
        # hparams hold plain types only, so checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters(ignore=["adapter", "fusion"])
        self.hparams["adapter"] = adapter.to_dict()
        self.hparams["fusion"] = None if fusion is None else {**vars(fusion), "config": fusion.config.to_dict()}
        train_specs = load_task_specs("data.tasks", tasks, tasks_dir)
        eval_specs = load_task_specs("data.eval_tasks", eval_tasks or [], tasks_dir, train_specs)
        built = assemble(list(train_specs.values()), backbone, adapter,
                         backbone_dropout=backbone_dropout, head_pooling=head_pooling, head_dropout=head_dropout,
                         load_from=load_from, overwrite=overwrite, adapter_sharing=adapter_sharing,
                         eval_tasks=[s for n, s in eval_specs.items() if n not in train_specs], fusion=fusion,
                         continue_training=continue_training, eval_routes=eval_routes)
        self.model, self.specs, self.routes = built.model, built.specs, built.routes
        check_attention(attention, self.model.backbone)
        self.router = self._load_router(router)
        self._drop_rng: random.Random | None = None
        self.prefix_cache: PrefixCache | None = None
        self.exported: dict[str, Path] = {}  # task -> folder written when fit ended (rank 0)
        # a continual-learning strategy's regulariser (EWC and the like): loss += extra_loss(self, batch)
        self.extra_loss: Callable[[AdapterTrainer, dict[str, Any]], torch.Tensor | None] | None = None
        self.val_metrics = self._metrics("val")
        self.test_metrics = self._metrics("test")
        # the evaluation loss as a metric too, so that under DDP it is the mean over every rank's examples
        self.val_losses = nn.ModuleDict({route: MeanMetric() for route in self.val_metrics})
        self.test_losses = nn.ModuleDict({route: MeanMetric() for route in self.test_metrics})

    def _load_router(self, router: str | None) -> Router | None:
        """The router ``model.router`` names, checked against this model (one line if it cannot route for it)."""
        if router is None:
            return None
        if router == EntropyRouter.kind:
            return EntropyRouter()
        if router == "auto":  # the router stored with the loaded model (a continual stage folder has one)
            stored = Path(self.hparams.load_from or "") / "router"
            if not self.hparams.load_from or not (stored / ROUTER_CONFIG).is_file():
                raise MTLConfigError(f"model.router: auto: the model has no router ({stored / ROUTER_CONFIG} not found), "
                                     "expected model.load_from to be a continual stage folder (steps/NN-<task>), or "
                                     "a router folder or 'entropy' as model.router")
            router = str(stored)
        if not (Path(router) / ROUTER_CONFIG).is_file():
            raise MTLConfigError(f"model.router: {router}: no {ROUTER_CONFIG} there, expected 'entropy' or a saved router "
                                 "folder (a continual run saves one per stage: steps/NN-<task>/router)")
        loaded = load_router(router)
        if not loaded.tasks:
            raise MTLConfigError(f"model.router: {router}: the router knows no task yet, expected one saved after a "
                                 "task was trained")
        missing = [t for t in loaded.tasks if t not in self.model.tasks]
        if missing:
            raise MTLConfigError(f"model.router: {router}: routes to {missing}, which the model does not have "
                                 f"(model tasks: {self.model.tasks}; load them with model.load_from)")
        return loaded

    def _metrics(self, stage: str) -> nn.ModuleDict:
        # each route's metrics see its record's spec: what validation chooses there (`TaskKind.chosen_keys`), test
        # reads, and the export keeps
        return nn.ModuleDict({route: build_metrics(spec.problem, spec.metrics, spec.labels, f"{stage}/{route}/",
                                                   self.model.records[route].spec, stage)
                              for name, spec in self.specs.items() for route in [self.routes[name]]})

    @property
    def run_dir(self) -> Path:
        """Where this run exports its adapters."""
        return Path(self.hparams.run_dir)

    # ---- steps ---------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Any], drop_first: int | None = None, split: str | None = None) -> torch.Tensor:
        """Logits of the batch's task (from the frozen-prefix cache when it is on and ``split`` is cached)."""
        route = self.routes[batch["task"]]
        part = (batch["task"], split)
        if self.prefix_cache is not None and part in self.prefix_cache.sizes and "index" in batch:
            logits = self.prefix_cache.forward(self.model, part, batch, route)
        else:
            logits = self.model(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"),
                                tasks=route, drop_first=drop_first,
                                fusion_step=self.global_step if self.training else None)[route]
        # under bf16 precision the logits come out in bf16: the loss, metrics and scores are computed in float32
        # (a regression target would otherwise be rounded to bf16 to match them)
        return logits.float()

    def robust_drop_depth(self, task: str) -> int | None:
        """For robust AdapterDrop: this training batch's adapter-free first layers, n ~ U[0, L-1] (seeded)."""
        target = self.model.target(self.routes[task])
        if target.is_fusion or not self.model.adapter_configs[target.name].robust_drop:
            return None
        if self._drop_rng is None:
            self._drop_rng = random.Random(self.hparams.drop_seed)
        return self._drop_rng.randrange(self.model.num_layers)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        route = self.routes[batch["task"]]
        logits = self(batch, drop_first=self.robust_drop_depth(batch["task"]), split="train")
        loss = data_loss = kind_of(self.model.heads[route].problem).loss(logits, batch["labels"],
                                                                         batch.get("loss_per_batch"))
        size = batch["input_ids"].shape[0]
        if self.model.fusion_configs:
            # AdapterFusion's value regulariser, in this step (not one optimiser step late)
            reg = self.model.value_regularization()
            self.log("train/fusion_reg", reg, batch_size=size)
            loss = loss + reg
        extra = self.extra_loss(self, batch) if self.extra_loss is not None else None
        if extra is not None:
            self.log("train/extra_loss", extra, batch_size=size)
            loss = loss + extra
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        if len(self.hparams.tasks) > 1:
            self.log(f"train/{route}/loss", loss, batch_size=size)
        # a loss divided by a fixed count per batch already weighs each rank's terms by their number
        weight = 1.0 if "loss_per_batch" in batch else self.rank_share(size)
        # what backward sees: this rank's mean loss weighted by its share of the step's examples (1 in one process)
        return loss if weight == 1.0 else loss + (weight - 1.0) * data_loss

    def rank_share(self, size: int) -> float:
        """This rank's weight for a step where it holds ``size`` of all ranks' examples: ``size * world_size / total``.

        DDP averages the ranks' gradients. Ranks hold equal shares except at the end of a pass over a task
        (`TaskBatchSampler`), where they may differ by one example; weighting each rank's mean loss by its share makes
        the averaged gradient that of the mean loss over all the step's examples, as one process would compute it.
        """
        if self._trainer is None or self.trainer.world_size == 1:  # a step called outside a Trainer is one process
            return 1.0
        world_size = self.trainer.world_size
        total = self.trainer.strategy.reduce(torch.tensor(float(size), device=self.device), reduce_op="sum")
        return size * world_size / float(total)

    def _eval_step(self, batch: dict[str, Any], metrics: nn.ModuleDict, losses: nn.ModuleDict, stage: str) -> None:
        route = self.routes[batch["task"]]
        logits = self(batch, split="validation" if stage == "val" else None)
        head = self.model.heads[route]
        loss = kind_of(head.problem).loss(logits, batch["labels"])
        losses[route].update(loss.detach(), weight=batch["input_ids"].shape[0])
        metrics[route].update(*kind_of(head.problem).metric_inputs(logits, batch))

    def _eval_epoch_end(self, metrics: nn.ModuleDict, losses: nn.ModuleDict, stage: str) -> None:
        tasks = list(metrics)
        updated = torch.tensor([any(m.update_called for m in metrics[t].values()) for t in tasks], dtype=torch.float,
                               device=self.device)
        if self.trainer.world_size > 1:
            # compute() adds up the ranks' states (a collective): every rank must compute the same tasks
            updated = self.trainer.strategy.reduce(updated, reduce_op="sum")
        values: dict[str, list[torch.Tensor]] = {}
        for task, seen in zip(tasks, updated.tolist()):
            if not seen:
                continue
            collection = metrics[task]
            headline = kind_of(self.model.heads[task].problem).metrics_for(self.model.records[task].labels or [])[1]
            for key, value in collection.compute().items():
                metric = key.rsplit("/", 1)[1]
                self.log(key, value, prog_bar=metric == headline, add_dataloader_idx=False)
                values.setdefault(metric, []).append(value)
                if metric == headline:  # each task's own headline, whatever its kind: what checkpoints monitor
                    values.setdefault("score", []).append(value)
            self.log(f"{stage}/{task}/loss", losses[task].compute(), add_dataloader_idx=False)
            collection.reset()
            losses[task].reset()
        for metric, vals in values.items():
            self.log(f"{stage}/avg/{metric}", torch.stack(vals).mean(), add_dataloader_idx=False)

    def on_validation_epoch_start(self) -> None:
        # a metric reset inside `Trainer.validate` (inference mode) leaves inference tensors as its state, which the
        # validation inside `fit` (no_grad only) cannot update in place: start each epoch from a fresh reset here
        for collection in (*self.val_metrics.values(), *self.val_losses.values()):
            collection.reset()

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, self.val_metrics, self.val_losses, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end(self.val_metrics, self.val_losses, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, self.test_metrics, self.test_losses, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end(self.test_metrics, self.test_losses, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """One row per example and task: label and its probability (a batch with task None runs every task, or with
        ``router`` only the task the router picks per example)."""
        size = len(batch["index"]) if "index" in batch else batch["input_ids"].shape[0]
        index = batch.get("index", torch.arange(size)).tolist()
        texts = batch.get("text") or [None] * size
        inputs = (batch.get("input_ids"), batch.get("attention_mask"), batch.get("token_type_ids"))
        if batch["task"] is None and self.router is not None:
            rows, tagged = [], {}
            for task, logits, i, text in zip(*self.router.routed_logits(self.model, *inputs), index, texts):
                kind = kind_of(self.model.heads[task].problem)
                if kind.windowed:  # a tagger answers the text's words, from its windows
                    tagged.setdefault(task, set()).add(i)
                    continue
                pred, score = kind.predict(logits.unsqueeze(0).float())
                row = kind.file_row(self.model.records[task].labels, pred[0].tolist(), score[0].tolist())
                rows.append({"task": task, "index": i, **row, "text": text})
            if tagged:  # one forward over the windows for every tagger a text went to
                rows += [row for row in self._window_rows(list(tagged), batch) if row["index"] in tagged[row["task"]]]
            return sorted(rows, key=lambda row: row["index"])
        if batch["task"] is None:  # a predict file: every task that reads its form of example (texts, or questions)
            form = example_form(texts[0])
            tasks = [t for t in self.model.tasks if kind_of(self.model.heads[t].problem).reads == form]
        else:
            tasks = [self.routes.get(batch["task"], batch["task"])]
        windowed = [t for t in tasks if kind_of(self.model.heads[t].problem).windowed]
        tasks = [t for t in tasks if t not in windowed]
        rows = []
        if tasks:
            logits = self.model(*inputs, tasks=tasks)
        for task in tasks:
            head = self.model.heads[task]
            labels = self.model.records[task].labels
            kind = kind_of(head.problem)
            pred, score = kind.predict(logits[task].float())  # float32 scores under bf16 precision too
            for i, text, p, s in zip(index, texts, pred.tolist(), score.tolist()):
                rows.append({"task": task, "index": i, **kind.file_row(labels, p, s), "text": text})
        if windowed:
            rows += self._window_rows(windowed, batch)
        return rows

    def _window_rows(self, tasks: list[str], batch: dict[str, Any]) -> list[dict[str, Any]]:
        """Prediction rows of windowed tasks (taggers, QA, multiple choice): one per example, from all its rows (a
        split's, or the rows of a predict file's examples in ``batch["words"]``), in one forward for all ``tasks``."""
        raw = batch["task"] is None  # raw texts: their windows came with the batch
        windows = batch["words"] if raw else batch
        examples = windows["example"].tolist()
        logits = self.model(windows["input_ids"], windows.get("attention_mask"), windows.get("token_type_ids"),
                            tasks=tasks) if examples else {t: [] for t in tasks}
        windows_of: dict[int, list[int]] = {k: [] for k in range(len(windows["texts"]))} if raw else {}
        for row, example in enumerate(examples):
            windows_of.setdefault(example, []).append(row)
        index = batch["index"].tolist()
        rows = []
        for task in tasks:
            kind, labels = kind_of(self.model.heads[task].problem), self.model.records[task].labels
            for example, mine in windows_of.items():
                scores = [logits[task][r].float() for r in mine]
                if raw:
                    encoded = windows["texts"][example]
                    out = {**kind.text_answer(labels, scores, encoded, self.model.records[task].spec),
                           "text": encoded.text}
                    at = index[example]
                else:
                    out, at = kind.example_answer(labels, scores, batch, mine, self.model.records[task].spec), example
                rows.append({"task": task, "index": at, **out})
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
        self._choose_attention(stage)
        if stage == "fit" and self.hparams.compile:
            # in place (nn.Module.compile): parameter names, checkpoints and exports stay those of the plain model
            self.model.compile(dynamic=True)
        if stage == "fit":
            self._setup_distributed()
        if stage == "fit" and self.hparams.cache_frozen_prefix and self.prefix_cache is None:
            data = self.trainer.datamodule
            training = set(self.model.trainable_tasks())
            datasets = {(task, split): data.task_datasets[task][split] for task, route in self.routes.items()
                        if route in training for split in ("train", "validation")}
            self.prefix_cache = PrefixCache.for_training(
                self.model, datasets, len(data.tokenizer), self.hparams.cache_dtype, self.hparams.cache_memory_mb,
                self.hparams.prefix_cache_dir or self.run_dir / "prefix_cache")

    def _choose_attention(self, stage: str) -> None:
        """Switch the backbone to the attention kernel `attention_kernel` picks for this trainer (said once on fit)."""
        trainer, backbone, longest = self.trainer, self.model.backbone, self._longest_row(stage)
        kernel = attention_kernel(self.hparams.attention, trainer.precision, trainer.strategy.root_device.type,
                                  self.model.loaded_kernel, longest)
        if kernel == backbone.config._attn_implementation:
            return
        backbone.set_attn_implementation(kernel)
        if stage == "fit" and trainer.is_global_zero and self.hparams.attention == "auto":
            print(f"attention: {kernel} (faster under {trainer.precision} on this device"
                  f"{f' for rows of up to {longest} tokens' if longest else ''}; set model.attention to choose)")

    def _longest_row(self, stage: str) -> int | None:
        """The most tokens a row of this stage's data may hold (its tasks' ``max_length``, or a predict file's
        ``predict_max_length``); None without a task data module."""
        data = getattr(self.trainer, "datamodule", None)
        specs = getattr(data, "specs", None)
        if stage == "predict" and getattr(data, "predict_file", None):
            return data.predict_max_length
        return max((spec.max_length for spec in specs.values()), default=None) if specs else None

    @staticmethod
    def _cache_refusal(processes: int) -> MTLConfigError:
        # each process would cache only the rows it is dealt, and their on-disk parts would race for one file name
        return MTLConfigError(f"model.cache_frozen_prefix: not supported with {processes} processes (trainer world "
                              "size), expected false under DDP (or run on one device)")

    def _setup_distributed(self) -> None:
        """Under several processes: refuse what is not supported there, and let DDP skip parameters a step leaves unused."""
        trainer = self.trainer
        if trainer.world_size > 1 and self.hparams.cache_frozen_prefix:
            refuse_on_every_rank(trainer, self._cache_refusal(trainer.world_size))
        strategy = trainer.strategy
        # a step trains one task (and robust AdapterDrop skips the lowest adapters), so the other trainable tensors get
        # no gradient; DDP then needs find_unused_parameters, which leaves their grads None as in one process (AdamW
        # skips them). Lightning's DDPStrategy keeps its DistributedDataParallel arguments in _ddp_kwargs and reads them
        # after setup().
        if not isinstance(strategy, DDPStrategy):
            return
        tasks = self.model.trainable_tasks()
        robust = any(self.model.adapter_configs[self.model.target(t).name].robust_drop
                     for t in tasks if not self.model.target(t).is_fusion)
        if len(tasks) < 2 and not robust:
            return
        chosen = strategy._ddp_kwargs.get("find_unused_parameters")
        if chosen is None:
            strategy._ddp_kwargs["find_unused_parameters"] = True
            if trainer.is_global_zero:
                print("ddp: find_unused_parameters on (a step leaves some trainable tensors unused)")
        elif not chosen:
            why = f"each step trains one of {len(tasks)} tasks" if len(tasks) > 1 else "adapter.robust_drop skips adapters"
            refuse_on_every_rank(trainer, MTLConfigError(
                f"trainer.strategy: find_unused_parameters is false, but {why} and leaves other trainable tensors "
                "without a gradient; expected ddp or ddp_find_unused_parameters_true"))

    def on_train_epoch_end(self) -> None:
        cache = self.prefix_cache
        if cache is not None:
            self.log("cache/hit_rate", cache.hits / max(1, cache.hits + cache.misses))
            cache.hits = cache.misses = 0

    def _export_targets(self) -> list[tuple[str, bool, Path]]:
        """(task, is a fusion, folder) of every trainable task: plain tasks first, since a fusion's file records
        their hashes."""
        out = []
        for task in self.model.trainable_tasks():
            fused = self.model.target(task).is_fusion
            out.append((task, fused, self.run_dir / ("fusions" if fused else "adapters") / task))
        return sorted(out, key=lambda item: item[1])

    def check_before(self, stage: str, processes: int = 1) -> None:
        """Mistakes this module can find before ``stage`` runs: nothing to train, an export that would be refused,
        an output folder that cannot be written, a setting the Trainer's ``processes`` cannot run. The CLI calls it
        before building the Trainer; fit calls it again."""
        if stage != "fit":
            return
        if not self.model.trainable_tasks():
            raise MTLConfigError("model.tasks: no task to train (loaded tasks are frozen); name new tasks in data.tasks")
        if self.hparams.export:
            targets = self._export_targets()
            # every folder the exports go into, before the first step: a read-only adapters/ found after the whole
            # training budget would cost that budget
            writable_folder(self.run_dir, "model.run_dir")
            for folder in sorted({target.parent for _, _, target in targets}):
                writable_folder(folder, "model.run_dir")
            for task, fused, target in targets:
                if target.exists() and not self.hparams.overwrite:
                    raise MTLConfigError(f"{target}: already exists (set model.overwrite: true to replace it)")
                if target.exists() and not fused:  # a fusion exported again in this fit records the new file
                    model_files.check_replaceable(self.run_dir, task, [t for t, f, _ in targets if f])
        if self.hparams.cache_frozen_prefix:
            if processes > 1:
                raise self._cache_refusal(processes)
            PrefixCache.cached_depth(self.model)
            if self.hparams.cache_dtype not in DTYPES:
                raise MTLConfigError(f"model.cache_dtype: got {self.hparams.cache_dtype!r}, expected one of {list(DTYPES)}")
            writable_folder(self.hparams.prefix_cache_dir or self.run_dir / "prefix_cache", "model.prefix_cache_dir")

    def on_train_start(self) -> None:
        # Lightning (2.x) never calls train() when training starts: it keeps every submodule's mode as it finds it,
        # and MTLModel is built in eval mode, so the heads' and adapters' dropout (and backbone_dropout) would never
        # run. Validation captures and restores the modes set here.
        self.train(True)

    def on_fit_start(self) -> None:
        self.check_before("fit")
        if self.trainer.is_global_zero:
            print(self.model.parameter_table())
            hint = self.adapterdrop_hint()
            if hint:
                print(hint)

    def adapterdrop_hint(self) -> str | None:
        """One line naming AdapterDrop + the frozen-prefix cache when this fit would gain from it (never turned on
        silently: it costs a little accuracy), or None."""
        trainer, model = self.trainer, self.model
        if self.hparams.cache_frozen_prefix or model.backbone_dropout or trainer.world_size > 1:
            return None
        if (trainer.max_epochs or 0) < 2 or model.num_layers < 4:  # the cache fills in epoch 1, pays from epoch 2
            return None
        targets = [model.records[t].target for t in model.trainable_tasks()]
        if not targets or any(t.is_fusion for t in targets):
            return None
        configs = [model.adapter_configs[t.name] for t in targets]
        if any(c.drop_first or c.robust_drop or c.leave_out for c in configs):
            return None
        k = model.num_layers // 2
        return (f"hint: model.adapter.drop_first: {k} with model.cache_frozen_prefix: true runs layers 1-{k} once per "
                "example instead of every epoch (the quickstart's fit: 1.6x faster, 2 of 212 test articles lost; "
                "README: AdapterDrop)")

    def on_fit_end(self) -> None:
        """Export every trained task from the best checkpoint (into ``exported``; train.py prints it at the end)."""
        self.exported = {}
        if not self.hparams.export:
            return
        self.restore_best()  # on every rank, so that all processes end fit with the exported weights
        if any(p.dtype != torch.float32 for p in self.model.parameters() if p.requires_grad):
            # trainer.precision bf16-true / 16-true cast the whole module; exports are float32 whatever the training
            # precision (upcasting is exact), and the module is usable in float32 after fit
            self.model.float()
        if not self.trainer.is_global_zero:
            return  # one process writes the files
        try:
            for task, fused, target in self._export_targets():
                if fused:
                    path = model_files.save_fusion(self.model, task, self.run_dir, overwrite=self.hparams.overwrite)
                    self._report_attention(task, path)
                else:
                    path = model_files.save_task(self.model, task, target.parent, overwrite=self.hparams.overwrite)
                self.exported[task] = path
        except MTLWriteError:  # the training is not lost: train.py adds where its weights are (mtl.cli)
            raise

    def kept_weights(self) -> str:
        """Where the trained weights are when an export or a checkpoint cannot be written (for that one line): a
        checkpoint named here has just been read back whole."""
        callback = self._trainer.checkpoint_callback if self._trainer else None
        folder = Path(getattr(callback, "dirpath", None) or "/nonexistent")
        # the callback names a new best before writing it: if that write failed, the previous best is still there
        others = sorted(folder.glob("*.ckpt"), key=lambda f: f.stat().st_mtime, reverse=True) if folder.is_dir() else []
        best = loadable_checkpoint(dict.fromkeys([str(getattr(callback, "best_model_path", "")), *map(str, others)]))
        if best:
            return (f"the trained weights are kept in the best checkpoint {best} (read back whole; once the folder "
                    "can be written, resume the same fit command with --ckpt_path set to it)")
        if others:
            return f"no whole checkpoint holds the trained weights ({len(others)} file(s) in {folder} do not load)"
        return "no checkpoint holds the trained weights (checkpointing was off or none was written yet)"

    def restore_best(self) -> str:
        """Load the trainable tensors of the best checkpoint the Trainer's checkpoint callback kept, if any; returns
        its path ('' when there is none and the weights stay as they are)."""
        best = getattr(self.trainer.checkpoint_callback, "best_model_path", "")
        if best and Path(best).is_file():
            self.load_trainable(best)
            return best
        return ""

    def _report_attention(self, fusion: str, folder: Path) -> None:
        """Mean fusion attention per layer and adapter on the validation set: a table here, a heatmap in ``folder``."""
        data = self.trainer.datamodule
        tasks = [t for t, route in self.routes.items() if route == fusion]
        loaders = [loader for loader in data.full_eval_loaders("validation") if loader.dataset.task in tasks]
        report = attention_report(self.model, fusion, (b for loader in loaders for b in loader), self.device)
        print(report.table())
        report.save_heatmap(folder / "attention.png")
        report.save_json(folder / "attention.json")

    def load_trainable(self, ckpt_path: str | Path) -> None:
        """Load the trainable tensors of a (trimmed) mtl checkpoint into this module."""
        checkpoint = storage.read_checkpoint(ckpt_path)
        self.check_checkpoint(checkpoint, ckpt_path)
        self.load_state_dict(checkpoint["state_dict"], strict=False)
        self._restore_chosen(checkpoint)

    def definition(self) -> dict[str, Any]:
        """The settings that decide what a checkpoint's tensors mean, flattened to dotted keys in a fixed order."""
        info = model_files.backbone_info(self.model)
        out: dict[str, Any] = {f"backbone.{k}" if k != "backbone" else k: v for k, v in info.items()}
        tasks = self.model.trainable_tasks()
        out["tasks"] = tasks
        for task in tasks:
            target = self.model.target(task)
            head = self.model.heads[task].settings()
            out[f"{task}.labels"] = self.model.records[task].labels
            out.update({f"{task}.head.{k}": head[k] for k in ("problem", "pooling", "num_outputs")})
            if target.is_fusion:
                out[f"{task}.fusion.adapters"] = list(target.fused)
                config = self.model.fusion_configs[task].to_dict()
            else:
                out[f"{task}.adapter_name"] = target.name
                config = self.model.adapter_configs[target.name].to_dict()
            kind = "fusion" if target.is_fusion else "adapter"
            out.update({f"{task}.{kind}.{k}": v for k, v in config.items()})
        out["parameters"] = {n: list(p.shape) for n, p in self.named_parameters() if p.requires_grad}
        return out

    def check_checkpoint(self, checkpoint: dict[str, Any], source: str | Path = "checkpoint") -> None:
        """Refuse a checkpoint trained with settings that define another model: one line, the first differing key."""
        saved = checkpoint.get(storage.CHECKPOINT_KEY, {}).get("definition")
        if not isinstance(saved, dict):
            raise MTLConfigError(f"{source}: not an mtl checkpoint (no model definition), expected a .ckpt written "
                                 "by train.py fit")
        have = self.definition()
        for key in [*saved, *(k for k in have if k not in saved)]:
            was, now = saved.get(key), have.get(key)
            if was == now:
                continue
            if key == "parameters":
                key, was, now = next((f"parameter {n}", was.get(n), now.get(n)) for n in [*was, *now]
                                     if was.get(n) != now.get(n))
            raise MTLConfigError(f"{source}: {key} is {was!r} in the checkpoint but {now!r} in the configuration; "
                                 "a checkpoint only loads into the model it was trained as")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the frozen backbone (and frozen adapters) come from their own files: keep only trainable tensors
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint[storage.CHECKPOINT_KEY] = {"format_version": storage.FORMAT_VERSION, "definition": self.definition(),
                                              "chosen": self._chosen()}

    def _chosen(self) -> dict[str, dict[str, Any]]:
        """Per trainable task, what its validation chose into its spec (`TaskKind.chosen_keys`)."""
        out = {}
        for task in self.model.trainable_tasks():
            spec, keys = self.model.records[task].spec or {}, kind_of(self.model.heads[task].problem).chosen_keys
            if any(k in spec for k in keys):
                out[task] = {k: spec[k] for k in keys if k in spec}
        return out

    def _restore_chosen(self, checkpoint: dict[str, Any]) -> None:
        """Put back into the tasks' specs what validation had chosen when ``checkpoint`` was written."""
        for task, chosen in checkpoint.get(storage.CHECKPOINT_KEY, {}).get("chosen", {}).items():
            if task in self.model.tasks and self.model.records[task].spec is not None:
                self.model.records[task].spec.update(chosen)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_checkpoint(checkpoint)
        self._restore_chosen(checkpoint)
        state = checkpoint["state_dict"]
        for key, value in self.state_dict().items():
            state.setdefault(key, value)

    def train(self, mode: bool = True) -> AdapterTrainer:
        """Keep the backbone's own train/eval policy (see `MTLModel.train`)."""
        super().train(mode)
        self.model.train(mode)
        return self
