"""The ``LightningDataModule``: task specs -> tokenised, cached datasets -> one-task batches."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import datasets
import lightning as L
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from transformers import DataCollatorWithPadding

from mtl.backbone import load_tokenizer
from mtl.data.sampling import TaskBatchSampler, task_probabilities
from mtl.data.sources import SPLITS, load_task_dataset
from mtl.data.spec import TaskSpec, load_task_spec
from mtl.errors import MTLConfigError

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
CACHE_VERSION = 1  # bump when the tokenised layout changes, so old cache files are not reused
DEFAULT_CACHE_DIR = "~/.cache/mtl/datasets"


class TaskCollator:
    """Pads a list of one task's examples into a batch dict and tags it with the task name."""

    def __init__(self, tokenizer: Any, problems: dict[str, str]) -> None:
        """``problems`` maps task name -> problem type (decides the labels' dtype)."""
        self.pad = DataCollatorWithPadding(tokenizer, return_tensors="pt")
        self.problems = problems

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        """input_ids, attention_mask, (token_type_ids), labels as tensors; task as a str."""
        tasks = {f["task"] for f in features}
        if len(tasks) != 1:
            raise RuntimeError(f"a batch mixes tasks {sorted(tasks)}; the sampler must yield one task per batch")
        task = tasks.pop()
        batch = dict(self.pad([{k: v for k, v in f.items() if k != "task"} for f in features]))
        dtype = torch.long if self.problems[task] == "classification" else torch.float
        batch["labels"] = batch["labels"].to(dtype)
        batch["task"] = task
        return batch


class _TaskView(Dataset):
    """A tokenised split whose items also carry their task name (read by the collator)."""

    def __init__(self, data: datasets.Dataset, task: str) -> None:
        self.data, self.task = data, task

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.data[int(index)], "task": self.task}


