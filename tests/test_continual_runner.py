"""The task-sequence runner on a tiny backbone: strategies, the checked zero forgetting, resume after a real
SIGKILL, refused config changes on resume, and bad input (one line, exit 2, nothing written)."""

from __future__ import annotations

import json
import shutil
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtl import model_files
from mtl import storage
from mtl.data.module import TaskDataModule
from mtl.errors import MTLConfigError
from mtl.continual import strategies
from mtl.continual.strategies import EWC, Replay
from tests.conftest import keyword_task
from tests.test_hardening import error_line, run_cli, tree

ROOT = Path(__file__).resolve().parent.parent
ORDER = ["keyword", "colour", "animal"]


@pytest.fixture(scope="module")
def setup(tiny_dir, tmp_path_factory) -> Path:
    """A folder with three keyword tasks and the base config of a 3-task sequence on the tiny backbone."""
    root = tmp_path_factory.mktemp("continual")
    tasks = root / "tasks"
    tasks.mkdir()
    keyword_task(tasks, "keyword", ["bad", "good"])
    keyword_task(tasks, "colour", ["red", "blue", "pink"], rows=180, seed=1)
    keyword_task(tasks, "animal", ["cat", "dog"], rows=160, seed=2)
    (root / "base.yaml").write_text(f"""
seed_everything: 0
continual: {{order: [{', '.join(ORDER)}], strategy: per_task, run_dir: {root / 'run'}, tasks_dir: {tasks}}}
model: {{backbone: {tiny_dir}, lr: 3.0e-2, head_dropout: 0.0}}  # no dropout: the tests compare strategies' trainings step for step, which random masks would make differ
data: {{batch_size: 16, cache_dir: {root / 'cache'}}}
trainer:
  max_epochs: 2
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  limit_val_batches: 0
  callbacks: [{{class_path: tests.kill_switch.KillSwitch}}]
""")
    return root


def run(setup: Path, capsys, run_dir: Path, *extra: str) -> tuple[int, list[str]]:
    return run_cli(["continual", "--config", str(setup / "base.yaml"), "--continual.run_dir", str(run_dir), *extra],
                   capsys)


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def weights(run_dir: Path, step: str, task: str) -> bytes:
    return (run_dir / "steps" / step / "adapters" / task / storage.ADAPTER_WEIGHTS).read_bytes()


def tensors(run_dir: Path, step: str, task: str) -> dict:
    return storage.read_tensors(run_dir / "steps" / step / "adapters" / task / storage.ADAPTER_WEIGHTS)


@pytest.fixture(scope="module")
def per_task(setup, tmp_path_factory) -> Path:
    """One uninterrupted per_task run (the reference for the resume tests)."""
    run_dir = tmp_path_factory.mktemp("per_task") / "run"
    from mtl.cli import main
    main(["continual", "--config", str(setup / "base.yaml"), "--continual.run_dir", str(run_dir)])
    return run_dir


