"""Extractive QA: SQuAD scores, windows over long contexts, span choice, reading SQuAD files, training."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from mtl.backbone import load_tokenizer
from mtl.data.module import TaskDataModule
from mtl.data.spec import load_task_spec
from mtl.errors import MTLConfigError
from mtl.kinds import kind_of
from mtl.kinds.answer_match import THRESHOLD_KEY, best_threshold, exact_match, f1_score, normalize_answer
from mtl.kinds.answer_scores import AnswerScores
from mtl.kinds.extractive_qa import MAX_ANSWER_TOKENS, answer_tokens, best_answer, best_spans
from mtl.lit import AdapterTrainer


def test_answers_are_normalised_and_scored_as_squad_does():
    assert normalize_answer("  The  Eiffel-Tower, in  Paris! ") == "eiffeltower in paris"
    assert normalize_answer("an apple a day") == "apple day"
    assert exact_match("the Cat.", ["dog", "cat"]) == 1.0
    assert exact_match("a cat sat", ["cat"]) == 0.0
    # "big red dog" against "red dog house": 2 common words, precision 2/3, recall 2/3
    assert f1_score("big red dog", ["red dog house"]) == pytest.approx(2 / 3)
    # best over the golds: "red dog" against "red" (p 1/2, r 1) and "red dog" (1)
    assert f1_score("red dog", ["red", "the red dog"]) == 1.0
    assert f1_score("red dog", ["red"]) == pytest.approx(2 * 0.5 / 1.5)
    assert f1_score("dog dog", ["dog"]) == pytest.approx(2 * 0.5 / 1.5)  # words count as a multiset
    assert f1_score("", ["cat"]) == 0.0 and exact_match("", []) == 1.0 and f1_score("cat", []) == 0.0


def test_each_example_counts_once_at_its_best_window():
    metric = AnswerScores("f1")
    # example 0: windows scoring 1.0 (F1 0.2) and 3.0 (F1 0.9); example 1: one window, F1 0.5
    metric.update(torch.tensor([0, 1]), torch.tensor([1.0, 0.0]), torch.full((2,), 9.0), torch.zeros(2),
                  torch.tensor([0.2, 0.5]), torch.zeros(2))
    metric.update(torch.tensor([0]), torch.tensor([3.0]), torch.full((1,), 9.0), torch.zeros(1), torch.tensor([0.9]),
                  torch.zeros(1))
    assert metric.compute().item() == pytest.approx((0.9 + 0.5) / 2)  # no "no answer": null scores play no part


def test_the_no_answer_threshold_maximises_the_score_and_parts_no_equal_diffs():
    # null - span diffs 3, 1, -2, 0.5; span values 0, 0.8, 1, 0.2; an empty answer scores 1, 0, 0, 1
    # answered empty from the highest diff down: totals 2.0 (none), 3.0, 2.2, 3.0, 2.0: one, the fewest on a tie
    assert best_threshold([3, 1, -2, 0.5], [0, 0.8, 1, 0.2], [1, 0, 0, 1]) == (3 + 1) / 2
    assert best_threshold([1, 2], [1, 1], [0, 0]) == 2  # none: the highest diff (strictly above it: empty)
    every = best_threshold([1, 2], [0, 0], [1, 1])
    assert every < 1 and every > 0.999999  # all: just under the lowest
    # diffs 1, 1, 0: the two equal diffs go together; both empty with the third (total 2) beats none (1)
    assert best_threshold([1, 1, 0], [0, 1, 0], [1, 0, 1]) < 0


def test_validation_chooses_the_threshold_into_the_spec_and_test_applies_the_spec_s():
    def windows(metric):
        # example 0: spans 2 and 4 (F1 0.1, 0.6), nulls 5 and 9: diff 5 - 4 = 1, unanswerable (empty scores 1);
        # example 1: span 3 (F1 0.9), null 1: diff -2, answerable
        metric.update(torch.tensor([0, 0, 1]), torch.tensor([2.0, 4.0, 3.0]), torch.tensor([5.0, 9.0, 1.0]),
                      torch.zeros(3), torch.tensor([0.1, 0.6, 0.9]), torch.tensor([1.0, 1.0, 0.0]))
        return metric.compute().item()

    spec = {"no_answer": True}
    assert windows(AnswerScores("f1", spec)) == pytest.approx((1.0 + 0.9) / 2)  # threshold 0 before any choice
    assert windows(AnswerScores("f1", spec, choose=True)) == pytest.approx((1.0 + 0.9) / 2)
    assert spec[THRESHOLD_KEY] == (1 + -2) / 2  # halfway between the empty answer's diff and the next
    spec[THRESHOLD_KEY] = 5.0
    assert windows(AnswerScores("f1", spec)) == pytest.approx((0.6 + 0.9) / 2)  # test reads the spec's
    assert windows(AnswerScores("f1", {})) == pytest.approx((0.6 + 0.9) / 2)  # no no_answer: always a span
    assert windows(AnswerScores("exact", {"no_answer": True})) == pytest.approx(1 / 2)  # empty is exact, span 0


def test_an_empty_answer_scores_as_squad_counts_it_and_the_null_score_is_cls_start_plus_end():
    batch = {"offsets": torch.tensor([[[-1, -1], [0, 2]]] * 3), "longest": torch.tensor([30] * 3),
             "context": ["An"] * 3, "golds": [[], ["An"], ["red"]], "example": torch.tensor([0, 1, 2])}
    logits = torch.zeros(3, 2, 2)
    logits[:, 0] = torch.tensor([[1.0, 2.0], [0.5, 0.25], [-1.0, 0.0]])
    example, score, null, exact, f1, empty = kind_of("extractive_qa").metric_inputs(logits, batch)
    assert empty.tolist() == [1.0, 1.0, 0.0]  # "An" normalises to nothing, as an empty answer does
    assert null.tolist() == [3.0, 0.75, -1.0] and score.tolist() == [0.0, 0.0, 0.0]


def test_no_answer_where_the_lowest_null_beats_the_best_span_by_the_threshold():
    offsets = [torch.tensor([[-1, -1], [0, 3], [4, 7]]), torch.tensor([[-1, -1], [4, 7], [8, 11]])]
    logits = [torch.tensor([[2.0, 2.0], [1.0, 0.0], [0.0, 2.0]]), torch.tensor([[1.0, 0.5], [0.0, 0.0], [0.0, 0.0]])]
    context = "red dog cat"
    span = best_answer(logits, offsets, context)  # (1, 2) in window 0: 1 + 2 = 3; the nulls: 4, 1.5
    assert (span["label"], span["start"], span["end"]) == ("red dog", 0, 7) and "no_answer" not in span
    assert best_answer(logits, offsets, context, threshold=-1.5)["no_answer"] is False  # 1.5 - 3 = -1.5: not above
    empty = best_answer(logits, offsets, context, threshold=-1.6)
    probs = logits[1].softmax(0)  # the window with the lowest null score
    assert (empty["label"], empty["start"], empty["end"], empty["no_answer"]) == ("", None, None, True)
    assert empty["score"] == pytest.approx(float(probs[0, 0] * probs[0, 1]))


def test_the_best_span_lies_in_the_context_ends_after_it_starts_and_is_not_too_long():
    offsets = torch.tensor([[[-1, -1], [-1, -1], [0, 3], [4, 7], [8, 9], [-1, -1]]])
    logits = torch.zeros(1, 6, 2)
    logits[0, 0] = 50.0  # [CLS] and question tokens are not answers
    logits[0, 4, 0], logits[0, 3, 1] = 9.0, 8.0  # end before start is not a span
    logits[0, 3, 0], logits[0, 4, 1] = 1.0, 4.0
    start, end, score = best_spans(logits, offsets)  # (4, 4): 9 + 4; (3, 3): 1 + 8; (3, 4): 1 + 4
    assert (start.item(), end.item(), score.item()) == (4, 4, 13.0)
    logits[0, 4, 0], logits[0, 3, 0] = 0.0, 6.0
    start, end, score = best_spans(logits, offsets)  # (3, 3): 6 + 8; (3, 4): 6 + 4
    assert (start.item(), end.item(), score.item()) == (3, 3, 14.0)
    long = torch.zeros(1, MAX_ANSWER_TOKENS + 3, 2)
    long[0, 1, 0], long[0, MAX_ANSWER_TOKENS + 1, 1] = 10.0, 10.0  # 31 tokens apart: too long
    spans = torch.tensor([[[i, i + 1] if i else [-1, -1] for i in range(MAX_ANSWER_TOKENS + 3)]])
    start, end, _ = best_spans(long, spans)
    assert end.item() - start.item() < MAX_ANSWER_TOKENS
    start, end, score = best_spans(long, spans, longest=MAX_ANSWER_TOKENS + 1)  # a spec's max_answer_length
    assert (start.item(), end.item(), score.item()) == (1, MAX_ANSWER_TOKENS + 1, 20.0)


def test_every_window_holding_the_answer_labels_exactly_its_tokens_and_the_others_point_at_cls(task_dir):
    tokenizer = load_tokenizer("minilm-l6")
    kind = kind_of("extractive_qa")
    spec = load_task_spec(task_dir / "qa.yaml")
    rows = [json.loads(line) for line in (task_dir / "qa.jsonl").read_text().splitlines()]
    batch = {"question": [r["question"] for r in rows], "context": [r["context"] for r in rows],
             "label": [r["answers"] for r in rows]}
    out = kind.encode(tokenizer, batch, list(range(len(rows))), spec)
    assert max(len(ids) for ids in out["input_ids"]) <= spec.max_length
    windows_of: dict[int, list[int]] = {}
    for w, example in enumerate(out["example"]):
        windows_of.setdefault(example, []).append(w)
    assert any(len(w) > 1 for w in windows_of.values())  # long contexts were cut
    for example, windows in windows_of.items():
        answer = rows[example]["answers"][0]
        found = 0
        for w in windows:
            start, end = out["labels"][w]
            if (start, end) == (0, 0):
                continue
            found += 1
            a, b = out["offsets"][w][start][0], out["offsets"][w][end][1]
            assert rows[example]["context"][a:b] == answer["text"]
            assert out["context"][w] == rows[example]["context"] and out["golds"][w] == [answer["text"]]
        assert found >= 1  # the answer is wholly inside at least one window
    offsets = [(-1, -1), (0, 4), (5, 9)]
    assert answer_tokens(offsets, {"text": "beta", "answer_start": 5}) == [2, 2]
    assert answer_tokens(offsets, {"text": "alpha beta", "answer_start": 0}) == [0, 0]  # not wholly inside
    assert answer_tokens(offsets, None) == [0, 0]


def _write(path, text):
    path.write_text(text)
    return path


def test_a_squad_file_is_read_with_its_unanswerable_questions_and_mistakes_name_the_question(tmp_path, tiny_dir):
    squad = {"version": "v2.0", "data": [{"title": "t", "paragraphs": [
        {"context": "Paris is the capital of France.", "qas": [
            {"id": "q1", "question": "What is the capital of France?", "answers": [{"text": "Paris", "answer_start": 0}]},
            {"id": "q2", "question": "What is the capital of Spain?", "answers": [], "is_impossible": True}]}]}]}
    _write(tmp_path / "squad.json", json.dumps(squad))
    spec = ("source: {type: files, train: squad.json}\ntext_fields: [question, context]\nlabel_field: answers\n"
            "problem: extractive_qa\nsplit: {validation: 0.4, test: 0.4}\n")
    _write(tmp_path / "sq.yaml", spec)
    from mtl.data.sources import read_source, _examples

    loaded = load_task_spec(tmp_path / "sq.yaml")
    texts, labels, empty = _examples(loaded, "train", read_source(loaded)["train"])
    assert [t[0] for t in texts] == ["What is the capital of France?", "What is the capital of Spain?"]
    assert labels == [[{"text": "Paris", "answer_start": 0}], []] and empty == 0
    squad["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] = 3
    _write(tmp_path / "squad.json", json.dumps(squad))
    with pytest.raises(MTLConfigError, match=r"squad\.json: data\[0\]\.paragraphs\[0\]\.qas\[0\] \(id q1\): answer 1: "
                                             r"'Paris' is not at answer_start 3"):
        _examples(loaded, "train", read_source(loaded)["train"])
    squad["data"][0]["paragraphs"][0]["qas"][0].update(question=" ", answers=[{"text": "Paris", "answer_start": 0}])
    _write(tmp_path / "squad.json", json.dumps(squad))
    with pytest.raises(MTLConfigError, match=r"qas\[0\] \(id q1\): the question is empty"):
        _examples(loaded, "train", read_source(loaded)["train"])
    with pytest.raises(MTLConfigError, match=r"labels: got \['a'\], expected no labels"):
        _write(tmp_path / "bad.yaml", spec + "labels: [a]\n")
        load_task_spec(tmp_path / "bad.yaml")
    with pytest.raises(MTLConfigError, match=r"max_answer_length: got 0, expected an int >= 1, for an extractive_qa"):
        _write(tmp_path / "bad.yaml", spec + "max_answer_length: 0\n")
        load_task_spec(tmp_path / "bad.yaml")
    with pytest.raises(MTLConfigError, match=r"bad.yaml: no_answer: got 'yes', expected bool"):
        _write(tmp_path / "bad.yaml", spec + "no_answer: 'yes'\n")
        load_task_spec(tmp_path / "bad.yaml")
    with pytest.raises(MTLConfigError, match=r"bad.yaml: no_answer: got True, expected false \(only an extractive_qa"):
        _write(tmp_path / "bad.yaml", spec.replace("extractive_qa", "classification").replace(
            "[question, context]", "[question]") + "labels: [a, b]\nno_answer: true\n")
        load_task_spec(tmp_path / "bad.yaml")
    with pytest.raises(MTLConfigError, match=r"text_fields: got \['question'\], expected two columns"):
        _write(tmp_path / "bad.yaml", spec.replace("[question, context]", "[question]"))
        load_task_spec(tmp_path / "bad.yaml")


def test_a_question_that_leaves_no_room_for_the_context_is_refused_before_training(tmp_path, tiny_dir):
    rows = [{"question": " ".join(["which"] * 30), "context": f"red stone {i}",
             "answers": [{"text": "red", "answer_start": 0}]} for i in range(10)]
    _write(tmp_path / "long.jsonl", "\n".join(json.dumps(row) for row in rows) + "\n")
    _write(tmp_path / "long.yaml", "source: {type: files, train: long.jsonl}\ntext_fields: [question, context]\n"
                                   "label_field: answers\nproblem: extractive_qa\nmax_length: 24\ndoc_stride: 6\n")
    data = TaskDataModule(["long"], backbone=str(tiny_dir), tasks_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    with pytest.raises(MTLConfigError, match=r"long\.yaml: source\.train row 0: the question 'which which.*'\.\.\. is 30 "
                                             r"tokens; with max_length 24 and doc_stride 6 a window has room for "
                                             r"questions of up to 14 tokens"):
        data.check_before("fit")  # found when the data is read, before anything is tokenised into the cache
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").rglob("*.arrow"))


def test_a_qa_adapter_trains_beside_a_classifier_and_finds_the_answers(tiny_dir, task_dir, tmp_path):
    data = TaskDataModule(["keyword", "qa"], backbone=str(tiny_dir), tasks_dir=str(task_dir), batch_size=16,
                          cache_dir=str(tmp_path / "cache"))
    module = AdapterTrainer(["keyword", "qa"], backbone=str(tiny_dir), lr=1e-2, run_dir=str(tmp_path / "run"),
                            tasks_dir=str(task_dir))
    trainer = L.Trainer(max_epochs=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0)
    before = trainer.validate(module, datamodule=data, verbose=False)[0]
    trainer.fit(module, datamodule=data)
    after = trainer.validate(module, datamodule=data, verbose=False)[0]
    assert after["val/qa/f1"] > 0.9 > before["val/qa/f1"]
    assert after["val/qa/exact"] == pytest.approx(after["val/qa/f1"])  # one-word answers: a hit is exact
    assert after["val/avg/score"] == pytest.approx((after["val/qa/f1"] + after["val/keyword/acc"]) / 2)
    # predictions on a split: one row per question, however many windows its context took
    from mtl.predict import PredictionWriter

    data.predict_split = "validation"
    out = tmp_path / "pred.jsonl"
    L.Trainer(logger=False, enable_progress_bar=False, callbacks=[PredictionWriter(str(out))]).predict(
        module, datamodule=data, return_predictions=False)
    rows = [json.loads(line) for line in out.read_text().splitlines() if '"qa"' in line]
    raw = data._raw_dataset("qa")["validation"]
    assert sorted(r["index"] for r in rows) == list(range(len(raw)))
    right = 0
    for row in rows:
        context = raw[row["index"]]["context"]
        assert context[row["start"]:row["end"]] == row["label"] and 0 < row["score"] <= 1
        assert row["text"] == "which colour?"
        right += row["label"] == raw[row["index"]]["label"][0]["text"]
    assert right / len(rows) == pytest.approx(after["val/qa/exact"])  # the file holds what validation scored
    # streamed from a file of questions (windows as the task's: predict_max_length 24, a quarter of it shared): the
    # same answers; only the QA task answers a question, the classifier is not asked
    streamed = streamed_answers(module, raw, tiny_dir, task_dir, tmp_path)
    assert [r["index"] for r in streamed] == list(range(len(raw))) and {r["task"] for r in streamed} == {"qa"}
    by_index = {r["index"]: r for r in rows}
    for row in streamed:
        split_row = by_index[row["index"]]
        assert (row["label"], row["start"], row["end"]) == (split_row["label"], split_row["start"], split_row["end"])
        assert abs(row["score"] - split_row["score"]) < 1e-5 and row["text"] == raw[row["index"]]["context"]


def streamed_answers(module, raw, tiny_dir, task_dir, tmp_path) -> list[dict]:
    """``module``'s prediction rows for a file of the split ``raw``'s questions, streamed in windows of 24 tokens (the
    test tasks' own)."""
    from mtl.predict import PredictionWriter

    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question": r["question"], "context": r["context"]}) + "\n" for r in raw))
    stream = TaskDataModule([], backbone=str(tiny_dir), tasks_dir=str(task_dir), predict_file=str(questions),
                            predict_max_length=24, cache_dir=str(tmp_path / "cache"))
    out = tmp_path / "streamed.jsonl"
    L.Trainer(logger=False, enable_progress_bar=False, callbacks=[PredictionWriter(str(out))]).predict(
        module, datamodule=stream, return_predictions=False)
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_a_predict_file_is_refused_before_work_when_no_task_reads_its_rows(tiny_dir, task_dir, tmp_path):
    from mtl.preflight import preflight

    texts, questions = tmp_path / "texts.txt", tmp_path / "questions.jsonl"
    texts.write_text("a plain text\n")
    questions.write_text(json.dumps({"question": "which colour?", "context": "red stone"}) + "\n" +
                         json.dumps({"question": " ".join(["which"] * 30), "context": "red stone"}) + "\n")

    def check(tasks, file, **kwargs):
        module = AdapterTrainer(tasks, backbone=str(tiny_dir), tasks_dir=str(task_dir), run_dir=str(tmp_path / "run"))
        data = TaskDataModule([], backbone=str(tiny_dir), tasks_dir=str(task_dir), predict_file=str(file),
                              cache_dir=str(tmp_path / "cache"), **kwargs)
        preflight("predict", module, data, {"logger": False}, None)

    check(["keyword", "qa"], texts)  # the classifier reads texts
    with pytest.raises(MTLConfigError, match=r"texts.txt: holds texts, which none of the model's tasks \['qa'\] reads, "
                                             r"expected a model with a task that reads one text"):
        check(["qa"], texts)
    with pytest.raises(MTLConfigError, match=r"questions.jsonl: holds questions about a context \(\{question, "
                                             r"context\}\), which none of the model's tasks \['keyword'\] reads, "
                                             r"expected a model with a task of problem extractive_qa"):
        check(["keyword"], questions)
    with pytest.raises(MTLConfigError, match=r"questions.jsonl: row 2: the question 'which which.*'\.\.\. is 30 tokens; "
                                             r"with max_length 24 and doc_stride 6 .* \(raise data.predict_max_length\)"):
        check(["qa"], questions, predict_max_length=24)
    questions.write_text(questions.read_text().splitlines()[0] + "\n" + json.dumps({"text": "plain"}) + "\n")
    with pytest.raises(MTLConfigError, match=r"questions.jsonl: line 2: a row of texts in a file of questions about a "
                                             r"context \(\{question, context\}\) \(as its first row\), expected one "
                                             r"form throughout"):
        check(["qa"], questions)


def test_unanswerable_questions_are_answered_empty_with_the_threshold_of_the_best_checkpoint(tiny_dir, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from mtl import storage
    from mtl.model import MTLModel
    from mtl.predict import PredictionWriter
    from tests.conftest import qa_task

    qa_task(tmp_path, "open", no_answer=True, rows=240)  # every third question has no answer in its context
    data = TaskDataModule(["open"], backbone=str(tiny_dir), tasks_dir=str(tmp_path), batch_size=16,
                          cache_dir=str(tmp_path / "cache"))
    module = AdapterTrainer(["open"], backbone=str(tiny_dir), lr=1e-2, run_dir=str(tmp_path / "run"),
                            tasks_dir=str(tmp_path))
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/avg/score", mode="max")
    trainer = L.Trainer(max_epochs=6, logger=False, callbacks=[best], enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    # the export holds the threshold that the best checkpoint's own validation chose
    chosen = storage.read_checkpoint(best.best_model_path)[storage.CHECKPOINT_KEY]["chosen"]["open"][THRESHOLD_KEY]
    saved = json.loads((tmp_path / "run" / "adapters" / "open" / storage.ADAPTER_CONFIG).read_text())["task_spec"]
    assert saved["no_answer"] is True and saved[THRESHOLD_KEY] == chosen == module.model.records["open"].spec[
        THRESHOLD_KEY]
    tested = trainer.test(module, datamodule=data, verbose=False)[0]
    assert tested["test/open/f1"] > 0.85
    # the split's predictions are what test scored: empty answers where the threshold says so
    data.predict_split = "test"
    out = tmp_path / "pred.jsonl"
    L.Trainer(logger=False, enable_progress_bar=False, callbacks=[PredictionWriter(str(out))]).predict(
        module, datamodule=data, return_predictions=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    raw = data._raw_dataset("open")["test"]
    golds = [[a["text"] for a in raw[r["index"]]["label"]] for r in rows]
    assert sum(f1_score(r["label"], g) for r, g in zip(rows, golds)) / len(rows) == pytest.approx(tested["test/open/f1"])
    empty = [r["no_answer"] for r, g in zip(rows, golds) if not g]
    assert len(empty) >= 5 and sum(empty) / len(empty) > 0.8
    assert all(r["start"] is None and r["label"] == "" for r in rows if r["no_answer"])
    # a model loaded from the export answers a file of the same questions alike (its spec holds the threshold)
    loaded = AdapterTrainer([], backbone=str(tiny_dir), load_from=str(tmp_path / "run"), tasks_dir=str(tmp_path),
                            run_dir=str(tmp_path / "run2"))
    assert loaded.model.records["open"].spec[THRESHOLD_KEY] == chosen
    by_index = {r["index"]: r for r in rows}
    for row in streamed_answers(loaded, raw, tiny_dir, tmp_path, tmp_path):
        assert (row["label"], row["start"], row["no_answer"]) == tuple(by_index[row["index"]][k]
                                                                      for k in ("label", "start", "no_answer"))
    assert MTLModel.from_pretrained(tmp_path / "run", backbone=str(tiny_dir)).records["open"].spec == saved
