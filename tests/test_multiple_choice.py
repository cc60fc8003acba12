"""Multiple choice: reading choices and labels, one row per choice kept together in every batch, the loss over an
example's choices, training beside a classifier, predictions on a split and from a file."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch

from mtl.backbone import load_tokenizer
from mtl.data.module import TaskDataModule
from mtl.data.sampling import TaskBatchSampler
from mtl.data.sources import load_task_dataset
from mtl.data.spec import load_task_spec
from mtl.errors import MTLConfigError
from mtl.kinds import kind_of
from mtl.kinds.base import read_example
from mtl.kinds.multiple_choice import choose, per_example
from mtl.lit import AdapterTrainer

SPEC = ("source: {type: files, train: rows.jsonl}\ntext_fields: [context, question, choices]\nlabel_field: label\n"
        "labels: [A, B, C]\nproblem: multiple_choice\nsplit: {validation: 0.2, test: 0.2}\n")


def _rows(tmp_path, rows: list[dict]) -> None:
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "mc.yaml").write_text(SPEC)


def test_a_label_is_an_index_a_position_name_or_the_right_choices_text(tmp_path):
    base = {"context": "a red stone", "question": "which colour?", "choices": ["blue", "red", "pink"]}
    _rows(tmp_path, [{**base, "label": label, "context": f"{base['context']} {i}"}
                     for i, label in enumerate([1, "B", "red", 1.0, " red "] * 4)])
    data = load_task_dataset(load_task_spec(tmp_path / "mc.yaml"))
    labels = [label for split in data.values() for label in split["label"]]
    assert labels == [1] * 20
    assert data["train"][0]["choices"] == ["blue", "red", "pink"]


@pytest.mark.parametrize("change, message", [
    ({"choices": ["red"]}, r"line 7: 1 choices, expected 3 \(the spec's labels \['A', 'B', 'C'\]: one per choice "
                           r"position; at least 2\)"),
    ({"choices": ["red", "blue"]}, r"line 7: 2 choices, expected 3"),
    ({"label": 3}, r"line 7: label: label index 3 out of range, expected 0..2"),
    ({"label": "green"}, r"line 7: label 'green' is not among the choices \['blue', 'red', 'pink'\]"),
    ({"question": " "}, r"line 7: the question is empty, expected text"),
    ({"choices": ["red", "", "blue"]}, r"line 7: text field 'choices': choice 2: got '', expected a non-empty string"),
    ({"choices": "red"}, r"line 7: choices: got 'red', expected a list of answer texts"),
])
def test_each_bad_row_is_one_line_naming_the_file_and_row(tmp_path, change, message):
    good = {"context": "a red stone", "question": "which colour?", "choices": ["blue", "red", "pink"], "label": 1}
    _rows(tmp_path, [{**good, "context": f"stone {i}"} for i in range(6)] + [{**good, **change}])
    with pytest.raises(MTLConfigError, match=r"rows.jsonl: " + message) as err:
        load_task_dataset(load_task_spec(tmp_path / "mc.yaml"))
    assert "\n" not in str(err.value)


def test_each_choice_is_one_row_an_examples_rows_are_consecutive_and_one_is_right(task_dir):
    tokenizer = load_tokenizer("minilm-l6")
    spec = load_task_spec(task_dir / "choice.yaml")
    batch = {"context": ["stone red cloud", "blue river"], "question": ["which colour?"] * 2,
             "choices": [["blue", "red", "pink"], ["blue", "pink", "red"]], "label": [1, 0]}
    out = kind_of("multiple_choice").encode(tokenizer, batch, [7, 9], spec)
    assert out["example"] == [7, 7, 7, 9, 9, 9] and out["labels"] == [0, 1, 0, 1, 0, 0]
    assert out["choice"] == ["blue", "red", "pink", "blue", "pink", "red"]
    # the context is the first segment; the question and the choice the second
    assert tokenizer.decode(out["input_ids"][1]) == "[CLS] stone red cloud [SEP] which colour? red [SEP]"


def test_the_loss_is_cross_entropy_over_each_examples_choices():
    logits = torch.tensor([[0.5], [2.0], [-1.0], [1.0], [0.0], [3.0]])
    labels = torch.tensor([0, 1, 0, 0, 0, 1])
    expected = (-math.log(math.exp(2.0) / (math.exp(0.5) + math.exp(2.0) + math.exp(-1.0)))
                - math.log(math.exp(3.0) / (math.exp(1.0) + 1.0 + math.exp(3.0)))) / 2
    assert kind_of("multiple_choice").loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    scores, right = per_example(logits, labels)
    assert scores.shape == (2, 3) and right.tolist() == [1, 2]
    with pytest.raises(ValueError, match="expected whole examples"):
        per_example(logits[:5], torch.tensor([0, 1, 0, 0, 1]))
    answer = choose([torch.tensor([0.0]), torch.tensor([math.log(3.0)])], ["no", "yes"])
    assert answer["label"] == "yes" and answer["choice"] == 1 and answer["score"] == pytest.approx(0.75)
    assert answer["scores"] == pytest.approx([0.25, 0.75])


def test_the_sampler_draws_whole_examples_and_batch_size_counts_examples():
    # task 0: 4 single rows; task 1: 3 examples of 3 rows each (rows 4..12)
    sampler = TaskBatchSampler([4, 9], batch_size=2, seed=3, example_rows=[1, 3], lengths=[[5] * 4, [1] * 9])
    batches = [list(b) for b in sampler]
    assert len(batches) == len(sampler) == math.ceil(7 / 2)
    for batch in batches:
        if batch[0] >= 4:
            assert len(batch) in (3, 6)
            for at in range(0, len(batch), 3):  # an example's rows, in order
                assert (batch[at] - 4) % 3 == 0 and batch[at:at + 3] == list(range(batch[at], batch[at] + 3))
        else:
            assert len(batch) <= 2
    with pytest.raises(ValueError, match="example_rows"):
        TaskBatchSampler([4, 8], batch_size=2, example_rows=[1, 3])


def test_a_choice_task_trains_beside_a_classifier_and_predicts_each_question_once(tiny_dir, task_dir, tmp_path):
    from mtl.predict import PredictionWriter

    data = TaskDataModule(["keyword", "choice"], backbone=str(tiny_dir), tasks_dir=str(task_dir), batch_size=8,
                          cache_dir=str(tmp_path / "cache"))
    module = AdapterTrainer(["keyword", "choice"], backbone=str(tiny_dir), lr=1e-2, run_dir=str(tmp_path / "run"),
                            tasks_dir=str(task_dir))
    trainer = L.Trainer(max_epochs=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0)
    before = trainer.validate(module, datamodule=data, verbose=False)[0]
    trainer.fit(module, datamodule=data)
    after = trainer.validate(module, datamodule=data, verbose=False)[0]
    assert after["val/choice/acc"] > 0.9 > before["val/choice/acc"]
    assert after["val/avg/score"] == pytest.approx((after["val/choice/acc"] + after["val/keyword/acc"]) / 2)
    # a split's predictions: one row per question, its chosen text, index and every choice's probability
    data.predict_split = "validation"
    out = tmp_path / "pred.jsonl"
    L.Trainer(logger=False, enable_progress_bar=False, callbacks=[PredictionWriter(str(out))]).predict(
        module, datamodule=data, return_predictions=False)
    rows = [json.loads(line) for line in out.read_text().splitlines() if '"choice"' in line]
    raw = data._raw_dataset("choice")["validation"]
    assert sorted(r["index"] for r in rows) == list(range(len(raw)))
    right = 0
    for row in rows:
        example = raw[row["index"]]
        assert row["label"] == example["choices"][row["choice"]] and row["text"] == example["context"]
        assert sum(row["scores"]) == pytest.approx(1.0) and row["score"] == max(row["scores"])
        right += row["choice"] == example["label"]
    assert right / len(rows) == pytest.approx(after["val/choice/acc"])
    # streamed from a file of {context, question, choices} rows: the same choices, asked of the choice task only
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"context": r["context"], "question": r["question"],
                                             "choices": r["choices"], "id": n}) + "\n" for n, r in enumerate(raw)))
    stream = TaskDataModule([], backbone=str(tiny_dir), tasks_dir=str(task_dir), predict_file=str(questions),
                            predict_max_length=16, cache_dir=str(tmp_path / "cache"))
    out = tmp_path / "streamed.jsonl"
    L.Trainer(logger=False, enable_progress_bar=False, callbacks=[PredictionWriter(str(out))]).predict(
        module, datamodule=stream, return_predictions=False)
    streamed = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in streamed] == list(range(len(raw))) and {r["task"] for r in streamed} == {"choice"}
    by_index = {r["index"]: r for r in rows}
    for row in streamed:
        assert row["choice"] == by_index[row["index"]]["choice"] and row["text"] == "which colour?"
        torch.testing.assert_close(row["scores"], by_index[row["index"]]["scores"], atol=1e-5, rtol=0)


def test_a_raw_example_is_read_in_one_place_for_files_and_requests():
    assert read_example("  a text ", "text") == "a text"
    assert read_example({"question": " q ", "context": " c "}, "x") == {"question": "q", "context": " c "}
    assert read_example({"question": "q", "choices": [" a", "b "], "context": " c "}, "x") == \
        {"question": "q", "choices": ["a", "b"], "context": "c"}
    for bad, message in [({"question": "q", "choices": ["a"]}, r"x.choices: got \['a'\], expected a list of at least 2"),
                         ({"question": "q", "choices": ["a", " "]}, r"x.choices\[1\]: got ' ', expected a non-empty"),
                         ({"question": "q"}, r"x: got keys \['question'\], expected a string, a question about"),
                         ({"question": "", "context": "c"}, r"x.question: got '', expected a non-empty string"),
                         (3, r"x: got '3', expected a string")]:
        with pytest.raises(MTLConfigError, match=message):
            read_example(bad, "x")


def test_a_predict_file_of_choices_needs_a_choice_task(tiny_dir, task_dir, tmp_path):
    from mtl.preflight import preflight

    questions = tmp_path / "choices.jsonl"
    questions.write_text(json.dumps({"question": "which colour?", "choices": ["red", "stone"]}) + "\n")

    def check(tasks):
        module = AdapterTrainer(tasks, backbone=str(tiny_dir), tasks_dir=str(task_dir), run_dir=str(tmp_path / "run"))
        data = TaskDataModule([], backbone=str(tiny_dir), tasks_dir=str(task_dir), predict_file=str(questions),
                              cache_dir=str(tmp_path / "cache"))
        preflight("predict", module, data, {"logger": False}, None)

    check(["choice"])
    with pytest.raises(MTLConfigError, match=r"choices.jsonl: holds questions with answer choices .*, which none of "
                                             r"the model's tasks \['keyword', 'qa'\] reads, expected a model with a "
                                             r"task of problem multiple_choice"):
        check(["keyword", "qa"])


@pytest.mark.parametrize("strategy", ["per_task", "replay"])
def test_a_choice_task_in_a_continual_sequence_scores_its_accuracy_in_r(strategy, tiny_dir, task_dir, tmp_path):
    import contextlib
    import io

    from mtl.cli import main
    from tests.test_tagging_workflows import _files

    (tmp_path / "c.yaml").write_text(f"""
