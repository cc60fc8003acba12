"""The ``LightningDataModule``: task specs -> tokenised, cached datasets -> one-task batches."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any, NoReturn

import datasets
import lightning as L
import pyarrow.compute as pc
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from transformers import DataCollatorWithPadding

from mtl.arch import max_tokens
from mtl.backbone import load_backbone_config, load_tokenizer
from mtl.data.predict_input import (TextStream, check_predict_file_name, count_predict_examples,
                                    file_form, iter_predict_texts, predict_stride)
from mtl.data.sampling import (GROUP_BATCHES, FixedBatches, TaskBatchSampler, length_batches, shard_rows,
                                task_probabilities, unit_lengths, unit_rows, whole_example_batches)
from mtl.data.sources import SPLITS, load_task_dataset
from mtl.data.spec import TaskSpec, load_task_specs
from mtl.errors import MTLConfigError
from mtl.kinds import kind_of
from mtl.kinds.base import MODEL_INPUTS
from mtl.preflight import writable_folder

CACHE_VERSION = 1  # bump when the tokenised layout changes, so old cache files are not reused
DEFAULT_CACHE_DIR = "~/.cache/mtl/datasets"
EXTRA_KEYS = ("index", "text", "words")  # prediction-only fields, passed through the collator unpadded


class TaskCollator:
    """Pads a list of one task's examples into a batch dict and tags it with the task name."""

    def __init__(self, tokenizer: Any, problems: dict[str, str], per_batch: dict[str, float] | None = None) -> None:
        """``problems`` maps task name -> problem type (its kind decides the labels' dtype); ``per_batch`` (training
        only): a task's mean count of loss terms per batch, passed on as ``loss_per_batch`` (see `TaskKind.loss`)."""
        self.pad = DataCollatorWithPadding(tokenizer, return_tensors="pt")
        self.problems = problems
        self.per_batch = per_batch or {}

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        """input_ids, attention_mask, (token_type_ids), labels (if any) as tensors; task as given; index, text."""
        tasks = {f["task"] for f in features}
        if len(tasks) != 1:
            raise RuntimeError(f"a batch mixes tasks {sorted(tasks, key=str)}; the sampler must yield one task per batch")
        task = tasks.pop()
        # a file of questions has no single-row encoding: only its windows (``words``) are read
        batch = dict(self.pad([{k: f[k] for k in MODEL_INPUTS if k in f} for f in features])) \
            if "input_ids" in features[0] else {}
        for column in [k for k in features[0] if k not in (*MODEL_INPUTS, "task", *EXTRA_KEYS)]:
            # labels and whatever else a task's rows carry: their shape is the task kind's, so it pads them
            kind = kind_of(self.problems[task])
            batch[column] = kind.collate(column, [f[column] for f in features], batch["input_ids"].shape[1])
        batch["task"] = task
        if task in self.per_batch:
            batch["loss_per_batch"] = self.per_batch[task]
        if "index" in features[0]:
            batch["index"] = torch.tensor([f["index"] for f in features], dtype=torch.long)
        if "text" in features[0]:
            batch["text"] = [f["text"] for f in features]
        if "words" in features[0]:
            batch["words"] = self.windows([f["words"] for f in features])
        return batch

    def windows(self, texts: list[Any]) -> dict[str, Any]:
        """The word windows of a batch's raw texts (`mtl.kinds.base.EncodedText`) as one padded batch: the encoder
        inputs, ``word_ids`` and ``example`` (the text's position in the batch) per row, and ``texts``."""
        rows = [(k, row) for k, text in enumerate(texts) for row in text.rows]
        out: dict[str, Any] = {"texts": texts, "example": torch.tensor([k for k, _ in rows], dtype=torch.long)}
        if rows:
            out.update(self.pad([{k: r[k] for k in MODEL_INPUTS if k in r} for _, r in rows]))
            width = out["input_ids"].shape[1]
            if "word_ids" in rows[0][1]:
                out["word_ids"] = torch.tensor([r["word_ids"] + [-1] * (width - len(r["word_ids"])) for _, r in rows])
        return out


