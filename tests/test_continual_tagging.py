"""A tagger in a continual sequence beside a classifier: R holds each task's headline metric (entity F1 for the
tagger, accuracy for the classifier), the report and heatmap name it, per_task still verifies zero forgetting; and
routing without a task id with a tagger among the tasks (entropy by hand, prototypes, the routing report)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import random
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from mtl.continual import runner as runner_module
from mtl.continual.report import markdown_report, read_results, run_metrics, save_heatmap, _heatmap_figure
from mtl.continual.runner import ContinualConfig, ContinualRunner
from mtl.data.module import TaskDataModule
from mtl.errors import MTLConfigError
from mtl.figures import pyplot
from mtl.model import MTLModel
from mtl.routing import (EntropyRouter, PrototypeRouter, label_of, load_router, normalized_entropy, routing_report,
                         text_entropy)
from tests.conftest import keyword_task, tiny_backbone
from tests.test_hardening import error_line, run_cli

ORDER = ["tagger", "keyword"]
TAGS = ["O", "B-KEY", "I-KEY"]
# the tagger's words are none of the keyword task's: the two tasks' texts differ, as a router needs
TAG_WORDS = ["north", "south", "east", "west", "lamp", "door", "hill", "road"]


def tagger_task(path: Path, name: str = "tagger", rows: int = 120, seed: int = 3) -> None:
    """JSONL words and tags: the word 'mark' starts a KEY entity (B-KEY), which the next word continues (I-KEY) when
    it is 'lamp'; every other word is O."""
    rng = random.Random(seed)
    lines = []
    for _ in range(rows):
        words = [rng.choice(TAG_WORDS) for _ in range(rng.randrange(3, 7))]
        at = rng.randrange(len(words) + 1)
        words.insert(at, "mark")
        tags = ["O"] * len(words)
        tags[at] = "B-KEY"
        if at + 1 < len(words) and words[at + 1] == "lamp":
            tags[at + 1] = "I-KEY"
        lines.append(json.dumps({"tokens": words, "tags": tags}))
    (path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    (path / f"{name}.yaml").write_text(
        f"source: {{type: files, train: {name}.jsonl}}\ntext_fields: [tokens]\nlabel_field: tags\n"
        f"labels: [{', '.join(TAGS)}]\nproblem: token_classification\nmax_length: 16\ndoc_stride: 4\n")


LOGGED: list[dict[str, float]] = []  # callback metrics of every trainer.test of the run, in order
PRINTED: list[str] = []  # what the run printed


class RecordTests(Callback):
    """Keeps what each test run logged (the runner's R must be exactly these numbers)."""

    def on_test_end(self, trainer, pl_module) -> None:
        LOGGED.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})


@pytest.fixture(scope="module")
def setup(tiny_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("continual-tagging")
    tasks = root / "tasks"
    tasks.mkdir()
    tagger_task(tasks)
    keyword_task(tasks, "keyword", ["bad", "good"], rows=120)
    (root / "base.yaml").write_text(f"""
seed_everything: 0
continual: {{order: [{', '.join(ORDER)}], strategy: per_task, run_dir: {root / 'run'}, tasks_dir: {tasks},
             routers: [prototype, entropy]}}
model: {{backbone: {tiny_dir}, lr: 3.0e-2}}
data: {{batch_size: 16, cache_dir: {root / 'cache'}}}
trainer:
  max_epochs: 2
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  limit_val_batches: 0
  callbacks: [{{class_path: tests.test_continual_tagging.RecordTests}}]
""")
    return root


@pytest.fixture(scope="module")
def per_task(setup, tiny_dir) -> Path:
    """One per_task run: the tagger, then the keyword classifier."""
    from mtl.cli import main

    LOGGED.clear()
    with contextlib.redirect_stdout(io.StringIO()) as out:
        main(["continual", "--config", str(setup / "base.yaml")])
    PRINTED[:] = out.getvalue().splitlines()
    return setup / "run"


def entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """(type, first word, end) of each entity, as conlleval reads BIO tags: an I- tag after O or another type starts
    one."""
    found, start, kind = set(), None, None
    for i, tag in enumerate([*tags, "O"]):
        inside = tag.startswith("I-") and kind == tag[2:]
        if start is not None and not inside:
            found.add((kind, start, i))
            start, kind = None, None
        if tag != "O" and not inside:
            start, kind = i, tag[2:]
    return found


def entity_f1(gold: list[list[str]], guess: list[list[str]]) -> float:
    true = pred = hit = 0
    for g, p in zip(gold, guess):
        a, b = entities(g), entities(p)
        true, pred, hit = true + len(a), pred + len(b), hit + len(a & b)
    precision, recall = hit / pred if pred else 0.0, hit / true if true else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def tagger_f1_by_hand(step: Path, setup: Path, tiny_dir: Path) -> float:
    """The tagger's entity F1 on its test split, from the stage's exported model and the test windows, counted here."""
    model = MTLModel.from_pretrained(step / "adapters").eval()
    data = TaskDataModule(tasks=[], eval_tasks=["tagger"], backbone=str(tiny_dir), tasks_dir=str(setup / "tasks"),
                          cache_dir=str(setup / "cache"), batch_size=16)
    words: dict[int, dict[int, tuple[int, int]]] = {}  # sentence -> word -> (true, predicted)
    with torch.no_grad():
        for batch in data.test_dataloader()[0]:
            logits = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), tasks="tagger")
            pred = logits["tagger"].argmax(-1)
            for r, example in enumerate(batch["example"].tolist()):
                for t, (label, word) in enumerate(zip(batch["labels"][r].tolist(), batch["word_ids"][r].tolist())):
                    if label != -100:
                        words.setdefault(example, {})[word] = (label, int(pred[r, t]))
    sentences = [[words[e][w] for w in sorted(words[e])] for e in sorted(words)]
    return entity_f1([[TAGS[t] for t, _ in s] for s in sentences], [[TAGS[p] for _, p in s] for s in sentences])


