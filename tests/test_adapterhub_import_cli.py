"""train.py import-adapterhub --num_labels: a folder without a head mtl can load gets a fresh one, as in Python."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mtl.interop.adapterhub import load_adapterhub
from mtl.interop.adapterhub_cli import import_main
from mtl.model import MTLModel
from tests.test_adapterhub_format import ah_dir  # noqa: F401 (AdapterHub folders a0, a1 and a fusion, tiny backbone)
from tests.test_hardening import error_line, run_cli


def headless(ah_dir, root, part="adapters/a0"):
    """A copy of an AdapterHub folder as save_adapter(..., with_head=False) (or the fusion's) writes it."""
    folder = root / f"{part.replace('/', '-')}-headless"
    shutil.copytree(ah_dir["root"] / part, folder)
    for file in ("head_config.json", "model_head.safetensors"):
        (folder / file).unlink()
    return folder


@pytest.mark.parametrize("part, kind", [("adapters/a0", "adapter"), ("fusion", "fusion")])
def test_a_headless_folder_without_num_labels_says_to_pass_it(ah_dir, tiny_dir, tmp_path, capsys, part, kind):
    folder, run = headless(ah_dir, tmp_path, part), tmp_path / "run"
    adapters = [str(ah_dir["root"] / "adapters")] if kind == "fusion" else []  # a fusion needs its adapters
    code, lines = run_cli(["import-adapterhub", *adapters, str(folder), "--backbone", str(tiny_dir), "--run_dir",
                           str(run)], capsys)
    assert code == 2 and lines == [
        f"error: {folder}: no head_config.json (saved without its head); pass --num_labels N to import the {kind} "
        "with a fresh, untrained N-label classification head"]
    assert "with_head" not in lines[0]  # re-saving cannot help when only the headless folder exists
    assert not run.exists()


def test_a_head_mtl_cannot_hold_without_num_labels_says_to_pass_it(ah_dir, tiny_dir, tmp_path, capsys):
    folder = tmp_path / "pooler"
    shutil.copytree(ah_dir["root"] / "adapters" / "a0", folder)
    head = json.loads((folder / "head_config.json").read_text())
    (folder / "head_config.json").write_text(json.dumps({**head, "config": {**head["config"], "use_pooler": True}}))
    code, lines = run_cli(["import-adapterhub", str(folder), "--backbone", str(tiny_dir), "--run_dir",
                           str(tmp_path / "run")], capsys)
    assert code == 2 and error_line(lines) == (
        f"error: {folder / 'head_config.json'}: config.use_pooler is True; mtl's head is AdapterHub's "
        "(multilabel_)classification or multiple_choice head with layers 2, tanh, use_pooler false and bias true; pass --num_labels N to "
        "import the adapter with a fresh, untrained N-label classification head")


def test_num_labels_imports_a_headless_folder_with_a_fresh_head_that_fit_then_trains(ah_dir, tiny_dir, task_dir,
                                                                                        tmp_path, capsys):
    folder, run = headless(ah_dir, tmp_path), tmp_path / "run"
    capsys.readouterr()
    assert import_main([str(folder), "--backbone", str(tiny_dir), "--run_dir", str(run), "--task", "keyword",
                        "--num_labels", "2"]) == ["keyword"]
    printed = capsys.readouterr()
    assert printed.err == (f"warning: {folder}: no head_config.json; importing the adapter with a fresh 2-label "
                           "classification head\n")
    # the same task as the Python call with num_labels: the adapter bit for bit, a fresh 2-label head
    python = MTLModel(str(tiny_dir))
    load_adapterhub(python, folder, "keyword", num_labels=2)
    imported = MTLModel.from_pretrained(run)
    assert imported.tasks == ["keyword"] and imported.heads["keyword"].num_outputs == 2
    assert imported.heads["keyword"].pooling == python.heads["keyword"].pooling == "cls"
    mine, theirs = imported.task_parameters("keyword"), python.task_parameters("keyword")
    assert mine.keys() == theirs.keys()
    adapter = [key for key in mine if key.startswith("adapters.")]
    assert adapter and all(torch.equal(mine[key], theirs[key]) for key in adapter)
    assert all(torch.equal(mine[key], ah_dir["model"].task_parameters("a0")[key]) for key in adapter)
    # the printed advice is a command that trains the fresh head
    advice = printed.out.splitlines()[-1]
    assert advice.startswith("the head of keyword is fresh and untrained; train first with: train.py fit ")
    command = advice.split("train.py ")[1].replace("DIR ...", str(task_dir)).split()
    code, lines = run_cli([*command, "--data.cache_dir", str(tmp_path / "cache"), "--data.max_train_examples", "16",
                           "--trainer.max_epochs", "1", "--trainer.logger", "false", "--trainer.enable_progress_bar",
                           "false", "--trainer.enable_model_summary", "false", "--trainer.default_root_dir",
                           str(tmp_path / "lightning")], capsys)
    assert code == 0, lines
    trained = MTLModel.from_pretrained(run).task_parameters("keyword")
    assert not torch.equal(trained["head.out.weight"], mine["head.out.weight"])


@pytest.mark.parametrize("value, expected", [
    ("2", "the head has 3 labels, but num_labels is 2"),  # a folder with its head: N must match it, as in Python
    ("0", "import-adapterhub: argument --num_labels: '0', expected a positive integer (the number of labels)"),
    ("two", "import-adapterhub: argument --num_labels: 'two', expected a positive integer (the number of labels)"),
])
def test_bad_num_labels_is_one_line_and_writes_nothing(ah_dir, tiny_dir, tmp_path, capsys, value, expected):
    run = tmp_path / "run"
    code, lines = run_cli(["import-adapterhub", str(ah_dir["root"] / "adapters" / "a0"), "--backbone", str(tiny_dir),
                           "--run_dir", str(run), "--num_labels", value], capsys)
    assert code == 2 and len(lines) == 1 and expected in lines[0], lines
    assert not run.exists()