class _TaskView(Dataset):
    """A tokenised split whose items also carry their task name and row index; with ``texts``, also the text;
    with ``rows``, only those rows of the split, in that order (one process's shard under DDP, longest first)."""

    def __init__(self, data: datasets.Dataset, task: str, texts: list[str] | None = None,
                 rows: list[int] | None = None) -> None:
        self.data, self.task, self.texts, self.rows = data, task, texts, rows

    def __len__(self) -> int:
        return len(self.data) if self.rows is None else len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index) if self.rows is None else self.rows[int(index)]
        # the row index (within the whole split) keys per-example caches (the frozen-prefix cache) and prediction output
        item = {**self.data[index], "task": self.task, "index": index}
        if self.texts is not None:  # a row that is one window of an example carries that example's text
            item["text"] = self.texts[item.get("example", index)]
        return item


def refuse_on_every_rank(trainer: Any, error: MTLConfigError) -> NoReturn:
    """Stop every process of a distributed run on a user mistake that each of them found: only one per node reports it.

    The processes a user starts (local rank 0: the Lightning launcher, or one per node) raise ``error``, which the CLI
    prints as one line with exit status 2. The others leave quietly with status 0: Lightning's launcher kills its
    process within seconds of a child failing, which could cut it off before it prints the line.
    """
    if getattr(trainer, "local_rank", 0) == 0:
        raise error
    raise SystemExit(0)


def _sampler_refusal(processes: int) -> MTLConfigError:
    return MTLConfigError(f"trainer.use_distributed_sampler: true with {processes} processes, expected false: mtl "
                          "shards its batches by rank itself, and Lightning cannot wrap the task batch sampler "
                          "(train.py sets false)")


def _smaller(a: int | None, b: int | None) -> int | None:
    """The tighter of two optional caps (None: no cap)."""
    return b if a is None else a if b is None else min(a, b)