def test_r_holds_the_taggers_entity_f1_and_the_classifiers_accuracy(per_task, setup, tiny_dir):
    out = json.loads((per_task / "results.json").read_text())
    assert out["format_version"] == 2
    assert out["task_metrics"] == {
        "tagger": {"problem": "token_classification", "headline": "f1",
                   "names": {"score": "entity F1", "acc": "word accuracy", "f1": "entity F1"}},
        "keyword": {"problem": "classification", "headline": "acc",
                    "names": {"score": "accuracy", "acc": "accuracy", "f1": "macro-F1"}}}
    scores = out["scores"]
    # before, after stage 1, after stage 2: the three test runs, each exactly what it logged
    assert len(LOGGED) == 3
    for row, logged in zip([scores["score"]["before"], *scores["score"]["after"]], LOGGED):
        assert row == [logged["test/tagger/f1"], logged["test/keyword/acc"]]
    for metric in ("acc", "f1"):
        for row, logged in zip([scores[metric]["before"], *scores[metric]["after"]], LOGGED):
            assert row == [logged[f"test/tagger/{metric}"], logged[f"test/keyword/{metric}"]]
    # the tagger's entity F1, counted here from its windows joined back into sentences
    r = scores["score"]["after"]
    assert r[0][0] == pytest.approx(tagger_f1_by_hand(per_task / "steps" / "01-tagger", setup, tiny_dir), abs=1e-6)
    assert r[0][0] > scores["score"]["before"][0]  # training did something
    # test sizes count sentences, not windows
    assert out["test_sizes"][0] == TaskDataModule(tasks=[], eval_tasks=["tagger"], backbone=str(tiny_dir),
                                                  tasks_dir=str(setup / "tasks"),
                                                  cache_dir=str(setup / "cache")).split_size("tagger", "test")
    # metrics read R; per_task forgets nothing, verified
    metrics = out["metrics"]["score"]
    assert metrics["acc"] == pytest.approx((r[1][0] + r[1][1]) / 2) and metrics["bwt"] == 0.0
    assert r[1][0] == r[0][0] and out["zero_forgetting"]["verified"] is True
    assert set(out["zero_forgetting"]["tasks"]) == set(ORDER)
    assert out["metrics"]["acc"]["bwt"] == 0.0 and out["metrics"]["f1"]["bwt"] == 0.0