class TaskDataModule(L.LightningDataModule):
    """Batches for one or several tasks; every batch holds one task's examples.

    Batches are dicts: ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the
    tokenizer makes them) padded to the batch's longest example, ``labels`` (long for
    classification, float for regression / multilabel) and ``task`` (the task's name).
    With several tasks, training batches come from a ``TaskBatchSampler``; under DDP run the
    Trainer with ``use_distributed_sampler=False`` (the sampler shards by rank itself).
    Validation / test / predict give one loader per task, in the order of ``tasks``.

    Args:
        tasks: Task names (``<tasks_dir>/<name>.yaml``) or paths to task YAML files.
        backbone: Backbone whose tokenizer is used (alias, local folder or cached hub name).
        tasks_dir: Folder where bare task names are looked up.
        batch_size: Training batch size (per device).
        eval_batch_size: Batch size for validation, test and predict.
        num_workers: DataLoader worker processes (0: load in the main process).
        sampling: Task sampling for multi-task training: proportional, temperature, uniform or round_robin.
        temperature: T of temperature sampling (p ~ n ** (1 / T)).
        seed: Seed of shuffling and task sampling (each epoch reseeds with seed and epoch).
        cache_dir: Folder for tokenised datasets (default ``~/.cache/mtl/datasets``).
    """

    def __init__(
        self,
        tasks: list[str],
        backbone: str = "minilm-l6",
        tasks_dir: str = "tasks",
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        sampling: str = "proportional",
        temperature: float = 2.0,
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not tasks:
            raise MTLConfigError("data.tasks: empty, expected at least one task name or YAML path")
        if batch_size < 1 or eval_batch_size < 1 or num_workers < 0:
            raise MTLConfigError(
                f"data: batch_size={batch_size}, eval_batch_size={eval_batch_size}, num_workers={num_workers}: "
                "expected batch sizes >= 1 and num_workers >= 0"
            )
        task_probabilities([1], sampling, temperature)  # fail on a bad strategy now, not at fit time
        self._specs: dict[str, TaskSpec] = {}
        for task in tasks:
            spec = load_task_spec(task, tasks_dir)  # YAML only: cheap
            if spec.name in self._specs:
                raise MTLConfigError(f"data.tasks: task '{spec.name}' given twice, expected distinct tasks")
            self._specs[spec.name] = spec
        self.backbone, self.tasks_dir, self.seed = backbone, tasks_dir, seed
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.sampling, self.temperature = sampling, temperature
        self.cache_dir = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser()
        self._data: dict[str, datasets.DatasetDict] | None = None
        self._tokenizer: Any = None

    @property
    def specs(self) -> dict[str, TaskSpec]:
        """Task name -> spec, in the order of ``tasks``; available right after construction."""
        return dict(self._specs)

    @property
    def task_names(self) -> list[str]:
        """Task names in the order of ``tasks``."""
        return list(self._specs)

    @property
    def tokenizer(self) -> Any:
        """The backbone's tokenizer (loaded on first use)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.backbone)
        return self._tokenizer

    @property
    def task_datasets(self) -> dict[str, datasets.DatasetDict]:
        """Task name -> tokenised train / validation / test (builds them on first use)."""
        if self._data is None:
            self._data = {name: self._tokenised(spec) for name, spec in self._specs.items()}
        return self._data

    def prepare_data(self) -> None:
        """Read and tokenise every task into the on-disk cache (rank 0 of each node)."""
        _ = self.task_datasets

    def setup(self, stage: str | None = None) -> None:
        """Load the tokenised datasets (from the cache that ``prepare_data`` filled)."""
        _ = self.task_datasets

    def cache_key(self, spec: TaskSpec, data: datasets.DatasetDict) -> str:
        """Hash of everything the tokenised splits depend on: spec, tokenizer, max_length, raw data."""
        tok = self.tokenizer
        digest = hashlib.sha256()
        meta = {
            "version": CACHE_VERSION,
            "spec": spec.to_dict(),
            "tokenizer": [self.backbone, str(tok.name_or_path), type(tok).__name__, len(tok)],
            "max_length": spec.max_length,
        }
        digest.update(json.dumps(meta, sort_keys=True).encode())
        for split in SPLITS:
            digest.update(json.dumps([split, data[split].to_dict()]).encode())
        return digest.hexdigest()[:20]

    def _tokenised(self, spec: TaskSpec) -> datasets.DatasetDict:
        raw = load_task_dataset(spec)
        key = self.cache_key(spec, raw)
        folder = self.cache_dir / f"{spec.name}-{key}"
        folder.mkdir(parents=True, exist_ok=True)
        tok, fields = self.tokenizer, spec.text_fields

        def encode(batch: dict[str, list]) -> dict[str, list]:
            enc = tok(*[batch[f] for f in fields], truncation=True, max_length=spec.max_length)
            out = {k: enc[k] for k in MODEL_INPUTS if k in enc}
            out["labels"] = batch["label"]
            return out

        out = {}
        for split in SPLITS:
            # datasets writes to a temp file in the same folder and renames it: safe if interrupted
            out[split] = raw[split].map(
                encode,
                batched=True,
                remove_columns=raw[split].column_names,
                cache_file_name=str(folder / f"{split}.arrow"),
                load_from_cache_file=True,
                new_fingerprint=f"{key}-{split}",
                desc=f"tokenising {spec.name}/{split}",
            )
        return datasets.DatasetDict(out)

    def _collator(self) -> TaskCollator:
        return TaskCollator(self.tokenizer, {n: s.problem for n, s in self._specs.items()})

    def _rank(self) -> tuple[int, int]:
        trainer = self._trainer_or_none()
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _trainer_or_none(self) -> Any:
        return getattr(self, "trainer", None)

    def _current_epoch(self) -> int:
        # Lightning calls set_epoch on samplers but not on batch samplers: the sampler reads this
        trainer = self._trainer_or_none()
        return trainer.current_epoch if trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        """Shuffled train batches: a plain loader for one task, a TaskBatchSampler for several."""
        views = [_TaskView(self.task_datasets[n]["train"], n) for n in self.task_names]
        common = dict(collate_fn=self._collator(), num_workers=self.num_workers, persistent_workers=self.num_workers > 0)
        if len(views) == 1:
            generator = torch.Generator().manual_seed(self.seed)
            return DataLoader(views[0], batch_size=self.batch_size, shuffle=True, generator=generator, **common)
        rank, world_size = self._rank()
        sampler = TaskBatchSampler(
            [len(v) for v in views],
            self.batch_size,
            strategy=self.sampling,
            temperature=self.temperature,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            epoch_fn=self._current_epoch,
        )
        return DataLoader(ConcatDataset(views), batch_sampler=sampler, **common)

    def _eval_loaders(self, split: str) -> list[DataLoader]:
        collate = self._collator()
        return [
            DataLoader(_TaskView(self.task_datasets[n][split], n), batch_size=self.eval_batch_size, collate_fn=collate,
                       num_workers=self.num_workers)
            for n in self.task_names
        ]

    def val_dataloader(self) -> list[DataLoader]:
        """One validation loader per task, in the order of ``tasks``."""
        return self._eval_loaders("validation")

    def test_dataloader(self) -> list[DataLoader]:
        """One test loader per task, in the order of ``tasks``."""
        return self._eval_loaders("test")

    def predict_dataloader(self) -> list[DataLoader]:
        """The test splits, one loader per task."""
        return self._eval_loaders("test")
