"""Several processes (DDP): `train.py fit --trainer.strategy ddp --trainer.devices 2 --trainer.accelerator cpu`.

The unit tests check the pieces in one process (how a step's examples are dealt out to ranks, how evaluation splits
are sharded, what the data module refuses). The others run real 2-process fits with gloo on a tiny BERT through the
CLI (each ~10 s on 2 cores): single task, joint multi-task and add-a-task, with a `Recorder` callback that writes what
every rank trained and evaluated on, and compare against a 1-process computation.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from mtl.data.sampling import TaskBatchSampler, pass_chunks, shard_rows
from mtl.errors import MTLConfigError

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 180  # a hung collective fails the test instead of blocking the suite


class Recorder(L.Callback):
    """Writes ``<folder>/rank<N>.json``: every training batch (epoch, task, rows), every validation batch after the
    sanity check, and the ``val/`` metrics of the last validation."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.train: list[list[Any]] = []
        self.val: list[list[Any]] = []
        self.metrics: dict[str, float] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.train.append([trainer.current_epoch, batch["task"], batch["index"].tolist()])

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking:
            self.val.append([trainer.current_epoch, batch["task"], batch["index"].tolist()])

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self.metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

    def on_fit_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {"world_size": trainer.world_size, "train": self.train, "val": self.val, "metrics": self.metrics}
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