def test_the_report_and_heatmap_name_each_tasks_metric(per_task):
    text = (per_task / "results.md").read_text()
    assert "R holds each task's headline metric: tagger: entity F1, keyword: accuracy." in text
    assert "## Score (R: each task's headline metric)" in text
    assert "| stage | tagger (entity F1) | keyword (accuracy) |" in text
    assert "| stage | tagger (word accuracy) | keyword (accuracy) |" in text
    assert "| stage | tagger (entity F1) | keyword (macro-F1) |" in text
    assert text.index("## Score") < text.index("## Accuracy") < text.index("## F1") < text.index("## Metrics")
    assert "| metric | score | accuracy | F1 |" in text
    assert "Zero forgetting: verified" in text
    assert "a row counts as right when every word it labels gets its true tag" in text
    assert (per_task / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    fig = _heatmap_figure(read_results(per_task))
    try:
        titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
        assert titles == ["score (R: each task's headline metric): per_task", "accuracy: per_task", "F1: per_task"]
        assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["tagger\n(entity F1)", "keyword\n(accuracy)"]
    finally:
        pyplot().close(fig)


def test_the_stage_lines_say_score(per_task):
    out = json.loads((per_task / "results.json").read_text())
    before, after = out["scores"]["score"]["before"], out["scores"]["score"]["after"]
    assert f"[before] score with fresh adapters and heads: {before[0]:.3f} {before[1]:.3f}" in PRINTED
    assert any(line.startswith("[stage 2/2] keyword done in ") and f"; score {after[1][0]:.3f} {after[1][1]:.3f}; "
               in line for line in PRINTED), PRINTED
    acc = out["metrics"]["score"]["acc"]
    assert any(line.startswith(f"continual: ACC {acc:.3f}, BWT +0.000, zero forgetting verified") for line in PRINTED)


def test_a_finished_run_run_again_passes_the_state_check_and_gives_the_same_results(setup, per_task, capsys):
    out = json.loads((per_task / "results.json").read_text())
    # a finished run run again: it resumes after its last stage and writes the same results
    code, lines = run_cli(["continual", "--config", str(setup / "base.yaml")], capsys)
    assert code == 0, lines
    again = json.loads((per_task / "results.json").read_text())
    assert again["scores"] == out["scores"] and again["routing"] == out["routing"]


def test_routing_in_the_run_reports_the_tagger(per_task):
    out = json.loads((per_task / "results.json").read_text())
    sizes = dict(zip(out["order"], out["test_sizes"]))
    for kind in ("prototype", "entropy"):
        report = out["routing"][kind]
        assert report["tasks"][:2] == ORDER
        # the keyword rows are its test examples; the tagger's rows are its windows (here one per sentence)
        assert sum(report["confusion"][1]) == sizes["keyword"] and sum(report["confusion"][0]) >= sizes["tagger"]
        assert report["overall"]["routed_accuracy"] <= report["overall"]["task_given_accuracy"] + 1e-12
    # distinct words: the prototypes tell the two tasks apart
    assert out["routing"]["prototype"]["overall"]["routing_accuracy"] == 1.0


# ---- results files: format 1 still reads, format 2 with a task without f1 --------------------------------------------
def _format1(results: dict) -> dict:
    """A classification-only results.json as format 1 wrote it: no score, no task_metrics."""
    old = copy.deepcopy(results)
    old["format_version"] = 1
    old["scores"].pop("score")
    old.pop("task_metrics")
    old["metrics"].pop("score")
    return old


def _classifiers() -> dict:
    after = [[0.75, 0.5], [0.5, 1.0]]
    return {"format_version": 2, "strategy": "shared", "order": ["a", "b"], "stages": [["a"], ["b"]],
            "test_sizes": [4, 4],
            "scores": {"score": {"before": [0.5, 0.5], "after": after}, "acc": {"before": [0.5, 0.5], "after": after},
                       "f1": {"before": [0.25, 0.25], "after": [[0.5, 0.25], [0.25, 0.75]]}},
            "metrics": {"score": {}, "acc": {}, "f1": {}}, "zero_forgetting": None, "seed": 0, "config": {},
            "wall_time_s": {"before": 1.0, "stages": [1.0, 1.0], "total": 3.0}, "run_dir": "runs/shared",
            "task_metrics": {t: {"problem": "classification", "headline": "acc",
                                 "names": {"score": "accuracy", "acc": "accuracy", "f1": "macro-F1"}} for t in "ab"}}


def test_a_format_1_results_file_still_reads_and_reports_the_same(tmp_path):
    new = _classifiers()
    old = _format1(new)
    (tmp_path / "results.json").write_text(json.dumps(old))
    assert read_results(tmp_path) == old
    assert run_metrics(old) == run_metrics(new) == run_metrics(new, "acc")  # R of format 1 is its accuracy
    assert markdown_report(old) == markdown_report(new)
    text = markdown_report(new)
    assert "R holds each task's headline metric: accuracy for every task." in text
    assert "## Score" not in text and "## Accuracy (R)" in text and "| stage | a | b |" in text  # shown once


def test_a_pos_tagger_without_f1_is_null_there_and_the_report_says_so(tmp_path):
    mixed = _classifiers()
    mixed["task_metrics"]["b"] = {"problem": "token_classification", "headline": "acc",
                                  "names": {"score": "word accuracy", "acc": "word accuracy"}}
    mixed["scores"]["f1"] = {"before": [0.25, None], "after": [[0.5, None], [0.25, None]]}
    (tmp_path / "results.json").write_text(json.dumps(mixed))
    assert read_results(tmp_path) == mixed
    text = markdown_report(mixed)
    # every headline is acc: R is the accuracy matrix, whose columns name their metric
    assert "## Accuracy (R)" in text and "## Score" not in text
    assert "| stage | a (accuracy) | b (word accuracy) |" in text
    assert "| stage | a (macro-F1) | b (none) |" in text and "| after b | 0.250 | – |" in text
    assert "| metric | accuracy | F1 |" in text and "| BWT | -0.250 | – |" in text
    save_heatmap(mixed, tmp_path / "heatmap.png")
    assert (tmp_path / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no metric of the matrix"):
        run_metrics(mixed, "f1")
    for where, value, words in (
            (("f1", "after", 1, 1), 0.5, "scores.f1.after[1][1] (task b) is 0.5, expected null (the task has no such "
                                         "metric)"),
            (("acc", "before", None, 0), None, "scores.acc.before[0] (task a) is None, expected a number")):
        broken = copy.deepcopy(mixed)
        metric, part, row, column = where
        (broken["scores"][metric][part][row] if row is not None else broken["scores"][metric][part])[column] = value
        (tmp_path / "results.json").write_text(json.dumps(broken))
        with pytest.raises(MTLConfigError) as caught:
            read_results(tmp_path)
        assert str(caught.value) == f"{tmp_path / 'results.json'}: {words}"
    broken = copy.deepcopy(mixed)
    broken["task_metrics"].pop("b")
    (tmp_path / "results.json").write_text(json.dumps(broken))
    with pytest.raises(MTLConfigError, match="task_metrics must be a mapping with one entry per task"):
        read_results(tmp_path)


def test_a_format_1_state_resumes_as_format_2_with_score_equal_to_accuracy(tmp_path):
    config = ContinualConfig(order=["a", "b"], strategy="shared", run_dir=str(tmp_path / "run"))
    runner = ContinualRunner(config, {}, {}, lambda name: None, {})
    runner.strategy = runner_module.build_strategy(config, 0)
    runner.stages = runner.strategy.stages(config.order)
    for name in ("00-before", "01-a"):
        (tmp_path / "run" / "steps" / name / "adapters").mkdir(parents=True)
    old = {"format_version": 1, "settings": {}, "strategy": "shared", "order": ["a", "b"], "stages": [["a"], ["b"]],
           "seed": 0, "completed": 1, "steps": ["steps/00-before", "steps/01-a"],
           "before": {"acc": [0.5, 0.5], "f1": [0.25, 0.25]}, "after": {"acc": [[0.75, 0.5]], "f1": [[0.5, 0.25]]},
           "test_sizes": [4, 4], "wall_time_s": {"before": 1.0, "stages": [1.0]}, "strategy_state": {},
           "single_task": {}}
    (tmp_path / "run" / "state.json").write_text(json.dumps(old))
    state = runner._read_state()
    assert state["format_version"] == 2
    assert state["before"] == {"score": [0.5, 0.5], **old["before"]}
    assert state["after"] == {"score": [[0.75, 0.5]], **old["after"]}
    old["format_version"] = 7
    (tmp_path / "run" / "state.json").write_text(json.dumps(old))
    with pytest.raises(MTLConfigError, match="not a continual-run state of format 2 \\(or 1\\)"):
        runner._read_state()


def test_a_task_whose_headline_is_no_score_in_0_1_is_one_line(setup, tmp_path, capsys):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    keyword_task(tasks, "keyword", ["bad", "good"], rows=40)
    (tasks / "size.csv").write_text("text,label\n" + "".join(f"word {i},{i / 10}\n" for i in range(40)))
    (tasks / "size.yaml").write_text("source: {type: files, train: size.csv}\ntext_fields: [text]\n"
                                     "label_field: label\nlabels: [size]\nproblem: regression\nmax_length: 8\n")
    code, lines = run_cli(["continual", "--config", str(setup / "base.yaml"), "--continual.run_dir",
                           str(tmp_path / "r"), "--continual.tasks_dir", str(tasks), "--continual.order",
                           "[keyword, size]"], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert error_line(lines) == (f"error: {tasks / 'size.yaml'}: problem regression has the headline metric pearson, "
                                 "expected a task whose headline is a score in [0, 1] (acc or f1: classification, "
                                 "multilabel, token_classification, extractive_qa, multiple_choice); R and its "
                                 "metrics compare every task on that scale")
    assert not (tmp_path / "r").exists()


# ---- routing with a tagger, by hand -----------------------------------------------------------------------------
def test_a_taggers_text_entropy_by_hand():
    # two tokens over two tags: uniform (entropy 1) and 1/4, 3/4 (H = -(1/4 ln 1/4 + 3/4 ln 3/4) / ln 2)
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)]]], dtype=torch.float64)
    second = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2)
    assert normalized_entropy(logits)[0].tolist() == pytest.approx([1.0, second], abs=1e-12)
    assert text_entropy(logits).item() == pytest.approx((1.0 + second) / 2, abs=1e-12)
    assert text_entropy(logits, torch.tensor([[1, 1]])).item() == pytest.approx((1.0 + second) / 2, abs=1e-12)
    assert text_entropy(logits, torch.tensor([[0, 1]])).item() == pytest.approx(second, abs=1e-12)  # padding left out
    assert text_entropy(logits, torch.tensor([[0, 0]])).item() == 1.0  # no real token: uncertain
    # a classifier's row is one distribution: its entropy as before
    assert text_entropy(torch.tensor([[0.0, 0.0]])).item() == 1.0
    # the tagger's mean 0.906 against a classifier's 0.946 (three labels 1/2, 1/4, 1/4: H = 1.5 ln 2 / ln 3): the
    # tagger wins; with only its uncertain token real (1.0) it loses
    classifier = torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64).log()
    assert normalized_entropy(classifier).item() == pytest.approx(1.5 * math.log(2) / math.log(3), abs=1e-12)
    both = {"classifier": classifier, "tagger": logits}
    assert EntropyRouter.choose(both, torch.tensor([[1, 1]])) == ["tagger"]
    assert EntropyRouter.choose(both, torch.tensor([[1, 0]])) == ["classifier"]