def test_per_task_forgets_nothing_and_says_verified(per_task):
    out = results(per_task)
    acc = out["scores"]["acc"]
    r, b = acc["after"], acc["before"]
    assert out["stages"] == [[t] for t in ORDER] and len(r) == 3 and all(len(row) == 3 for row in r)
    assert out["metrics"]["acc"]["bwt"] == 0.0 and out["metrics"]["f1"]["bwt"] == 0.0
    assert out["metrics"]["acc"]["forgetting"] == 0.0 and out["metrics"]["acc"]["forgetting_max"] == 0.0
    # a task not trained yet still has its fresh adapter and head: exactly its score before training
    assert all(r[i][j] == b[j] for i in range(3) for j in range(i + 1, 3))
    assert out["metrics"]["acc"]["fwt"] == 0.0
    assert r[2][0] > b[0]  # training did something
    assert out["zero_forgetting"]["verified"] is True
    assert set(out["zero_forgetting"]["tasks"]) == set(ORDER)
    assert "Zero forgetting: verified" in (per_task / "results.md").read_text()
    assert (per_task / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    # an earlier task's exported adapter and head are the same bytes after every later stage
    assert weights(per_task, "01-keyword", "keyword") == weights(per_task, "03-animal", "keyword")
    assert weights(per_task, "02-colour", "colour") == weights(per_task, "03-animal", "colour")
    assert weights(per_task, "00-before", "animal") == weights(per_task, "02-colour", "animal")
    assert weights(per_task, "00-before", "keyword") != weights(per_task, "01-keyword", "keyword")


def test_shared_trains_one_adapter_in_turn(setup, tmp_path, capsys):
    run_dir = tmp_path / "shared"
    code, lines = run(setup, capsys, run_dir, "--continual.strategy", "shared")
    assert code == 0, lines
    out = results(run_dir)
    adapter = [k for k in tensors(run_dir, "01-keyword", "keyword") if not k.startswith("head")]
    head = [k for k in tensors(run_dir, "01-keyword", "keyword") if k.startswith("head")]
    assert adapter and head
    first, last = tensors(run_dir, "01-keyword", "keyword"), tensors(run_dir, "03-animal", "keyword")
    assert all(first[k].equal(last[k]) for k in head)  # keyword's head is frozen after its stage
    assert not all(first[k].equal(last[k]) for k in adapter)  # the one adapter kept training
    # every task's folder holds the same shared adapter
    assert all(tensors(run_dir, "03-animal", t)[k].equal(last[k]) for t in ORDER for k in adapter)
    r = out["scores"]["acc"]["after"]
    assert out["metrics"]["acc"]["bwt"] == pytest.approx(sum(r[2][j] - r[j][j] for j in range(2)) / 2, abs=1e-12)
    assert out["zero_forgetting"] is None


def test_joint_is_one_stage_over_every_task(setup, tmp_path, capsys):
    run_dir = tmp_path / "joint"
    code, lines = run(setup, capsys, run_dir, "--continual.strategy", "joint")
    assert code == 0, lines
    out = results(run_dir)
    assert out["stages"] == [ORDER] and len(out["scores"]["acc"]["after"]) == 1
    assert set(out["metrics"]["acc"]) == {"acc", "acc_weighted"}
    final = out["scores"]["acc"]["after"][0]
    assert out["metrics"]["acc"]["acc"] == pytest.approx(sum(final) / 3)
    assert all(weights(run_dir, "00-before", t) != weights(run_dir, "01-joint", t) for t in ORDER)


def test_fusion_answers_later_tasks_through_a_fusion_and_forgets_nothing(setup, per_task, tmp_path, capsys):
    run_dir = tmp_path / "fusion"
    code, lines = run(setup, capsys, run_dir, "--continual.strategy", "fusion")
    assert code == 0, lines
    out, reference = results(run_dir), results(per_task)
    assert out["routes"] == {"colour": "colour_fusion", "animal": "animal_fusion"}
    r, alone = out["scores"]["acc"]["after"], out["single_task"]
    # each stage first trains the task's own adapter exactly as per_task does: the same single-task score
    assert {t: alone[t]["acc"] for t in ("colour", "animal")} == {
        t: reference["scores"]["acc"]["after"][j][j] for j, t in enumerate(ORDER) if t != "keyword"}
    assert r[0][0] == reference["scores"]["acc"]["after"][0][0]  # the first task has nothing to fuse
    assert out["metrics"]["acc"]["bwt"] == 0.0 and out["metrics"]["acc"]["forgetting"] == 0.0
    checked = out["zero_forgetting"]
    assert checked["verified"] is True and set(checked["tasks"]) == {*ORDER, "colour_fusion", "animal_fusion"}
    final = run_dir / "steps" / "03-animal"
    fusion = json.loads((final / "fusions" / "animal_fusion" / storage.FUSION_CONFIG).read_text())
    assert [a["name"] for a in fusion["adapters"]] == ORDER
    assert (final / "fusions" / "colour_fusion").is_dir() and not (run_dir / "steps" / "03-animal-adapter").exists()
    # an earlier fusion is the same bytes after later stages; own adapters equal per_task's
    weights_file = storage.FUSION_WEIGHTS
    assert ((run_dir / "steps/02-colour/fusions/colour_fusion" / weights_file).read_bytes()
            == (final / "fusions/colour_fusion" / weights_file).read_bytes())
    assert all(weights(run_dir, "03-animal", t) == weights(per_task, "03-animal", t) for t in ORDER)
    assert out["routing"] == {} and "Single-task transfer" in (run_dir / "results.md").read_text()


@pytest.mark.parametrize("strategy, kill_at, done", [("per_task", "02-colour:train:3", 1), ("per_task", "03-animal:test:0", 2),
                                                     ("replay", "03-animal:train:2", 2), ("ewc", "03-animal:train:2", 2),
                                                     ("fusion", "03-animal-fusion:train:2", 2)])
def test_resume_after_sigkill_gives_the_same_run(setup, per_task, tmp_path, capsys, strategy, kill_at, done):
    if strategy == "per_task":
        reference = per_task
    else:  # an uninterrupted run of the same strategy
        reference = tmp_path / "reference"
        assert run(setup, capsys, reference, "--continual.strategy", strategy, "--continual.replay_size", "40")[0] == 0
    run_dir = tmp_path / "run"
    command = [sys.executable, "train.py", "continual", "--config", str(setup / "base.yaml"),
               "--continual.run_dir", str(run_dir), "--continual.strategy", strategy, "--continual.replay_size", "40"]
    killed = subprocess.run(command, cwd=ROOT, env={**os.environ, "MTL_TEST_KILL_AT": kill_at},
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    state = json.loads((run_dir / "state.json").read_text())
    assert state["completed"] == done and not (run_dir / "results.json").exists()
    resumed = subprocess.run(command, cwd=ROOT, env={k: v for k, v in os.environ.items() if k != "MTL_TEST_KILL_AT"},
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming after stage {done}/3" in resumed.stdout
    want, got = results(reference), results(run_dir)
    assert got["scores"] == want["scores"]  # R, b, for accuracy and macro-F1: exactly
    assert got["zero_forgetting"] == want["zero_forgetting"]
    assert got["stored_bytes"] == want["stored_bytes"]
    for task in ORDER:
        assert weights(run_dir, "03-animal", task) == weights(reference, "03-animal", task)
    if strategy == "fusion":  # the killed fusion fit left its own-adapter folder; the rerun replaced, then removed it
        assert got["single_task"] == want["single_task"] and not (run_dir / "steps" / "03-animal-adapter").exists()
        fusion = "steps/03-animal/fusions/animal_fusion/" + storage.FUSION_WEIGHTS
        assert (run_dir / fusion).read_bytes() == (reference / fusion).read_bytes()
    if strategy == "ewc":  # the Fisher and anchor of the resumed stage come from the same files
        ewc = "steps/03-animal/ewc.safetensors"
        assert (run_dir / ewc).read_bytes() == (reference / ewc).read_bytes()


@pytest.mark.parametrize("change, key", [
    (["--continual.order", "[colour, keyword, animal]"], "continual.order"),
    (["--continual.strategy", "shared"], "continual.strategy"),
    (["--model.lr", "0.5"], "model.lr"),
])
def test_a_changed_config_on_resume_is_one_line(setup, per_task, capsys, change, key):
    before = tree(per_task)
    code, lines = run(setup, capsys, per_task, *change)
    assert code == 2 and len(lines) == 1
    assert "state.json" in error_line(lines) and key in error_line(lines)
    assert tree(per_task) == before


def test_a_changed_task_spec_on_resume_is_one_line(setup, tiny_dir, tmp_path, capsys):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, labels, rows, seed in (("keyword", ["bad", "good"], 240, 0), ("colour", ["red", "blue", "pink"], 180, 1)):
        keyword_task(tasks, name, labels, rows=rows, seed=seed)
    args = ["--continual.order", "[keyword, colour]", "--continual.tasks_dir", str(tasks)]
    assert run(setup, capsys, tmp_path / "run", *args)[0] == 0
    spec = tasks / "colour.yaml"
    spec.write_text(spec.read_text().replace("max_length: 16", "max_length: 12"))
    before = tree(tmp_path / "run")
    code, lines = run(setup, capsys, tmp_path / "run", *args)
    assert code == 2 and len(lines) == 1 and "tasks.colour.max_length" in error_line(lines)
    assert tree(tmp_path / "run") == before


@pytest.mark.parametrize("args, expected", [
    (["--continual.order", "[]"], "continual.order: [] has 0 task(s), expected at least 2"),
    (["--continual.order", "[keyword]"], "continual.order: ['keyword'] has 1 task(s), expected at least 2"),
    (["--continual.order", "[keyword, colour, keyword]"], "continual.order: task 'keyword' given twice"),
    (["--continual.strategy", "ewc_typo"],
     "continual.strategy: 'ewc_typo', expected one of per_task, shared, replay, ewc, fusion, joint"),
    (["--continual.strategy", "fusion", "--continual.order", "[keyword]"],
     "continual.order: ['keyword'] has 1 task(s), expected at least 2"),
    (["--continual.fusion", "{type: wide}"], "continual.fusion.type: 'wide' is not a preset"),
    (["--continual.fusion", "{type: dynamic, heads: 2}"], "continual.fusion: unknown fusion keys ['heads']"),
    (["--continual.order", "[keyword, nosuch]"], "task 'nosuch' not found"),
    (["--continual.probe_size", "0"], "continual.probe_size: got 0"),
    (["--continual.replay_size", "-5"], "continual.replay_size: got -5, expected an int >= 1"),
    (["--continual.replay_ratio", "1.0"], "continual.replay_ratio: got 1.0, expected a fraction in [0, 1)"),
    (["--continual.ewc_lambda", "-1"], "continual.ewc_lambda: got -1.0, expected a number >= 0"),
    (["--continual.routers", "[knn]"], "continual.routers: ['knn'], expected distinct names among ['prototype', 'entropy']"),
    (["--continual.ordr", "[a, b]"], "--continual.ordr: unknown option, did you mean '--continual.order'?"),
    (["--model.load_from", "run"], "--model.load_from: set by the continual runner for each stage"),
    (["--data.tasks", "[keyword]"], "--data.tasks: set by the continual runner for each stage"),
    (["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"],
     "trainer.strategy: ddp (with trainer.devices 2): train.py continual runs in one process"),
    (["--trainer.strategy", "ddp_spawn", "--trainer.devices", "1", "--trainer.accelerator", "cpu"],
     "trainer.strategy: ddp_spawn (with trainer.devices 1): train.py continual runs in one process"),
    (["--trainer.devices", "2", "--trainer.accelerator", "cpu"], "trainer.devices: 2 would start 2 processes"),
    (["--trainer.num_nodes", "2", "--trainer.accelerator", "cpu"], "trainer.num_nodes: 2 (x trainer.devices auto)"),
])
def test_bad_input_is_one_line_and_writes_nothing(setup, tmp_path, capsys, args, expected):
    code, lines = run(setup, capsys, tmp_path / "run", *args)
    assert code == 2 and len(lines) == 1 and expected in error_line(lines), lines
    assert not (tmp_path / "run").exists()


def test_a_run_folder_with_other_files_is_refused(setup, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    code, lines = run(setup, capsys, tmp_path / "run")
    assert code == 2 and "holds files but no state.json" in error_line(lines)
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["notes.txt"]


def test_compare_puts_runs_side_by_side(setup, per_task, tmp_path, capsys):
    code, _ = run(setup, capsys, tmp_path / "joint", "--continual.strategy", "joint")
    assert code == 0
    code, lines = run_cli(["compare", str(per_task), str(tmp_path / "joint"), "--output", str(tmp_path / "cmp")],
                          capsys)
    assert code == 0, lines
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == ["comparison.md", "comparison.png"]
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "per_task" in table and "joint" in table


def test_continue_training_keeps_training_a_loaded_task(tiny_dir, task_dir, tmp_path):
    from mtl.lit import AdapterTrainer
    from mtl.model import MTLModel

    model = MTLModel(str(tiny_dir))
    model.add_task("keyword", 2)
    model.add_task("colour", 3)
    with torch.no_grad():
        for p in model.task_parameters("keyword").values():
            p.add_(0.5)
    for task in ("keyword", "colour"):
        model_files.save_task(model, task, tmp_path / "run" / "adapters")
    args = dict(tasks=["keyword"], backbone=str(tiny_dir), tasks_dir=str(task_dir), load_from=str(tmp_path / "run"),
                eval_tasks=["colour"], export=False)
    with pytest.raises(MTLConfigError, match="already trained"):
        AdapterTrainer(**args)
    module = AdapterTrainer(**args, continue_training=True)
    assert module.model.trainable_tasks() == ["keyword"]  # colour is loaded frozen
    assert module.model.is_frozen("colour") and not module.model.is_frozen("keyword")
    loaded = module.model.task_parameters("keyword")
    assert all(p.requires_grad and p.equal(model.task_parameters("keyword")[k]) for k, p in loaded.items())


def test_extra_loss_is_added_to_the_training_loss(tiny_dir, task_dir, tmp_path):
    from mtl.lit import AdapterTrainer

    module = AdapterTrainer(tasks=["keyword"], backbone=str(tiny_dir), tasks_dir=str(task_dir), export=False)
    module.log = lambda *a, **k: None  # no Trainer attached
    data = TaskDataModule(tasks=["keyword"], backbone=str(tiny_dir), tasks_dir=str(task_dir), cache_dir=str(tmp_path))
    batch = data.first_examples("keyword", "train", 8)
    module.eval()  # no dropout: both losses see the same forward
    plain = module.training_step(batch, 0)
    module.extra_loss = lambda m, b: torch.tensor(2.5) * len(b["labels"])
    assert module.training_step(batch, 0).item() == pytest.approx(plain.item() + 20.0)


def test_a_runner_key_in_the_yaml_is_one_line(setup, tmp_path, capsys):
    extra = tmp_path / "extra.yaml"
    extra.write_text("model:\n  load_from: somewhere\n")
    code, lines = run(setup, capsys, tmp_path / "run", "--config", str(extra))
    assert code == 2 and len(lines) == 1
    assert error_line(lines) == (f"error: {extra}: model.load_from: set by the continual runner for each stage, not in "
                                 "a continual config (the tasks come from continual.order)")


def test_an_unknown_command_names_every_command(capsys):
    code, lines = run_cli(["contnual"], capsys)
    assert code == 2 and lines == ["error: contnual: unknown command, expected one of fit, validate, test, predict, "
                                   "continual, compare, import-adapterhub, serve; did you mean 'continual'?"]


def test_replay_mixes_the_buffer_in_with_the_ratio():
    replay = Replay(size=10, ratio=0.25, seed=0)
    replay.state["buffer"] = [["a", 2], ["a", 1], ["b", 5]]
    assert replay.stage_data(["c"]) == {"tasks": ["c", "a", "b"], "train_subsets": {"a": [1, 2], "b": [5]},
                                        "task_weights": {"c": 0.75, "a": 0.25 * 2 / 3, "b": 0.25 / 3}}
    assert Replay(size=10, ratio=0.25, seed=0).stage_data(["a"]) == {}  # nothing to replay yet


class FakeData:
    """Just the train split sizes and the task kinds that the reservoir reads (``choices``: tasks of 3-choice
    questions, 3 rows each)."""

    def __init__(self, sizes: dict[str, int], choices: tuple[str, ...] = ()) -> None:
        self.task_datasets = {t: {"train": list(range(n))} for t, n in sizes.items()}
        self.choices = choices

    def rows_per_example(self, task: str) -> int:
        return 3 if task in self.choices else 1


def test_replay_keeps_whole_questions_of_a_choice_task_by_their_first_row():
    replay = Replay(size=100, ratio=0.2, seed=0)
    replay.after_task(0, ["mc"], None, FakeData({"mc": 30}, choices=("mc",)))
    assert replay.state == {"buffer": [["mc", row] for row in range(0, 30, 3)], "seen": 10}
    # the data module reads each kept row as its whole question: 3 rows, in order
    assert replay.stage_data(["next"])["train_subsets"] == {"mc": list(range(0, 30, 3))}


def test_replay_buffer_is_a_seeded_reservoir():
    data = FakeData({"a": 30, "b": 20})
    everything = Replay(size=100, ratio=0.2, seed=0)
    for task in ("a", "b"):
        everything.after_task(0, [task], None, data)
    assert everything.state == {"buffer": [["a", i] for i in range(30)] + [["b", i] for i in range(20)], "seen": 50}
    small, again = Replay(size=10, ratio=0.2, seed=0), Replay(size=10, ratio=0.2, seed=0)
    for replay in (small, again):
        for task in ("a", "b"):
            replay.after_task(0, [task], None, data)
    assert small.state == again.state and small.state["seen"] == 50 and len(small.state["buffer"]) == 10
    assert len({tuple(x) for x in small.state["buffer"]}) == 10
    assert {t for t, _ in small.state["buffer"]} <= {"a", "b"}


class FakeModule:
    """A module whose shared adapter is one parameter vector."""

    def __init__(self, values: list[float]) -> None:
        self.w = torch.nn.Parameter(torch.tensor(values))
        self.model = self

    def part_parameters(self, part):
        assert part == ("adapter", "shared")
        return {"w": self.w}


def test_ewc_penalty_and_online_fisher_by_hand(monkeypatch):
    ewc = EWC(lam=2.0, gamma=0.5)
    module = FakeModule([1.0, 2.0])
    assert ewc.extra_loss(module, {}) is None  # no finished task yet
    ewc.fisher, ewc.anchor = {"w": torch.tensor([0.5, 2.0])}, {"w": torch.tensor([0.0, 1.0])}
    # (2 / 2) * (0.5 * 1^2 + 2 * 1^2)
    assert ewc.extra_loss(module, {}).item() == pytest.approx(2.5)
    monkeypatch.setattr(strategies, "diagonal_fisher", lambda m, b, p: {"w": torch.tensor([1.0, 1.0])})
    ewc.after_task(1, ["b"], module, type("D", (), {"train_dataloader": lambda self: []})())
    assert torch.equal(ewc.fisher["w"], torch.tensor([1.25, 2.0]))  # 0.5 * F + F_new
    assert torch.equal(ewc.anchor["w"], torch.tensor([1.0, 2.0]))  # the weights after the task


def test_an_ewc_file_with_nan_is_refused_naming_the_file_and_tensor(tmp_path):
    from safetensors.torch import save_file

    fisher = torch.ones(4)
    fisher[2] = float("nan")
    save_file({"fisher.w": fisher, "anchor.w": torch.zeros(4)}, str(tmp_path / EWC.FILE))
    with pytest.raises(MTLConfigError) as err:
        EWC(lam=1.0, gamma=1.0).load(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / EWC.FILE}: tensor fisher.w holds 1 non-finite value(s) (NaN)")


def test_ewc_fisher_is_exported_with_each_stage(setup, tmp_path, capsys):
    run_dir = tmp_path / "ewc"
    assert run(setup, capsys, run_dir, "--continual.strategy", "ewc")[0] == 0
    assert not (run_dir / "steps" / "00-before" / "ewc.safetensors").exists()
    first = storage.read_tensors(run_dir / "steps" / "01-keyword" / "ewc.safetensors")
    anchors = {k[len("anchor."):]: v for k, v in first.items() if k.startswith("anchor.")}
    adapter = tensors(run_dir, "01-keyword", "keyword")
    assert anchors and all(torch.equal(adapter[k], v) for k, v in anchors.items())  # theta* = the exported adapter
    fisher = [v for k, v in first.items() if k.startswith("fisher.")]
    # squared gradients: never negative; zero only where no gradient reaches (a 2-unit bottleneck's dead ReLU)
    assert len(fisher) == len(anchors) and all((v >= 0).all() for v in fisher) and sum(v.sum() for v in fisher) > 0
    out = results(run_dir)
    assert out["stored_bytes"]["fisher_and_anchor"] == sum(v.numel() * 4 for v in first.values())


def test_the_prototype_router_grows_with_the_stages_and_is_reported(setup, tmp_path, capsys):
    run_dir = tmp_path / "routed"
    assert run(setup, capsys, run_dir, "--continual.routers", "[prototype, entropy]")[0] == 0
    from mtl.routing import load_router
    assert load_router(run_dir / "steps" / "01-keyword" / "router").tasks == ["keyword"]
    assert load_router(run_dir / "steps" / "03-animal" / "router").tasks == ORDER
    out = results(run_dir)
    sizes = dict(zip(out["order"], out["test_sizes"]))
    for kind in ("prototype", "entropy"):
        report = out["routing"][kind]
        assert [sum(row) for row in report["confusion"]] == [sizes[t] for t in report["tasks"]]
        given = report["overall"]["task_given_accuracy"]
        # task-given accuracy is R's last row, weighted by test size
        assert given == pytest.approx(out["metrics"]["acc"]["acc_weighted"])
        assert report["overall"]["routed_accuracy"] <= given + 1e-12
        assert (run_dir / f"routing-{kind}.png").read_bytes()[:4] == b"\x89PNG"
    # the keyword tasks have disjoint label words: their prototypes tell them apart
    assert out["routing"]["prototype"]["overall"]["routing_accuracy"] == 1.0
    assert "## Routing without a task id: prototype router" in (run_dir / "results.md").read_text()


def predict_args(tiny_dir, setup, step: Path, out: Path, *extra: str) -> list[str]:
    texts = out.parent / "texts.txt"
    texts.write_text("good alpha beta river\nbeta red gamma stone\ncat seven table cloud\n")
    return ["predict", "--model.backbone", str(tiny_dir), "--model.load_from", str(step), "--model.run_dir", str(step),
            "--data.tasks", "[]", "--data.predict_file", str(texts), "--data.cache_dir", str(setup / "cache"),
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(out.parent), "--trainer.callbacks+=mtl.predict.PredictionWriter",
            f"--trainer.callbacks.output={out}", *extra]


def test_predict_without_a_task_id_uses_the_router(setup, per_task, tiny_dir, tmp_path, capsys):
    from mtl.model import MTLModel
    from mtl.routing import load_router

    step = per_task / "steps" / "03-animal"
    out = tmp_path / "routed.jsonl"
    # auto: the router saved with the stage the model is loaded from
    code, lines = run_cli(predict_args(tiny_dir, setup, step, out, "--model.router", "auto"), capsys)
    assert code == 0, lines
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]  # one row per text, not one per task
    # the same answers as the router from Python, without Lightning
    model = MTLModel.from_pretrained(step).eval()
    data = TaskDataModule(tasks=[], backbone=str(tiny_dir), predict_file=str(tmp_path / "texts.txt"),
                          cache_dir=str(setup / "cache"))
    batch = next(iter(data.predict_dataloader()[0]))
    want = load_router(step / "router").predict(model, batch["input_ids"], batch["attention_mask"])
    labels = {t: model.records[t].labels for t in model.tasks}
    assert [(r["task"], r["label"]) for r in rows] == [(t, labels[t][i]) for t, i in want]


@pytest.mark.parametrize("router, expected", [
    ("nowhere", "model.router: nowhere: no router.json there, expected 'entropy' or a saved router folder"),
    ("EARLY", "routes to ['colour', 'animal'], which the model does not have"),  # a router ahead of the model
    ("auto", "model.router: auto: the model has no router"),  # 00-before: no task trained, no router saved
])
def test_a_router_that_cannot_serve_the_model_is_one_line(setup, per_task, tiny_dir, tmp_path, capsys, router,
                                                          expected):
    step = per_task / "steps" / ("00-before" if router == "auto" else "01-keyword")
    if router == "EARLY":  # the final router knows every task; load only keyword's adapter beside it
        (tmp_path / "one" / "adapters").mkdir(parents=True)
        shutil.copytree(step / "adapters" / "keyword", tmp_path / "one" / "adapters" / "keyword")
        step, router = tmp_path / "one", str(per_task / "steps" / "03-animal" / "router")
    code, lines = run_cli(predict_args(tiny_dir, setup, step, tmp_path / "out.jsonl", "--model.router", router), capsys)
    assert code == 2 and len(lines) <= 2 and expected in error_line(lines), lines
    assert not (tmp_path / "out.jsonl").exists()


def _edit_state(**changes):
    """A state.json edit: key -> new value, or a function of the state that edits it in place."""
    def edit(state, run_dir):
        for key, value in changes.items():
            if callable(value):
                value(state, run_dir)
            else:
                state[key] = value
    return edit


def _link_stage_outside(state, run_dir):
    outside = run_dir.parent / "outside"
    shutil.move(run_dir / "steps" / "02-colour", outside)
    (run_dir / "steps" / "02-colour").symlink_to(outside)


@pytest.mark.parametrize("edit, words", [
    (_edit_state(completed=99), "completed: got 99, expected a stage count in 0..3"),
    (_edit_state(completed="3"), "completed: got '3', expected an integer"),
    (_edit_state(completed=2), "steps: got ['steps/00-before', "),
    (_edit_state(x=lambda s, r: s["steps"].__setitem__(1, "../../elsewhere")),
     "steps[1]: got '../../elsewhere', expected 'steps/01-keyword' inside"),
    (_edit_state(x=lambda s, r: s["steps"].__setitem__(2, "/etc")), "steps[2]: got '/etc', expected 'steps/02-colour'"),
    (_edit_state(x=_link_stage_outside), "steps[2]: got 'steps/02-colour', expected 'steps/02-colour' inside"),
    (_edit_state(x=lambda s, r: shutil.rmtree(r / "steps" / "03-animal" / "adapters")),
     "steps[3]: got 'steps/03-animal', expected a stage folder holding adapters/"),
    (_edit_state(order=["animal", "colour", "keyword"]), "order: got ['animal', 'colour', 'keyword'], expected"),
    (_edit_state(x=lambda s, r: s["after"]["acc"][1].pop()), "after.acc: got ["),
    (_edit_state(x=lambda s, r: s["before"]["f1"].__setitem__(0, 7)), "before.f1: got ["),
    (_edit_state(x=lambda s, r: s["strategy_state"]["fingerprints"].pop("colour")),
     "strategy_state.fingerprints: got ['animal', 'keyword'], expected one entry per trained task"),
    (_edit_state(x=lambda s, r: s["strategy_state"]["fingerprints"]["keyword"].update(tensors_sha256="abc")),
     "strategy_state.fingerprints.keyword: got {"),
    (_edit_state(x=lambda s, r: s["strategy_state"]["fingerprints"]["keyword"].update(stage=2)),
     "strategy_state.fingerprints.keyword: got {"),
    (_edit_state(x=lambda s, r: s["test_sizes"].__setitem__(0, s["test_sizes"][0] + 1)), "test_sizes: got ["),
    (_edit_state(wall_time_s={"before": 1.0, "stages": [1.0]}), "wall_time_s: got {"),
], ids=["completed-too-big", "completed-a-string", "completed-disagrees-with-steps", "step-path-escapes",
        "step-path-absolute", "step-folder-is-a-link-out", "step-without-adapters", "order", "after-row-short",
        "before-score-out-of-range", "fingerprint-missing", "fingerprint-not-a-digest", "fingerprint-stage",
        "test-sizes", "wall-times"])
def test_a_state_json_that_disagrees_with_its_run_is_one_line_before_any_work(setup, per_task, tmp_path, capsys,
                                                                             edit, words):
    run_dir = tmp_path / "run"
    shutil.copytree(per_task, run_dir, symlinks=True)
    file = run_dir / "state.json"
    state = json.loads(file.read_text())
    edit(state, run_dir)
    file.write_text(json.dumps(state))
    before = tree(tmp_path)
    code, lines = run(setup, capsys, run_dir)
    assert code == 2 and len(lines) == 1, lines
    assert error_line(lines).startswith(f"error: {file}: ") and words in error_line(lines), lines
    assert tree(tmp_path) == before


def _replay_runner(tmp_path, done: int = 1):
    from mtl.continual.runner import ContinualConfig, ContinualRunner

    config = ContinualConfig(order=ORDER, strategy="replay", run_dir=str(tmp_path / "run"), replay_size=4)
    runner = ContinualRunner(config, {}, {}, lambda name: None, {})
    runner.strategy = strategies.build_strategy(config, 0)
    runner.stages = runner.strategy.stages(ORDER)
    for name in ["00-before", *(runner._stage_name(i) for i in range(done))]:
        (tmp_path / "run" / "steps" / name / "adapters").mkdir(parents=True)
    state = runner._new_state()
    state.update(completed=done, steps=["steps/00-before", *(f"steps/{runner._stage_name(i)}" for i in range(done))],
                 after={m: [[0.5] * 3] * done for m in ("score", "acc", "f1")},
                 before={m: [0.5] * 3 for m in ("score", "acc", "f1")},
                 test_sizes=[10, 10, 10], wall_time_s={"before": 1.0, "stages": [1.0] * done},
                 strategy_state={"buffer": [["keyword", 0], ["keyword", 3]], "seen": 40})
    return runner, state


@pytest.mark.parametrize("buffer, seen, words", [
    ([["keyword", 0], ["keyword", 3]], 40, None),
    ([["colour", 0]], 40, "strategy_state.buffer[0]: got ['colour', 0], expected [task, row] with a trained task"),
    ([["keyword", -1]], 40, "strategy_state.buffer[0]: got ['keyword', -1]"),
    ([["keyword", 1]] * 5, 40, "strategy_state.buffer: got [['keyword', 1], "),
    ([[["keyword"], 1]], 40, "strategy_state.buffer[0]: got [['keyword'], 1]"),
    ({"keyword": 1}, 40, "strategy_state.buffer: got {'keyword': 1}, expected a list of at most 4 examples"),
    ([["keyword", 1]] * 2, 1, "strategy_state.seen: got 1"),
    ([["keyword", 12]], 40, "strategy_state.buffer[0]: row 12 of keyword, expected a row of its train split (0..11)"),
])
def test_a_replay_buffer_in_state_json_is_checked_against_the_run(tmp_path, buffer, seen, words):
    runner, state = _replay_runner(tmp_path)
    state["strategy_state"] = {"buffer": buffer, "seen": seen}
    file = tmp_path / "run" / "state.json"
    data = type("Data", (), {"split_size": lambda self, task, split: 10 if split == "test" else 12})()
    if words is None:
        runner._check_state(file, state)
        runner._check_state_data(state, data)
        return
    with pytest.raises(MTLConfigError) as err:
        runner._check_state(file, state)
        runner._check_state_data(state, data)
    assert str(err.value).startswith(f"{file}: ") and words in str(err.value) and "\n" not in str(err.value)


def _nudge(file: Path) -> None:
    """Change one weight of a saved adapter a little (still finite, still a valid file)."""
    from safetensors.torch import load_file, save_file

    values = load_file(str(file))
    # an up-projection bias reaches the output whatever the ReLUs do (a down-projection entry may feed a dead unit)
    name = sorted(k for k in values if k.endswith("up.bias"))[0]
    values[name].view(-1)[0] += 0.5
    save_file(values, str(file))


def test_a_finished_run_whose_final_stage_changed_is_one_line_naming_task_file_and_fingerprints(setup, per_task,
                                                                                                 tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(per_task, run_dir)
    file = run_dir / "steps" / "03-animal" / "adapters" / "keyword" / storage.ADAPTER_WEIGHTS
    _nudge(file)
    before = tree(tmp_path)
    code, lines = run(setup, capsys, run_dir)
    assert code == 2 and not any("Traceback" in line for line in lines), lines
    line = error_line(lines)
    assert line.startswith(f"error: {file}: task keyword changed after it was trained at stage 01-keyword "
                           "(tensors_sha256 "), line
    assert "probe_logits_sha256" in line and "when trained" in line and "now" in line
    assert f"restore {run_dir / 'steps' / '03-animal'} as this run wrote it, or start again in a new " \
           "continual.run_dir" in line
    assert tree(tmp_path) == before  # results.json and the report are not rewritten


def test_a_resumed_run_whose_last_stage_changed_is_refused_before_training(setup, per_task, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(per_task, run_dir)
    shutil.rmtree(run_dir / "steps" / "03-animal")
    (run_dir / "results.json").unlink()
    state = json.loads((run_dir / "state.json").read_text())  # as the run left it after stage 2 of 3
    state.update(completed=2, steps=state["steps"][:3], after={m: rows[:2] for m, rows in state["after"].items()},
                 wall_time_s={"before": state["wall_time_s"]["before"], "stages": state["wall_time_s"]["stages"][:2]})
    state["strategy_state"]["fingerprints"].pop("animal")
    (run_dir / "state.json").write_text(json.dumps(state))
    file = run_dir / "steps" / "02-colour" / "adapters" / "keyword" / storage.ADAPTER_WEIGHTS
    _nudge(file)
    before = tree(tmp_path)
    code, lines = run(setup, capsys, run_dir)
    assert code == 2 and error_line(lines).startswith(
        f"error: {file}: task keyword changed after it was trained at stage 01-keyword (tensors_sha256 "), lines
    assert tree(tmp_path) == before  # no stage 3 folder, no log folder