class TaskDataModule(L.LightningDataModule):
    """Batches for one or several tasks; every batch holds one task's examples.

    Batches are dicts: ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the
    tokenizer makes them) padded to the batch's longest example, ``labels`` (long for
    classification, float for regression / multilabel) and ``task`` (the task's name).
    Training batches come only from ``tasks``; with several, from a ``TaskBatchSampler``.
    Validation / test give one loader per task, in the order of ``tasks + eval_tasks``.

    Several processes (DDP; the Trainer needs ``use_distributed_sampler=False``, which train.py sets):
    training batches always come from a ``TaskBatchSampler`` (one task too), which deals each
    step's examples out across the ranks, every rank the same number of batches; validation and
    test loaders give each rank every ``world_size``-th row of each split, not padded, so every
    row is evaluated exactly once (the per-task torchmetrics add up the ranks' states).
    ``predict`` loaders are not sharded.

    Lengths: with ``group_by_length``, training batches hold examples of similar length (see
    ``TaskBatchSampler``), one task in one process too. Validation and test loaders always run
    their rows longest first: each batch carries its rows' ``labels`` (and ``index``), so metrics
    do not depend on the order, and less padding costs nothing. ``predict`` loaders keep the
    split's order, so the written predictions follow the rows. Lengths are read from the
    tokenised (cached) splits, never by tokenising again.

    Prediction: without ``predict_file``, one loader per task (``tasks + eval_tasks``) over
    ``predict_split``, batches as above plus ``index`` (LongTensor, the rows' positions in the
    split) and ``text`` (list of the first text field, raw). With ``predict_file``, one loader
    streaming the file (read and tokenised a batch at a time): ``input_ids``, ``attention_mask``
    (``token_type_ids``), ``index`` (position among the file's examples, blank lines skipped),
    ``text``, no ``labels`` and ``task`` None (meaning every task of the model).

    Args:
        tasks: Tasks to train (and evaluate): names (``<tasks_dir>/<name>.yaml``) or paths to task YAML
            files. May be empty for prediction only (``train_dataloader`` then raises).
        backbone: Backbone whose tokenizer is used (alias, local folder or cached hub name).
        tasks_dir: Folder where bare task names are looked up.
        batch_size: Training batch size (per device).
        eval_batch_size: Batch size for validation, test and predict.
        num_workers: DataLoader worker processes (0: load in the main process).
        sampling: Task sampling for multi-task training: proportional, temperature, uniform or round_robin.
        temperature: T of temperature sampling (p ~ n ** (1 / T)).
        seed: Seed of shuffling and task sampling (each epoch reseeds with seed and epoch).
        cache_dir: Folder for tokenised datasets (default ``~/.cache/mtl/datasets``).
        eval_tasks: Tasks that are evaluated (validate / test / predict) but never trained, e.g. adapters
            loaded from an earlier run; none may also be in ``tasks``.
        max_train_examples: Cap on every task's train split, on top of the spec's own cap (the smaller
            wins); same seeded stratified subsample as the spec's cap. None: the spec's cap only.
        max_eval_examples: Same for validation and for test, each.
        predict_split: Split that ``predict_dataloader`` reads when there is no ``predict_file``:
            train, validation or test.
        predict_file: A ``.txt`` (one example per non-empty line) or ``.jsonl`` file to predict on instead
            of a split; its batches are for every task of the model.
        predict_text_field: Key of the text in each ``.jsonl`` object.
        predict_max_length: Tokens per ``predict_file`` example after truncation (None: 128, or the backbone's
            limit when that is smaller).
        train_subsets: task -> rows of its (capped) train split to train on instead of all of it (e.g. a replay
            buffer of an earlier task); a row of a multiple-choice example brings the whole example (all its choices).
        task_weights: task -> relative probability of drawing that task for a training batch, replacing
            ``sampling`` (every task of ``tasks`` needs one).
        group_by_length: Training batches of examples of similar length (less padding): each run of
            ``group_batches`` shuffled batches is sorted by length and cut again, then the batches are shuffled.
        group_batches: Batches per length group (megabatch) with ``group_by_length``.
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
        eval_tasks: list[str] = [],  # noqa: B006 - never mutated; [] shows as such in --print_config
        max_train_examples: int | None = None,
        max_eval_examples: int | None = None,
        predict_split: str = "test",
        predict_file: str | None = None,
        predict_text_field: str = "text",
        predict_max_length: int | None = None,
        train_subsets: dict[str, list[int]] | None = None,
        task_weights: dict[str, float] | None = None,
        group_by_length: bool = True,
        group_batches: int = GROUP_BATCHES,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if batch_size < 1 or eval_batch_size < 1 or num_workers < 0:
            raise MTLConfigError(
                f"data: batch_size={batch_size}, eval_batch_size={eval_batch_size}, num_workers={num_workers}: "
                "expected batch sizes >= 1 and num_workers >= 0"
            )
        for key, cap in (("max_train_examples", max_train_examples), ("max_eval_examples", max_eval_examples)):
            if cap is not None and cap < 1:
                raise MTLConfigError(f"data.{key}: got {cap!r}, expected a positive int (or null: the spec's own cap)")
        if group_batches < 1:
            raise MTLConfigError(f"data.group_batches: got {group_batches!r}, expected an int >= 1")
        if predict_split not in SPLITS:
            raise MTLConfigError(f"data.predict_split: got {predict_split!r}, expected one of {list(SPLITS)}")
        if predict_max_length is not None and predict_max_length < 2:
            raise MTLConfigError(f"data.predict_max_length: got {predict_max_length!r}, expected an int >= 2")
        if not predict_text_field:
            raise MTLConfigError("data.predict_text_field: empty, expected the .jsonl key that holds the text")
        if predict_file is not None:
            check_predict_file_name(predict_file)
        task_probabilities([1], sampling, temperature)  # fail on a bad strategy now, not at fit time
        self._specs = load_task_specs("data.tasks", tasks, tasks_dir)
        self._train_names = list(self._specs)
        self._specs = load_task_specs("data.eval_tasks", eval_tasks, tasks_dir, self._specs)
        for key, given in (("data.train_subsets", train_subsets), ("data.task_weights", task_weights)):
            unknown = sorted(set(given or {}) - set(self._train_names))
            if unknown:
                raise MTLConfigError(f"{key}: tasks {unknown} are not in data.tasks {self._train_names}")
        if task_weights is not None:
            bad = {t: w for t, w in task_weights.items() if not w >= 0}
            if bad or set(task_weights) != set(self._train_names) or not sum(task_weights.values()) > 0:
                raise MTLConfigError(f"data.task_weights: {task_weights}, expected a weight >= 0 for every task of "
                                     f"data.tasks {self._train_names}, not all zero")
        self.train_subsets, self.task_weights = dict(train_subsets or {}), task_weights
        self.backbone, self.tasks_dir, self.seed = backbone, tasks_dir, seed
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.sampling, self.temperature = sampling, temperature
        self.group_by_length, self.group_batches = group_by_length, group_batches
        self.max_train_examples, self.max_eval_examples = max_train_examples, max_eval_examples
        self.predict_split, self.predict_file = predict_split, predict_file
        self.predict_text_field, self.predict_max_length = predict_text_field, predict_max_length
        self.cache_dir = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser()
        self._check_lengths()
        self._predict_file_checked = False
        self._data: dict[str, datasets.DatasetDict] = {}
        self._raw: dict[str, datasets.DatasetDict] = {}  # untokenised splits: read once (preflight), tokenised later
        self._lengths: dict[tuple[str, str], list[int]] = {}
        self._tokenizer: Any = None

    def _check_lengths(self) -> None:
        """Every max_length fits the backbone's position embeddings (else the first forward fails on shapes)."""
        limit = max_tokens(load_backbone_config(self.backbone))
        if self.predict_max_length is None:
            self.predict_max_length = min(128, limit)
        lengths = [(f"{spec.spec_file}: max_length", spec.max_length) for spec in self._specs.values()]
        for key, length in [*lengths, ("data.predict_max_length", self.predict_max_length)]:
            if length > limit:
                raise MTLConfigError(f"{key}: got {length}, expected at most {limit} (the most tokens backbone "
                                     f"'{self.backbone}' has positions for)")

    def check_before(self, stage: str, processes: int = 1, distributed_sampler: bool = False) -> None:
        """Read what ``stage`` needs (task data or the predict file) and check the cache folder, writing nothing.

        Task data read here is kept, so the run does not read it twice; the predict file is only validated (it is
        streamed when predicting). ``processes`` and ``distributed_sampler``: what the Trainer will run with (the CLI
        reads them from its configuration before any process starts).
        """
        if processes > 1 and distributed_sampler:
            raise _sampler_refusal(processes)
        if stage == "predict" and self.predict_file is not None:
            count_predict_examples(self.predict_file, self.predict_text_field)
            if file_form(self.predict_file, self.predict_text_field) == "question":
                self._check_questions()
            self._predict_file_checked = True
            return
        writable_folder(self.cache_dir, "data.cache_dir")
        for name in self._specs:
            self._raw_dataset(name)

    def _check_questions(self) -> None:
        """Every question of the predict file leaves room for its context in a window (one line naming the row)."""
        from mtl.kinds.extractive_qa import check_room

        stride = predict_stride(self.predict_max_length)
        rows = enumerate(iter_predict_texts(self.predict_file, self.predict_text_field), start=1)
        for chunk in iter(lambda: list(itertools.islice(rows, 256)), []):
            found = check_room(self.tokenizer, [q["question"] for _, q in chunk], self.predict_max_length, stride)
            if found is not None:
                raise MTLConfigError(f"{self.predict_file}: row {chunk[found[0]][0]}: {found[1]} (raise "
                                     "data.predict_max_length)")

    @property
    def specs(self) -> dict[str, TaskSpec]:
        """Task name -> spec for ``tasks + eval_tasks``, in that order; available right after construction."""
        return dict(self._specs)

    @property
    def task_names(self) -> list[str]:
        """Every task: ``tasks`` then ``eval_tasks`` (the order of the evaluation loaders)."""
        return list(self._specs)

    @property
    def train_task_names(self) -> list[str]:
        """The tasks that are trained (``tasks``)."""
        return list(self._train_names)

    @property
    def eval_task_names(self) -> list[str]:
        """The tasks that are evaluated but not trained (``eval_tasks``)."""
        return [n for n in self._specs if n not in self._train_names]

    @property
    def tokenizer(self) -> Any:
        """The backbone's tokenizer (loaded on first use)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.backbone)
        return self._tokenizer

    @property
    def task_datasets(self) -> dict[str, datasets.DatasetDict]:
        """Task name -> tokenised train / validation / test (builds them on first use)."""
        return {name: self._dataset(name) for name in self._specs}

    def prepare_data(self) -> None:
        """Read and tokenise the tasks the current stage needs into the on-disk cache (rank 0 of each node)."""
        trainer = self._trainer_or_none()
        state = getattr(trainer, "state", None)
        self.setup(getattr(getattr(state, "fn", None), "value", None))

    def setup(self, stage: str | None = None) -> None:
        """Load the tokenised datasets (from the cache that ``prepare_data`` filled)."""
        # predicting on a file needs no task data (it may not even exist where the model is served)
        if stage == "predict" and self.predict_file is not None:
            return
        _ = self.task_datasets

    def effective_spec(self, name: str) -> TaskSpec:
        """The task's spec with the module's caps applied on top of its own (the smaller wins)."""
        spec = self._specs[name]
        return dataclasses.replace(
            spec,
            max_train_examples=_smaller(spec.max_train_examples, self.max_train_examples),
            max_eval_examples=_smaller(spec.max_eval_examples, self.max_eval_examples),
        )

    def cache_key(self, spec: TaskSpec, data: datasets.DatasetDict) -> str:
        """Hash of everything the tokenised splits depend on: spec (with caps), tokenizer, max_length, raw data."""
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

    def _dataset(self, name: str) -> datasets.DatasetDict:
        if name not in self._data:
            self._data[name] = self._tokenised(self.effective_spec(name))
        return self._data[name]

    def split_size(self, name: str, split: str) -> int:
        """Examples in a task's split, with the caps applied (reads the task's data once, tokenises nothing)."""
        return len(self._raw_dataset(name)[split])

    def _raw_dataset(self, name: str) -> datasets.DatasetDict:
        """The task's untokenised splits with the caps applied (read once)."""
        if name not in self._raw:
            spec = self.effective_spec(name)
            raw = load_task_dataset(spec)
            kind = kind_of(spec.problem)
            for split in SPLITS:  # what only the tokenizer can find, before any split is tokenised into the cache
                found = kind.check_tokenized(self.tokenizer, raw[split], spec)
                if found is not None:
                    raise MTLConfigError(f"{spec.spec_file}: source.{split} row {found[0]}: {found[1]}")
            self._raw[name] = raw
        return self._raw[name]

    def _tokenised(self, spec: TaskSpec) -> datasets.DatasetDict:
        # the caps are in ``spec`` (see effective_spec), so they are part of the cache key
        raw = self._raw_dataset(spec.name)
        key = self.cache_key(spec, raw)
        folder = self.cache_dir / f"{spec.name}-{key}"
        folder.mkdir(parents=True, exist_ok=True)
        kind, tok = kind_of(spec.problem), self.tokenizer

        def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
            return kind.encode(tok, batch, indices, spec)

        out = {}
        for split in SPLITS:
            # datasets writes to a temp file in the same folder and renames it: safe if interrupted
            out[split] = raw[split].map(
                encode,
                batched=True,
                with_indices=True,
                remove_columns=raw[split].column_names,
                cache_file_name=str(folder / f"{split}.arrow"),
                load_from_cache_file=True,
                new_fingerprint=f"{key}-{split}",
                desc=f"tokenising {spec.name}/{split}",
            )
            if "example" in out[split].column_names and kind.example_rows(spec) is None:
                # rows are windows of examples: say how many were cut
                counts = pc.value_counts(out[split].with_format("arrow")["example"]).field("counts")
                long = pc.sum(pc.greater(counts, 1)).as_py() or 0
                if long:
                    print(f"{spec.name}/{split}: {long} of {len(raw[split])} examples are longer than max_length "
                          f"{spec.max_length} and were cut into overlapping windows (doc_stride {spec.stride}); "
                          f"{'each word is still predicted once' if kind.reads_words else 'each is answered once'}")
        return datasets.DatasetDict(out)

    def token_lengths(self, name: str, split: str) -> list[int]:
        """Tokens of each row of a task's tokenised split (what the collator pads to), read once from the cache."""
        key = (name, split)
        if key not in self._lengths:
            # list lengths from the Arrow offsets of the cached column: no tokenising, no Python lists of ids
            column = self._dataset(name)[split].with_format("arrow")["input_ids"]
            self._lengths[key] = pc.list_value_length(column).to_pylist()
        return self._lengths[key]

    def _collator(self) -> TaskCollator:
        return TaskCollator(self.tokenizer, {n: s.problem for n, s in self._specs.items()})

    def _rank(self) -> tuple[int, int]:
        trainer = self._trainer_or_none()
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _check_distributed(self) -> None:
        """Under several processes, Lightning must leave mtl's loaders alone (one line if it would not)."""
        trainer = self._trainer_or_none()
        _, world_size = self._rank()
        # no public accessor: this is the flag Lightning's data connector reads before wrapping a loader's sampler
        connector = getattr(trainer, "_accelerator_connector", None)
        if world_size > 1 and getattr(connector, "use_distributed_sampler", False):
            refuse_on_every_rank(trainer, _sampler_refusal(world_size))

    def _window_kind(self, form: str) -> Any:
        """The windowed kind of the model's tasks that read this predict file's form of example (question answering's
        for questions about a context, multiple choice's for questions with choices, a tagger's for texts), or None."""
        module = getattr(self._trainer_or_none(), "lightning_module", None)
        heads = getattr(getattr(module, "model", None), "heads", None)
        kinds = [kind_of(h.problem) for h in (heads or {}).values()]
        return next((k for k in kinds if k.windowed and k.reads == form), None)

    def _trainer_or_none(self) -> Any:
        return getattr(self, "trainer", None)

    def _current_epoch(self) -> int:
        # Lightning calls set_epoch on samplers but not on batch samplers: the sampler reads this
        trainer = self._trainer_or_none()
        return trainer.current_epoch if trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        """Shuffled train batches of ``tasks``: a plain loader for one task, a TaskBatchSampler for several."""
        if not self._train_names:
            raise MTLConfigError(
                "data.tasks: empty, nothing to train; expected at least one task to train "
                "(data.eval_tasks are only evaluated)"
            )
        views = [_TaskView(self._train_split(n), n) for n in self._train_names]
        collate = TaskCollator(self.tokenizer, {n: s.problem for n, s in self._specs.items()},
                               {n: self._terms_per_batch(n, v.data) for n, v in zip(self._train_names, views)
                                if kind_of(self._specs[n].problem).terms_per_row})
        common = dict(collate_fn=collate, num_workers=self.num_workers, persistent_workers=self.num_workers > 0)
        rank, world_size = self._rank()
        groups = [self.rows_per_example(n) for n in self._train_names]
        if len(views) == 1 and world_size == 1 and not self.group_by_length and groups == [1]:
            generator = torch.Generator().manual_seed(self.seed)
            return DataLoader(views[0], batch_size=self.batch_size, shuffle=True, generator=generator, **common)
        self._check_distributed()
        few = next(((n, len(v) // g) for n, v, g in zip(self._train_names, views, groups) if len(v) // g < world_size),
                   None)
        if few is not None:
            refuse_on_every_rank(self._trainer_or_none(), MTLConfigError(
                f"data.tasks: {few[0]} has {few[1]} training example(s), fewer than the {world_size} processes "
                "(trainer world size); expected at least one per process"))
        # one task under DDP (or grouped by length, or with an example's rows drawn together) too: the plain shuffled
        # loader would give every rank the same examples (and cannot group)
        lengths = [self._train_lengths(n) for n in self._train_names] if self.group_by_length else None
        sampler = TaskBatchSampler(
            [len(v) for v in views],
            self.batch_size,
            strategy=self.sampling,
            temperature=self.temperature,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            epoch_fn=self._current_epoch,
            probabilities=self._task_weights(views),
            lengths=lengths,
            group_batches=self.group_batches,
            example_rows=groups,
        )
        return DataLoader(ConcatDataset(views), batch_sampler=sampler, **common)

    def _terms_per_batch(self, name: str, data: datasets.Dataset) -> float:
        """The mean count of loss terms in a training batch of a task whose rows give several (a tagger's words)."""
        kind = kind_of(self._specs[name].problem)
        terms = sum(kind.loss_terms(labels) for labels in data.with_format("arrow")["labels"].to_pylist())
        return max(terms, 1) / max(len(data), 1) * min(self.batch_size, len(data))

    def _task_weights(self, views: list[_TaskView]) -> list[float] | None:
        """Each task's chance of a training batch: ``task_weights``, or the sampling strategy over the tasks' counts
        of examples, not rows (a tagger's long sentence is several rows); None where they are the same."""
        if self.task_weights is not None:
            return [self.task_weights[n] for n in self._train_names]
        counts = [len(set(v.data.with_format("arrow")["example"].to_pylist())) if "example" in v.data.column_names
                  else len(v) for v in views]
        if counts == [len(v) for v in views] or self.sampling == "round_robin":
            return None
        return task_probabilities(counts, self.sampling, self.temperature)

    def _train_split(self, name: str) -> datasets.Dataset:
        """A task's tokenised train split, or the rows of it that ``train_subsets`` names."""
        data = self._dataset(name)["train"]
        rows = self.train_subsets.get(name)
        if rows is None:
            return data
        if not rows or min(rows) < 0 or max(rows) >= len(data):
            raise MTLConfigError(f"data.train_subsets: {name}: rows must be within 0..{len(data) - 1} and not empty")
        return data.select(self._subset(name))

    def _subset(self, name: str) -> list[int] | None:
        """A task's ``train_subsets`` rows, where a listed row of a multiple-choice question brings all its rows."""
        rows, group = self.train_subsets.get(name), self.rows_per_example(name)
        if rows is None or group == 1:
            return rows
        return unit_rows(sorted({r // group for r in rows}), group)

    def rows_per_example(self, name: str) -> int:
        """How many consecutive rows of task ``name``'s tokenised splits each example is, kept together in every batch
        (a multiple-choice question's choices); 1 where an example's rows train apart."""
        spec = self._specs[name]
        return kind_of(spec.problem).example_rows(spec) or 1

    def _train_lengths(self, name: str) -> list[int]:
        """Tokens of each row of `_train_split` (the ``train_subsets`` rows where given)."""
        lengths, rows = self.token_lengths(name, "train"), self._subset(name)
        return lengths if rows is None else [lengths[r] for r in rows]

    def _eval_loaders(self, split: str, with_text: bool = False, shard: bool = False,
                      by_length: bool = False) -> list[DataLoader]:
        """One loader per task over ``split``; with ``shard`` under several processes, this rank's rows only; with
        ``by_length``, the rows longest first."""
        if not self._specs:
            raise MTLConfigError(
                f"data.tasks and data.eval_tasks: empty, nothing to read the {split} split of; "
                "expected at least one task (or data.predict_file to predict on a file)"
            )
        collate = self._collator()
        rank, world_size = self._rank()
        shard = shard and world_size > 1
        if shard:
            self._check_distributed()
        loaders = []
        for name in self._specs:
            data = self._dataset(name)[split]  # builds the task if needed, which also fills self._raw
            if shard and len(data) < world_size:
                # a rank without rows would never update that task's metrics (nothing to add up)
                refuse_on_every_rank(self._trainer_or_none(), MTLConfigError(
                    f"data: {name}: the {split} split has {len(data)} example(s), fewer than the {world_size} "
                    "processes (trainer world size); expected at least one per process (raise data.max_eval_examples "
                    "or run on fewer devices)"))
            texts = list(self._raw[name][split][self._specs[name].text_fields[0]]) if with_text else None
            # an example whose rows are its answer choices is one unit: sharded, sorted and batched whole
            group = self.rows_per_example(name)
            units = shard_rows(len(data) // group, rank, world_size) if shard else None
            sampler = None
            if by_length:
                # batches of like lengths (one long outlier does not pad a whole batch), the largest first: it runs
                # in the sanity check, so a lack of memory shows at once; the batches hold the split's own rows
                batches = length_batches(range(len(data) // group) if units is None else units,
                                         unit_lengths(self.token_lengths(name, split), group), self.eval_batch_size)
                sampler, units = FixedBatches([unit_rows(batch, group) for batch in batches]), None
            view = _TaskView(data, name, texts, None if units is None else unit_rows(units, group))
            if with_text and kind_of(self._specs[name].problem).windowed and group == 1:
                # predictions join an example's windows again: they must share a batch
                examples = data.with_format("arrow")["example"].to_pylist()
                sampler = FixedBatches(whole_example_batches(examples, self.eval_batch_size))
            if sampler is None:
                loaders.append(DataLoader(view, batch_size=self.eval_batch_size * group, collate_fn=collate,
                                          num_workers=self.num_workers))
            else:
                loaders.append(DataLoader(view, batch_sampler=sampler, collate_fn=collate,
                                          num_workers=self.num_workers))
        return loaders

    def first_examples(self, task: str, split: str, rows: int) -> dict[str, Any]:
        """The first ``rows`` examples of a task's split as one batch (a fixed probe: the same batch every call)."""
        view = _TaskView(self._dataset(task)[split], task)
        return self._collator()([view[i] for i in range(min(rows, len(view)))])

    def val_dataloader(self) -> list[DataLoader]:
        """One validation loader per task, in the order of ``tasks + eval_tasks`` (this rank's rows under DDP, longest
        first)."""
        return self._eval_loaders("validation", shard=True, by_length=True)

    def test_dataloader(self) -> list[DataLoader]:
        """One test loader per task, in the order of ``tasks + eval_tasks`` (this rank's rows under DDP, longest
        first)."""
        return self._eval_loaders("test", shard=True, by_length=True)

    def full_eval_loaders(self, split: str) -> list[DataLoader]:
        """One loader per task over every row of ``split``, longest first, also under DDP (for a report that one
        process writes)."""
        return self._eval_loaders(split, by_length=True)

    def predict_dataloader(self) -> list[DataLoader]:
        """One loader over ``predict_file`` if set, else one per task over ``predict_split`` (see the class docstring)."""
        if self.predict_file is not None:
            if not self._predict_file_checked:  # mistakes in the file stop the run before any output is started
                count_predict_examples(self.predict_file, self.predict_text_field)
            form = file_form(self.predict_file, self.predict_text_field)
            stream = TextStream(self.predict_file, self.predict_text_field, self.tokenizer, self.predict_max_length,
                                self.eval_batch_size, windows=self._window_kind(form))
            # the stream yields whole batches (batch_size=None): tokenised per batch, in the file's order
            return [DataLoader(stream, batch_size=None, collate_fn=self._collator(), num_workers=self.num_workers)]
        return self._eval_loaders(self.predict_split, with_text=True)
