"""The task-kind layer (mtl.kinds): one table of kinds, each saying what its tasks read, predict, score and write;
a run with tasks of several kinds picks its checkpoint on val/avg/score, the mean of each task's headline metric."""

from __future__ import annotations

import math
import random
import shutil

import lightning as L
import pytest
import torch

from mtl.data.module import TaskDataModule
from mtl.data.spec import load_task_spec
from mtl.errors import MTLConfigError
from mtl.kinds import KINDS, PROBLEMS, kind_of
from mtl.lit import AdapterTrainer
from mtl.metrics import build_metrics
from mtl.serving.api import answer
from tests.conftest import WORDS


def test_every_kind_offers_its_defaults_and_a_headline_and_an_unknown_kind_is_one_line():
    assert PROBLEMS == ("classification", "multilabel", "regression", "token_classification", "extractive_qa",
                        "multiple_choice")
    assert list(KINDS) == list(PROBLEMS)
    for kind in KINDS.values():
        names = {"regression": ["y"], "token_classification": ["O", "B-X", "I-X"], "extractive_qa": []}.get(kind.name,
                                                                                                        ["a", "b"])
        defaults, headline = kind.metrics_for(names)
        assert set(defaults) <= set(kind.metric_names) and headline in defaults
        collection = build_metrics(kind.name, list(kind.metric_names), names, "val/t/")
        assert sorted(collection.keys()) == sorted(f"val/t/{m}" for m in kind.metric_names)
    with pytest.raises(MTLConfigError, match=r"^problem 'ranking' is unknown, expected one of \['classification'"):
        kind_of("ranking")


def test_each_kind_reads_labels_predicts_and_answers_as_computed_by_hand():
    cls, multi, reg = KINDS["classification"], KINDS["multilabel"], KINDS["regression"]
    names = ["neg", "neu", "pos"]
    assert [cls.read_label(v, names, "f") for v in ("pos", 1, 2.0)] == [2, 1, 2]
    assert multi.read_label(["pos", "neg"], names, "f") == [1.0, 0.0, 1.0] and reg.read_label("2.5", ["y"], "f") == 2.5
    with pytest.raises(MTLConfigError, match="^f: label 'bad' not in labels"):
        cls.read_label("bad", names, "f")
    logits = torch.tensor([[0.0, math.log(3.0), 0.0]])  # softmax: 0.2, 0.6, 0.2
    pred, score = cls.predict(logits)
    assert pred.tolist() == [1] and torch.allclose(score, torch.tensor([0.6]))
    assert cls.file_row(names, 1, 0.6) == {"label": "neu", "score": 0.6}
    served = answer("classification", names, logits[0])
    assert served["label"] == "neu" and math.isclose(served["score"], 0.6, rel_tol=1e-6)
    assert multi.predict(torch.tensor([[2.0, -2.0, 0.1]]))[0].tolist() == [[1, 0, 1]]
    assert answer("multilabel", names, torch.tensor([2.0, -2.0, 0.1]))["label"] == ["neg", "pos"]
    assert answer("regression", ["y"], torch.tensor([1.5])) == {"label": None, "score": 1.5, "scores": None}
    assert reg.head_outputs(["y"]) == 1 and cls.head_outputs(names) == 3
    # the loss is the kind's: cross-entropy by hand for one row
    assert torch.isclose(cls.loss(logits, torch.tensor([1])), -torch.log(torch.tensor(0.6)))
    # and so is the labels' dtype in a batch
    assert cls.label_dtype == torch.long and multi.label_dtype == reg.label_dtype == torch.float  # (test_data: batches)


@pytest.mark.parametrize("problem, labels, given, kept", [
    ("regression", "[y]", "[mse]", ["mse", "pearson"]),  # the headline is always computed
    ("multilabel", "[a, b]", "[f1]", ["f1", "acc"]),
    ("classification", "[a, b]", "[f1, acc]", ["f1", "acc"]),
])
def test_a_spec_always_computes_its_kinds_headline_metric(tmp_path, problem, labels, given, kept):
    (tmp_path / "t.yaml").write_text(f"source: {{type: files, train: t.csv}}\ntext_fields: [text]\nlabel_field: label\n"
                                     f"labels: {labels}\nproblem: {problem}\nmetrics: {given}\n")
    assert load_task_spec(tmp_path / "t.yaml").metrics == kept


def test_a_metric_the_kind_lacks_is_one_line_naming_the_file(tmp_path):
    (tmp_path / "t.yaml").write_text("source: {type: files, train: t.csv}\ntext_fields: [text]\nlabel_field: label\n"
                                     "labels: [y]\nproblem: regression\nmetrics: [acc]\n")
    with pytest.raises(MTLConfigError, match=r"t.yaml: metrics: got \['acc'\], expected some of \['mse', 'pearson'\]"):
        load_task_spec(tmp_path / "t.yaml")


@pytest.fixture
def mixed_dir(task_dir, tmp_path):
    """keyword (classification) beside 'count' (regression: how many times 'alpha' occurs, 0-2)."""
    folder = tmp_path / "tasks"
    shutil.copytree(task_dir, folder)
    rng = random.Random(3)
    lines = ["text,label"]
    for i in range(180):
        words = rng.sample([w for w in WORDS if w != "alpha"], 4) + ["alpha"] * (i % 3)
        rng.shuffle(words)
        lines.append(f"{' '.join(words)} {i},{i % 3}")
    (folder / "count.csv").write_text("\n".join(lines) + "\n")
    (folder / "count.yaml").write_text("source: {type: files, train: count.csv}\ntext_fields: [text]\n"
                                       "label_field: label\nlabels: [count]\nproblem: regression\nmax_length: 16\n")
    return folder


def test_a_mixed_kind_run_picks_its_checkpoint_on_the_mean_of_each_tasks_headline(tiny_dir, mixed_dir, tmp_path):
    module = AdapterTrainer(["keyword", "count"], backbone=str(tiny_dir), tasks_dir=str(mixed_dir),
                            run_dir=str(tmp_path / "run"), lr=5e-3, export=False)
    data = TaskDataModule(["keyword", "count"], backbone=str(tiny_dir), tasks_dir=str(mixed_dir), batch_size=16,
                          cache_dir=str(tmp_path / "cache"))
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/avg/score", mode="max")
    trainer = L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, callbacks=[checkpoint])
    trainer.fit(module, datamodule=data)
    m = trainer.callback_metrics
    assert torch.isclose(m["val/avg/score"], (m["val/keyword/acc"] + m["val/count/pearson"]) / 2)
    assert torch.isclose(m["val/avg/acc"], m["val/keyword/acc"]) and "val/count/mse" in m
    # the monitor existed in every validation (Lightning raises otherwise) and the best is at least the last
    assert checkpoint.best_model_path and float(checkpoint.best_model_score) >= float(m["val/avg/score"]) - 1e-6
    assert module.model.heads["count"].problem == "regression" and module.model.heads["count"].num_outputs == 1