# ---- one process: the pieces ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_pass_chunks_give_every_example_once_and_every_rank_some(world_size):
    for step in (world_size * 2, world_size * 5):
        for n in range(world_size, 4 * step):
            perm = list(range(n))[::-1]
            chunks = pass_chunks(perm, step, world_size)
            assert [i for c in chunks for i in c] == perm  # in order: none repeated, none left out
            assert all(len(c) == step for c in chunks[:-1]) and world_size <= len(chunks[-1]) < step + world_size
            kept = pass_chunks(perm, step, world_size, drop_last=True)
            assert [len(c) for c in kept] == [step] * (n // step)


def _global_steps(sizes: list[int], batch_size: int, world_size: int, epoch: int = 0) -> list[list[int]]:
    """Each step's rows over all ranks, checking on the way that ranks agree on the task and get disjoint rows."""
    per_rank = []
    for rank in range(world_size):
        sampler = TaskBatchSampler(sizes, batch_size, "proportional", seed=5, rank=rank, world_size=world_size)
        sampler.set_epoch(epoch)
        per_rank.append(list(sampler))
    assert len({len(batches) for batches in per_rank}) == 1  # the same number of steps on every rank, or DDP hangs
    steps = []
    for batches in zip(*per_rank):
        rows = [i for b in batches for i in b]
        assert len(set(rows)) == len(rows)
        assert max(map(len, batches)) - min(map(len, batches)) <= 1 and min(map(len, batches)) >= 1
        offsets = TaskBatchSampler(sizes, batch_size).offsets
        assert len({sum(i >= o for o in offsets) for i in rows}) == 1  # one task per step, the same on every rank
        steps.append(rows)
    return steps


def test_two_ranks_deal_out_the_one_process_batches_of_twice_the_size():
    # 37 % 8 = 5 and 29 % 8 = 5: each pass ends with a chunk of 5, dealt out as 3 + 2
    sizes = [37, 29]
    for epoch in (0, 1):
        two = _global_steps(sizes, 4, 2, epoch)
        one = _global_steps(sizes, 8, 1, epoch)
        assert [sorted(s) for s in two] == [sorted(s) for s in one]
        assert any(len(s) == 5 for s in two)  # the uneven case (3 and 2 rows) did occur
    # per task, the stream of rows over all ranks is a sequence of passes: no row twice within a pass
    offsets = [0, 37]
    for task, size in enumerate(sizes):
        stream = [i - offsets[task] for s in _global_steps(sizes, 4, 2) for i in s
                  if offsets[task] <= i < offsets[task] + size]
        for start in range(0, len(stream), size):
            block = stream[start:start + size]
            assert len(set(block)) == len(block) and (len(block) < size or sorted(block) == list(range(size)))


def test_one_task_epoch_is_exactly_one_pass_on_two_ranks():
    # 33 % 8 = 1: the last row would leave rank 1 without a batch, so it joins the chunk before (5 + 4 rows there)
    for size in (32, 33, 37):
        steps = _global_steps([size], 4, 2)
        assert sorted(i for s in steps for i in s) == list(range(size))
    assert [len(s) for s in _global_steps([33], 4, 2)] == [8, 8, 8, 9]
    assert len(_global_steps([33], 8, 1)) == 5  # where the 1-process run has a batch of 1 of its own


def test_evaluation_shards_cover_every_row_once_without_padding():
    for size in (1, 2, 7, 8):
        shards = [shard_rows(size, r, 2) for r in range(2)]
        assert sorted(shards[0] + shards[1]) == list(range(size)) and abs(len(shards[0]) - len(shards[1])) <= 1
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        shard_rows(4, 2, 2)


def _fake_trainer(rank: int, world_size: int = 2, use_distributed_sampler: bool = False) -> SimpleNamespace:
    return SimpleNamespace(global_rank=rank, local_rank=rank, world_size=world_size, current_epoch=0,
                           _accelerator_connector=SimpleNamespace(use_distributed_sampler=use_distributed_sampler))


def _data(tiny_dir, task_dir, cache, tasks=("keyword",), **kwargs):
    from mtl.data.module import TaskDataModule

    return TaskDataModule(list(tasks), backbone=str(tiny_dir), tasks_dir=str(task_dir), cache_dir=str(cache),
                          batch_size=4, eval_batch_size=5, **kwargs)


def test_data_module_shards_one_task_and_evaluation_by_rank(tiny_dir, task_dir, tmp_path):
    train, val = {}, {}
    for rank in range(2):
        dm = _data(tiny_dir, task_dir, tmp_path, max_train_examples=33, max_eval_examples=11)
        dm.trainer = _fake_trainer(rank)
        loader = dm.train_dataloader()
        assert isinstance(loader.batch_sampler, TaskBatchSampler)  # not the plain loader: it would not shard
        train[rank] = [b["index"].tolist() for b in loader]
        val[rank] = [i for b in dm.val_dataloader()[0] for i in b["index"].tolist()]
        assert [len(v.dataset) for v in dm.full_eval_loaders("validation")] == [11]
    assert len(train[0]) == len(train[1]) == 4
    rows = [i for r in range(2) for b in train[r] for i in b]
    assert sorted(rows) == list(range(33))  # one epoch: every training row once, over both ranks
    assert val == {0: [0, 2, 4, 6, 8, 10], 1: [1, 3, 5, 7, 9]}  # the rows' own indices in the split, not padded


def test_data_module_refusals_under_two_processes(tiny_dir, task_dir, tmp_path):
    dm = _data(tiny_dir, task_dir, tmp_path, max_train_examples=33)
    dm.trainer = _fake_trainer(0, use_distributed_sampler=True)
    with pytest.raises(MTLConfigError, match=r"^trainer.use_distributed_sampler: true with 2 processes, expected false"):
        dm.train_dataloader()
    dm.trainer = _fake_trainer(1, use_distributed_sampler=True)
    with pytest.raises(SystemExit) as done:  # other ranks leave quietly: local rank 0 reports the mistake
        dm.train_dataloader()
    assert done.value.code == 0
    few = _data(tiny_dir, task_dir, tmp_path, max_train_examples=33, max_eval_examples=1)
    few.trainer = _fake_trainer(0)
    with pytest.raises(MTLConfigError, match=r"^data: keyword: the validation split has 1 example\(s\), fewer than "
                                             r"the 2 processes"):
        few.val_dataloader()
    few.trainer = _fake_trainer(0, world_size=1)
    assert [len(v.dataset) for v in few.val_dataloader()] == [1]


def _module(tiny_dir, task_dir, tasks: list[str], **kwargs):
    from mtl.lit import AdapterTrainer

    return AdapterTrainer(tasks, backbone=str(tiny_dir), tasks_dir=str(task_dir), **kwargs)


def _attach(module, rank: int, strategy: Any, world_size: int = 2) -> None:
    module.trainer = SimpleNamespace(world_size=world_size, global_rank=rank, local_rank=rank, is_global_zero=rank == 0,
                                     strategy=strategy)


def test_ddp_setup_lets_steps_leave_other_tasks_unused_and_refuses_what_cannot_work(tiny_dir, task_dir):
    from lightning.pytorch.strategies import DDPStrategy

    joint = _module(tiny_dir, task_dir, ["keyword", "colour"])
    _attach(joint, 0, DDPStrategy())  # what --trainer.strategy ddp builds
    joint._setup_distributed()
    assert joint.trainer.strategy._ddp_kwargs == {"find_unused_parameters": True}
    _attach(joint, 0, DDPStrategy(find_unused_parameters=False))  # ddp_find_unused_parameters_false
    with pytest.raises(MTLConfigError, match=r"^trainer.strategy: find_unused_parameters is false, but each step "
                                             r"trains one of 2 tasks"):
        joint._setup_distributed()
    one = _module(tiny_dir, task_dir, ["keyword"])
    _attach(one, 0, DDPStrategy())
    one._setup_distributed()
    assert one.trainer.strategy._ddp_kwargs == {}  # every trainable tensor is used in every step
    robust = _module(tiny_dir, task_dir, ["keyword"], adapter={"type": "pfeiffer", "robust_drop": True})
    _attach(robust, 0, DDPStrategy())
    robust._setup_distributed()
    assert robust.trainer.strategy._ddp_kwargs == {"find_unused_parameters": True}
    cached = _module(tiny_dir, task_dir, ["keyword"], cache_frozen_prefix=True, adapter={"drop_first": 1})
    for world_size in (1, 2):
        _attach(cached, 0, DDPStrategy(), world_size)
        if world_size == 1:
            cached._setup_distributed()
        else:
            with pytest.raises(MTLConfigError, match=r"^model.cache_frozen_prefix: not supported with 2 processes"):
                cached._setup_distributed()
    _attach(cached, 1, DDPStrategy())
    with pytest.raises(SystemExit) as done:
        cached._setup_distributed()
    assert done.value.code == 0


# ---- two processes: real fits --------------------------------------------------------------------------------------
def run_train(args: list[str], cwd: Path) -> tuple[int, str, str]:
    """``python train.py args`` in its own process group (killed whole on a timeout): exit code, stdout, stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the ranks it started
        out, err = proc.communicate()
        pytest.fail(f"train.py did not finish in {TIMEOUT_S} s\n{out[-3000:]}\n{err[-3000:]}")
    return proc.returncode, out, err


def ddp_args(tiny_dir, task_dir, root: Path, name: str, tasks: list[str], *extra: str) -> list[str]:
    """A 2-process CPU fit of ``tasks`` into ``root/name`` with the Recorder writing to ``root/name-record``."""
    config = root / f"{name}.yaml"
    config.write_text(f"trainer:\n  callbacks:\n    - class_path: tests.test_ddp.Recorder\n"
                      f"      init_args: {{folder: '{root / (name + '-record')}'}}\n")
    return ["fit", "--config", str(config), *common_args(tiny_dir, task_dir, root, name, tasks),
            "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu", *extra]


def common_args(tiny_dir, task_dir, root: Path, name: str, tasks: list[str]) -> list[str]:
    return ["--seed_everything", "0", "--model.backbone", str(tiny_dir), "--data.tasks", f"[{', '.join(tasks)}]",
            "--data.tasks_dir", str(task_dir), "--data.cache_dir", str(root / "cache"),
            "--model.run_dir", str(root / name), "--trainer.default_root_dir", str(root / f"{name}-lightning"),
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--model.adapter.reduction_factor", "4",
            "--model.head_dropout", "0", "--model.lr", "0.01", "--data.batch_size", "4", "--data.eval_batch_size", "4",
            # compared with float32 computations in one process, to float rounding: no bf16 autocast
            "--trainer.precision", "32-true"]


def records(root: Path, name: str) -> list[dict]:
    """Both ranks' Recorder files."""
    found = [json.loads((root / f"{name}-record" / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in found] == [2, 2]
    return found


def check_training_shares(recs: list[dict], sizes: dict[str, int]) -> list[tuple[str, list[int]]]:
    """Per step: the same task on both ranks, disjoint rows, shares differing by at most one. Returns (task, rows)."""
    assert len(recs[0]["train"]) == len(recs[1]["train"]) > 0
    steps = []
    for (e0, t0, rows0), (e1, t1, rows1) in zip(recs[0]["train"], recs[1]["train"]):
        assert (e0, t0) == (e1, t1) and not set(rows0) & set(rows1) and abs(len(rows0) - len(rows1)) <= 1
        steps.append((e0, t0, rows0 + rows1))
    # per epoch and task (each epoch starts new passes), the rows over both ranks form passes without repeats
    for epoch in {e for e, _, _ in steps}:
        for task, size in sizes.items():
            stream = [i for e, t, rows in steps if (e, t) == (epoch, task) for i in rows]
            for start in range(0, len(stream), size):
                block = stream[start:start + size]
                assert len(set(block)) == len(block) and (len(block) < size or sorted(block) == list(range(size)))
    return [(t, rows) for _, t, rows in steps]


def one_process_metrics(run: Path, tiny_dir, task_dir, cache: Path, names: list[str], max_eval: int,
                        rows: dict[str, list[int]] | None = None) -> dict[str, float]:
    """val/<task>/{acc,f1,loss} of the exported model over every validation row (or only ``rows``), in one process."""
    from mtl.kinds import kind_of
    from mtl.metrics import build_metrics
    from mtl.model import MTLModel

    model = MTLModel.from_pretrained(run).eval()
    dm = _data(tiny_dir, task_dir, cache, tasks=names, max_eval_examples=max_eval)
    out = {}
    for loader in dm.full_eval_loaders("validation"):
        task = loader.dataset.task
        spec = dm.specs[task]
        metrics = build_metrics(spec.problem, spec.metrics, spec.labels, f"val/{task}/")
        logits, labels = [], []
        with torch.no_grad():
            for batch in loader:
                keep = [j for j, i in enumerate(batch["index"].tolist()) if rows is None or i in rows[task]]
                if keep:
                    pick = torch.tensor(keep)
                    types = batch.get("token_type_ids")
                    logits.append(model(batch["input_ids"][pick], batch["attention_mask"][pick],
                                        None if types is None else types[pick], tasks=task)[task])
                    labels.append(batch["labels"][pick])
        logits, labels = torch.cat(logits), torch.cat(labels)
        kind = kind_of(spec.problem)
        out.update({k: float(v) for k, v in metrics(*kind.metric_inputs(logits, {"labels": labels})).items()})
        out[f"val/{task}/loss"] = float(kind_of(model.heads[task].problem).loss(logits, labels))
    return out


def check_metrics(recs: list[dict], run: Path, tiny_dir, task_dir, root: Path, names: list[str], max_eval: int) -> None:
    """Each validation row was evaluated by exactly one rank, and the logged metrics are those of all rows."""
    seen: dict[str, list[int]] = {}
    rank0: dict[str, list[int]] = {}
    last = max(e for r in recs for e, _, _ in r["val"])
    for rank, rec in enumerate(recs):
        for epoch, task, rows in rec["val"]:
            if epoch == last:
                seen.setdefault(task, []).extend(rows)
                if rank == 0:
                    rank0.setdefault(task, []).extend(rows)
    assert sorted(seen) == sorted(names)
    assert all(sorted(rows) == list(range(max_eval)) for rows in seen.values())  # every row once, no padding
    full = one_process_metrics(run, tiny_dir, task_dir, root / "cache", names, max_eval)
    assert recs[0]["metrics"] == recs[1]["metrics"]  # synced: both ranks log the same values
    logged = recs[0]["metrics"]
    for key, value in full.items():
        if key.endswith("/loss"):
            assert logged[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
        else:
            assert logged[key] == value, key  # counts over all rows: exactly the same
    # the check bites: rank 0's rows alone give other values for at least one metric
    alone = one_process_metrics(run, tiny_dir, task_dir, root / "cache", names, max_eval, rank0)
    assert any(abs(alone[k] - full[k]) > 1e-4 for k in full)


def exported_once(out: str, tasks: list[str]) -> None:
    """Rank 0 alone printed fit's summary line, after testing, and it names each exported task once (both ranks'
    output is in ``out``)."""
    lines = [line for line in out.splitlines() if line.startswith("fit: ")]
    assert len(lines) == 1 and "; test (best checkpoint, " in lines[0], lines
    exports = lines[0].split("; exported ", 1)[1].split(", ")
    assert sorted(item.split(" -> ")[0] for item in exports) == sorted(tasks), lines


def no_temporaries(folder: Path) -> None:
    """Atomic writes leave no hidden temporary behind."""
    assert not [p for p in folder.rglob(".*")], list(folder.rglob(".*"))


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


JOINT_TRAIN, JOINT_EVAL = 37, 15  # 37 % 8 = 5: every pass ends with an uneven step (3 + 2 rows)


@pytest.fixture(scope="module")
def joint(tiny_dir, task_dir, tmp_path_factory) -> dict:
    """A 2-process joint fit of keyword + colour (2 epochs, batch 4 per rank)."""
    root = tmp_path_factory.mktemp("ddp")
    args = ddp_args(tiny_dir, task_dir, root, "joint", ["keyword", "colour"], "--trainer.max_epochs", "2",
                    "--data.max_train_examples", str(JOINT_TRAIN), "--data.max_eval_examples", str(JOINT_EVAL))
    code, out, err = run_train(args, root)
    assert code == 0, err[-4000:]
    return {"root": root, "run": root / "joint", "out": out, "err": err}


def test_ddp_joint_fit_shards_batches_syncs_metrics_and_exports_once(joint, tiny_dir, task_dir):
    recs = records(joint["root"], "joint")
    steps = check_training_shares(recs, {"keyword": JOINT_TRAIN, "colour": JOINT_TRAIN})
    # the steps are exactly the 1-process sampler's batches of 8 (same seed, same epochs, grouped by the same token
    # lengths), dealt out over the ranks
    dm = _data(tiny_dir, task_dir, joint["root"] / "cache", tasks=("keyword", "colour"), max_train_examples=JOINT_TRAIN,
               max_eval_examples=JOINT_EVAL)
    lengths = [dm.token_lengths(task, "train") for task in ("keyword", "colour")]
    expected = []
    for epoch in (0, 1):
        sampler = TaskBatchSampler([JOINT_TRAIN, JOINT_TRAIN], 8, seed=0, lengths=lengths)
        sampler.set_epoch(epoch)
        expected += [sorted(b) for b in sampler]
    offsets = {"keyword": 0, "colour": JOINT_TRAIN}
    assert [sorted(offsets[t] + i for i in rows) for t, rows in steps] == expected
    assert any(len(rows) == 5 for _, rows in steps)
    assert "ddp: find_unused_parameters on" in joint["out"]
    check_metrics(recs, joint["run"], tiny_dir, task_dir, joint["root"], ["keyword", "colour"], JOINT_EVAL)
    exported_once(joint["out"], ["keyword", "colour"])
    assert sorted(p.name for p in (joint["run"] / "adapters").iterdir()) == ["colour", "keyword"]
    no_temporaries(joint["run"])
    assert "Traceback" not in joint["err"]


def test_ddp_adapters_equal_one_process_with_twice_the_batch(joint, tiny_dir, task_dir):
    """2 ranks x 4 rows = 1 process x 8 rows: the same rows per step (the sampler deals out the 1-process batch), no
    dropout anywhere (head_dropout 0, adapter dropout 0, the frozen backbone in eval mode), a mean loss, and DDP's
    gradient average of the ranks' means weighted by their shares (3 + 2 rows at the end of a pass) is the gradient
    of the mean over the step's rows. AdamW then takes the same steps, up to float rounding (the mean is summed in
    another order)."""
    from mtl.cli import main

    root = joint["root"]
    args = common_args(tiny_dir, task_dir, root, "single-process", ["keyword", "colour"])
    args[args.index("--data.batch_size") + 1] = "8"
    main(["fit", *args, "--trainer.max_epochs", "2", "--trainer.devices", "1", "--trainer.accelerator", "cpu",
          "--data.max_train_examples", str(JOINT_TRAIN), "--data.max_eval_examples", str(JOINT_EVAL)])
    for task in ("keyword", "colour"):
        two = load_file(joint["run"] / "adapters" / task / "adapter.safetensors")
        one = load_file(root / "single-process" / "adapters" / task / "adapter.safetensors")
        assert two.keys() == one.keys()
        moved = max(float(t.abs().max()) for k, t in two.items() if "up" in k)
        assert moved > 1e-3  # trained: the up-projections started at zero
        diff = max(float((two[k] - one[k]).abs().max()) for k in two)
        assert diff < 1e-5, (task, diff)


def test_ddp_single_task_each_rank_its_share(tiny_dir, task_dir, tmp_path):
    # 33 % 8 = 1: the last row joins the step before it, so one epoch is one pass over the 33 rows on both ranks
    args = ddp_args(tiny_dir, task_dir, tmp_path, "single", ["keyword"], "--trainer.max_epochs", "1",
                    "--data.max_train_examples", "33", "--data.max_eval_examples", "13")
    code, out, err = run_train(args, tmp_path)
    assert code == 0, err[-4000:]
    recs = records(tmp_path, "single")
    steps = check_training_shares(recs, {"keyword": 33})
    assert sorted(i for _, rows in steps for i in rows) == list(range(33))  # every row exactly once in the epoch
    assert "find_unused_parameters" not in out  # one task: every trainable tensor is used in every step
    check_metrics(recs, tmp_path / "single", tiny_dir, task_dir, tmp_path, ["keyword"], 13)
    exported_once(out, ["keyword"])
    no_temporaries(tmp_path / "single")


def test_ddp_add_a_task_beside_loaded_adapters(joint, tiny_dir, task_dir, tmp_path):
    from tests.conftest import keyword_task

    keyword_task(task_dir, "shade", ["light", "dark"], rows=120, seed=2)
    run = tmp_path / "added"
    shutil.copytree(joint["run"] / "adapters", run / "adapters")
    before = file_hashes(run)
    args = ddp_args(tiny_dir, task_dir, tmp_path, "added", ["shade"], "--trainer.max_epochs", "1",
                    "--data.eval_tasks", "[keyword]", "--model.load_from", str(run),
                    "--data.max_train_examples", "30", "--data.max_eval_examples", "9")
    code, out, err = run_train(args, tmp_path)
    assert code == 0, err[-4000:]
    recs = records(tmp_path, "added")
    steps = check_training_shares(recs, {"shade": 30})
    assert {t for t, _ in steps} == {"shade"} and sorted(i for _, rows in steps for i in rows) == list(range(30))
    check_metrics(recs, run, tiny_dir, task_dir, tmp_path, ["shade", "keyword"], 9)
    exported_once(out, ["shade"])
    after = file_hashes(run)
    assert {k: v for k, v in after.items() if not k.startswith("adapters/shade/")} == before  # loaded: untouched
    no_temporaries(run)


def test_ddp_refuses_the_frozen_prefix_cache_in_one_line(tiny_dir, task_dir, tmp_path):
    args = ddp_args(tiny_dir, task_dir, tmp_path, "cached", ["keyword"], "--trainer.max_epochs", "1",
                    "--data.max_train_examples", "16", "--data.max_eval_examples", "4",
                    "--model.cache_frozen_prefix", "true", "--model.adapter.drop_first", "1")
    code, out, err = run_train(args, tmp_path)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err[-4000:]
    assert errors == ["error: model.cache_frozen_prefix: not supported with 2 processes (trainer world size), "
                      "expected false under DDP (or run on one device)"]
    assert "Traceback" not in err
    assert not (tmp_path / "cached").exists() and not (tmp_path / "cached-record").exists()


@pytest.mark.parametrize("config, processes", [({}, 1), ({"devices": "auto"}, 1), ({"devices": 2}, 2),
                                               ({"devices": "2", "num_nodes": 2}, 4), ({"devices": [0, 1]}, 2),
                                               ({"devices": "0,1,"}, 2), ({"devices": 1, "num_nodes": 3}, 3)])
def test_process_count_reads_devices_and_nodes_before_the_trainer_exists(config, processes):
    from mtl.preflight import process_count
    assert process_count(config) == processes


def test_ddp_mistakes_found_from_the_config_stop_before_any_process_starts(tiny_dir, task_dir, tmp_path):
    args = ddp_args(tiny_dir, task_dir, tmp_path, "sampler", ["keyword"], "--trainer.use_distributed_sampler", "true")
    code, _, err = run_train(args, tmp_path)
    assert code == 2 and [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: trainer.use_distributed_sampler: true with 2 processes, expected false: mtl shards its batches by rank "
        "itself, and Lightning cannot wrap the task batch sampler (train.py sets false)"]
    assert not (tmp_path / "sampler").exists() and not (tmp_path / "sampler-lightning").exists()