WORD_IDS = {"cls": list(range(5, 10)), "tag": list(range(100, 105))}


def _mixed_model() -> MTLModel:
    model = MTLModel(tiny_backbone("bert"))
    model.add_task("cls", 3)
    model.add_task("tag", 3, problem="token_classification", labels=TAGS)
    for i, task in enumerate(("cls", "tag")):
        g = torch.Generator().manual_seed(20 + i)
        with torch.no_grad():  # identity adapters would make both tasks' hidden states the same
            for p in model.task_parameters(task).values():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _texts(task: str, rows: int, seed: int, length: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    vocab = torch.tensor(WORD_IDS[task])
    ids = vocab[torch.randint(0, len(vocab), (rows, length), generator=g)]
    mask = torch.ones(rows, length, dtype=torch.long)
    for r in range(rows):
        mask[r, length - r % 3:] = 0
    return {"input_ids": ids * mask, "attention_mask": mask}


def test_routers_route_a_mix_of_tagger_and_classifier_texts(tmp_path):
    model = _mixed_model()
    cls, tag = _texts("cls", 4, 1), _texts("tag", 4, 2)
    batch = {k: torch.cat([cls[k], tag[k]])[[0, 4, 1, 5, 2, 6, 3, 7]] for k in cls}  # interleaved
    truth = ["cls", "tag"] * 4
    # entropy: every head on every row; the tagger's text entropy over each row's real tokens
    router = EntropyRouter()
    chosen, logits = router.routed_logits(model, **batch)
    alone = {t: model(**batch, tasks=t)[t] for t in ("cls", "tag")}
    entropy = torch.stack([normalized_entropy(alone["cls"]),
                           torch.stack([normalized_entropy(alone["tag"][r])[batch["attention_mask"][r].bool()].mean()
                                        for r in range(8)])], dim=1)
    assert chosen == [("cls", "tag")[i] for i in entropy.argmin(1).tolist()]
    for row, task in enumerate(chosen):
        assert logits[row].shape == alone[task][row].shape  # a tagger's row: [tokens, tags]
        torch.testing.assert_close(logits[row], alone[task][row], rtol=1e-5, atol=1e-5)
    assert router.predict(model, **batch) == [(t, label_of(alone[t][r])) for r, t in enumerate(chosen)]
    # prototypes: a tagger's training rows (windows) are texts like any other
    prototypes = PrototypeRouter()
    for i in range(2):
        prototypes.add_batch(model, "cls", **_texts("cls", 6, 10 + i))
        prototypes.add_batch(model, "tag", **_texts("tag", 6, 20 + i))
    assert prototypes.route(model, **batch) == truth
    answers = prototypes.predict(model, **batch)
    assert [t for t, _ in answers] == truth
    for row, (task, label) in enumerate(answers):
        expected = label_of(alone[task][row])
        assert label == expected and isinstance(label, list if task == "tag" else int)
    assert load_router(prototypes.save(tmp_path / "router")).route(model, **batch) == truth


def test_the_routing_report_scores_a_taggers_rows_by_hand():
    model = _mixed_model()
    with torch.no_grad():  # constant heads: the tagger tags every token B-KEY, the classifier answers label 2
        model.heads["tag"].out.weight.zero_()
        model.heads["tag"].out.bias.copy_(torch.tensor([0.0, 2.0, 0.0]))
        model.heads["cls"].out.weight.zero_()
        model.heads["cls"].out.bias.copy_(torch.tensor([0.0, 0.0, 2.0]))
    tag = _texts("tag", 3, 5)
    ignore = [-100] * 8
    labels = torch.tensor([ignore[:1] + [1, 1] + ignore[3:],  # every labelled word B-KEY: right
                           ignore[:1] + [1, 0] + ignore[3:],  # one word O: wrong
                           ignore[:2] + [1] + ignore[3:]])  # right
    prototypes = PrototypeRouter()
    prototypes.add_batch(model, "cls", **_texts("cls", 6, 10))
    prototypes.add_batch(model, "tag", **_texts("tag", 6, 20))
    batches = {"tag": [{**tag, "labels": labels}],
               "cls": [{**_texts("cls", 2, 6), "labels": torch.tensor([2, 0])}]}
    report = routing_report(model, prototypes, batches)
    assert report["confusion"] == [[3, 0], [0, 2]]
    assert report["per_task"]["tag"] == {"rows": 3, "routing_accuracy": 1.0, "routed_accuracy": 2 / 3,
                                         "task_given_accuracy": 2 / 3}
    assert report["per_task"]["cls"] == {"rows": 2, "routing_accuracy": 1.0, "routed_accuracy": 0.5,
                                         "task_given_accuracy": 0.5}
    assert report["overall"]["routed_accuracy"] == 3 / 5


def test_replay_keeps_a_taggers_windows_and_resumes(setup, tiny_dir, tmp_path, capsys):
    """A tagger whose sentences span several windows: the replay buffer holds windows (rows of the tokenised split),
    more than the sentences, and the check on resume counts them so."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    tagger_task(tasks, "long", rows=60)
    spec = tasks / "long.yaml"
    spec.write_text(spec.read_text().replace("max_length: 16", "max_length: 6").replace("doc_stride: 4",
                                                                                         "doc_stride: 2"))
    keyword_task(tasks, "keyword", ["bad", "good"], rows=60)
    args = ["continual", "--config", str(setup / "base.yaml"), "--continual.run_dir", str(tmp_path / "run"),
            "--continual.tasks_dir", str(tasks), "--continual.order", "[long, keyword]", "--continual.strategy",
            "replay", "--continual.replay_size", "500", "--continual.routers", "[]"]
    code, lines = run_cli(args, capsys)
    assert code == 0, lines
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    out = json.loads((tmp_path / "run" / "results.json").read_text())
    sentences = TaskDataModule(tasks=[], eval_tasks=["long"], backbone=str(tiny_dir), tasks_dir=str(tasks),
                               cache_dir=str(setup / "cache")).split_size("long", "train")
    windows = sorted(row for task, row in state["strategy_state"]["buffer"] if task == "long")
    assert windows == list(range(len(windows))) and len(windows) > sentences  # every window: more rows than sentences
    assert out["task_metrics"]["long"]["headline"] == "f1" and out["stored_bytes"]["replay_buffer"] > 0
    code, lines = run_cli(args, capsys)  # the finished run again: its state passes the check
    assert code == 0, lines
    assert json.loads((tmp_path / "run" / "results.json").read_text())["scores"] == out["scores"]