seed_everything: 0
continual: {{order: [choice, keyword], strategy: {strategy}, run_dir: {tmp_path / 'run'}, tasks_dir: {task_dir},
            routers: [], replay_size: 30}}
model: {{backbone: {tiny_dir}, lr: 1.0e-2}}
data: {{batch_size: 8, cache_dir: {tmp_path / 'cache'}}}
trainer: {{max_epochs: 2, logger: false, enable_checkpointing: false, enable_progress_bar: false,
          enable_model_summary: false, limit_val_batches: 0}}
""")
    with contextlib.redirect_stdout(io.StringIO()):
        main(["continual", "--config", str(tmp_path / "c.yaml")])
    out = json.loads((tmp_path / "run" / "results.json").read_text())
    assert out["task_metrics"]["choice"] == {"problem": "multiple_choice", "headline": "acc",
                                             "names": {"score": "accuracy", "acc": "accuracy"}}
    after = out["scores"]["score"]["after"]
    assert after[0][0] == out["scores"]["acc"]["after"][0][0] > 0.5  # chance is 1/3
    steps = tmp_path / "run" / "steps"
    if strategy == "per_task":  # training keyword left the choice adapter as it was
        assert after[1][0] == after[0][0]
        assert _files(steps / "01-choice" / "adapters" / "choice") == _files(steps / "02-keyword" / "adapters" / "choice")
    else:  # the buffer holds whole questions: each by its first row (a multiple of its 3 rows)
        state = json.loads((tmp_path / "run" / "state.json").read_text())
        rows = [row for task, row in state["strategy_state"]["buffer"] if task == "choice"]
        assert rows and all(row % 3 == 0 for row in rows)


def test_a_router_does_not_pick_a_choice_task():
    from mtl.model import MTLModel
    from mtl.routing.base import check_routable
    from tests.conftest import tiny_backbone

    model = MTLModel(tiny_backbone("bert"))
    model.add_task("mc", 1, problem="multiple_choice", labels=["A", "B", "C"])
    model.add_task("keyword", 2, labels=["bad", "good"])
    check_routable(model, ["keyword"])
    with pytest.raises(MTLConfigError, match=r"routed prediction needs classification or token_classification heads "
                                             r"with at least 2 labels, got \['mc \(multiple_choice, 1 outputs\)'\]"):
        check_routable(model, ["keyword", "mc"])


def test_a_listed_row_of_a_question_brings_the_whole_question(tiny_dir, task_dir, tmp_path):
    data = TaskDataModule(["choice"], backbone=str(tiny_dir), tasks_dir=str(task_dir), batch_size=2,
                          cache_dir=str(tmp_path / "cache"), train_subsets={"choice": [3, 7]})
    data.setup("fit")
    split = data._train_split("choice")
    assert split["example"] == [split["example"][0]] * 3 + [split["example"][3]] * 3
    assert len(data._train_lengths("choice")) == 6
    batches = [b for b in data.train_dataloader()]
    assert [b["input_ids"].shape[0] for b in batches] == [6]  # batch_size 2 questions: one batch of 6 rows
