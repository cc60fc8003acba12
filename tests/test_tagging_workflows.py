"""A tagging task in every workflow, on a tiny local backbone: joint training beside a classifier, adding a tagger to
a trained system, the frozen-prefix cache with AdapterDrop, fusion (a tagger's and over a tagger's adapter),
save / load, and prediction on a split and on raw text (every word tagged once, windows joined). The workflows that
treat every windowed kind alike (adding a task, the prefix cache, fusion) run for a QA task too."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from mtl import model_files
from mtl.backbone import load_tokenizer
from mtl.data.module import TaskDataModule
from mtl.kinds.word_windows import encode_words, split_words
from mtl.kinds.entities import entity_counts, scores
from mtl.lit import AdapterTrainer
from mtl.model import MTLModel
from mtl.predict import PredictionWriter
from tests.test_prefix_cache import LossRecorder


def _trainer(epochs: int = 2, **kwargs) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0, **kwargs)


def _data(tiny_dir, task_dir, tmp_path, tasks, **kwargs) -> TaskDataModule:
    return TaskDataModule(tasks, backbone=str(tiny_dir), tasks_dir=str(task_dir), batch_size=16,
                          cache_dir=str(tmp_path / "cache"), **kwargs)


def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _predict(module, data, out) -> list[dict]:
    trainer = L.Trainer(logger=False, enable_progress_bar=False, callbacks=[PredictionWriter(str(out))])
    trainer.predict(module, datamodule=data, return_predictions=False)
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_joint_training_with_a_classifier_scores_whole_sentences_as_predict_tags_them(tiny_dir, task_dir, tmp_path):
    module = AdapterTrainer(["keyword", "tagger"], backbone=str(tiny_dir), tasks_dir=str(task_dir),
                            run_dir=str(tmp_path / "run"), lr=3e-2)
    data = _data(tiny_dir, task_dir, tmp_path, ["keyword", "tagger"])
    trainer = _trainer(epochs=6)
    trainer.fit(module, datamodule=data)
    metrics = trainer.callback_metrics
    assert torch.isclose(metrics["val/avg/score"], (metrics["val/keyword/acc"] + metrics["val/tagger/f1"]) / 2)
    assert metrics["val/tagger/f1"] > 0.5  # the KEY words are learnt
    # every batch was one task's (the sampler's promise) and the tagger's f1 equals the entity F1 of its predictions
    module.eval()
    rows = _predict(module, _data(tiny_dir, task_dir, tmp_path, [], eval_tasks=["tagger"], predict_split="validation"),
                    tmp_path / "val.jsonl")
    raw = data._raw["tagger"]["validation"]
    gold = [[["O", "B-KEY", "I-KEY"][t] for t in tags] for tags in raw["label"]]
    assert [r["index"] for r in rows] == list(range(len(gold)))
    assert all(r["words"] == words for r, words in zip(rows, raw["tokens"]))
    trainer.validate(module, datamodule=data, verbose=False)
    expected = scores(*entity_counts(gold, [r["label"] for r in rows]))["f1"]
    assert abs(float(trainer.callback_metrics["val/tagger/f1"]) - expected) < 1e-6


def test_long_sentences_become_windows_and_every_word_is_predicted_once(tiny_dir, task_dir, tmp_path):
    run = tmp_path / "run"
    model = MTLModel(str(tiny_dir))
    model.add_task("tagger", 3, problem="token_classification", pooling="none", labels=["O", "B-KEY", "I-KEY"])
    with torch.no_grad():
        for p in model.task_parameters("tagger").values():
            p.normal_(0, 0.3)
    model_files.save_task(model, "tagger", run / "adapters")
    model.eval()
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tagger.yaml").write_text((task_dir / "tagger.yaml").read_text().replace("max_length: 16", "max_length: 6").replace("doc_stride: 4", "doc_stride: 2")
                                       .replace("tagger.jsonl", str(task_dir / "tagger.jsonl")))
    module = AdapterTrainer([], backbone=str(tiny_dir), tasks_dir=str(tasks), run_dir=str(run), load_from=str(run))
    data = TaskDataModule([], backbone=str(tiny_dir), tasks_dir=str(tasks), eval_tasks=["tagger"], eval_batch_size=5,
                          cache_dir=str(tmp_path / "cache"), predict_split="validation")
    rows = _predict(module, data, tmp_path / "pred.jsonl")
    windows = data.task_datasets["tagger"]["validation"]
    assert len(windows) > len(rows)  # some sentences were split (6 subwords: 4 words and the special tokens)
    tokenizer = load_tokenizer(str(tiny_dir))
    for row, words in zip(rows, data._raw["tagger"]["validation"]["tokens"]):
        assert row["words"] == words and len(row["label"]) == len(words) == len(row["score"])
        # each word's tag is the one its owning window gives at the word's first subword
        for window in encode_words(tokenizer, words, None, 6, 2):
            ids = torch.tensor([window.input_ids])
            probs = model(ids, torch.ones_like(ids), tasks="tagger")["tagger"][0].softmax(-1)
            for word, position in window.owned:
                assert row["label"][word] == ["O", "B-KEY", "I-KEY"][int(probs[position].argmax())]
                assert abs(row["score"][word] - float(probs[position].max())) < 1e-5


def test_raw_text_is_tagged_per_word_with_entity_offsets_beside_a_classifier(tiny_dir, task_dir, tmp_path):
    run = tmp_path / "run"
    model = MTLModel(str(tiny_dir))
    model.add_task("keyword", 2, labels=["bad", "good"])
    model.add_task("tagger", 3, problem="token_classification", pooling="none", labels=["O", "B-KEY", "I-KEY"])
    with torch.no_grad():
        for task in model.tasks:
            for p in model.task_parameters(task).values():
                p.normal_(0, 0.5)
    for task in model.tasks:
        model_files.save_task(model, task, run / "adapters")
    model.eval()
    texts = tmp_path / "in.txt"
    lines = ["alpha, good river!", "Stone's  well-known cloud (seven)."]
    texts.write_text("\n".join(lines) + "\n")
    module = AdapterTrainer([], backbone=str(tiny_dir), tasks_dir=str(task_dir), run_dir=str(run), load_from=str(run))
    rows = _predict(module, _data(tiny_dir, task_dir, tmp_path, [], predict_file=str(texts)), tmp_path / "p.jsonl")
    assert sorted((r["task"], r["index"]) for r in rows) == [(t, i) for t in ("keyword", "tagger") for i in range(2)]
    tokenizer = load_tokenizer(str(tiny_dir))
    for row in (r for r in rows if r["task"] == "tagger"):
        text = lines[row["index"]]
        words, offsets = split_words(text)
        assert row["text"] == text and row["words"] == words
        assert words == (["alpha", ",", "good", "river", "!"] if row["index"] == 0 else
                         ["Stone's", "well-known", "cloud", "(", "seven", ")", "."])
        enc = tokenizer(words, is_split_into_words=True, return_tensors="pt")
        probs = model(enc["input_ids"], enc["attention_mask"], tasks="tagger")["tagger"][0].softmax(-1)
        first = [enc.word_ids().index(w) for w in range(len(words))]
        assert row["label"] == [["O", "B-KEY", "I-KEY"][int(probs[p].argmax())] for p in first]
        for entity in row["entities"]:
            a, b = entity["words"]
            assert entity["text"] == text[entity["start"]:entity["end"]] == text[offsets[a][0]:offsets[b - 1][1]]
            assert row["label"][a] == "B-KEY" or row["label"][a] == "I-KEY"


# a windowed task of each kind: (task, its problem, validation metrics it logs)
WINDOWED = [("tagger", "token_classification", {"f1", "acc"}), ("qa", "extractive_qa", {"f1", "exact"}),
            ("choice", "multiple_choice", {"acc"})]
HEADLINE = {"tagger": "f1", "qa": "f1", "choice": "acc", "keyword": "acc"}


@pytest.mark.parametrize("task, problem, metrics", WINDOWED, ids=["tagger", "qa", "choice"])
def test_a_windowed_task_added_to_a_trained_system_leaves_it_untouched_and_reloads_exactly(task, problem, metrics,
                                                                                            tiny_dir, task_dir, tmp_path):
    run = tmp_path / "run"
    first = AdapterTrainer(["keyword"], backbone=str(tiny_dir), tasks_dir=str(task_dir), run_dir=str(run))
    _trainer(epochs=1).fit(first, datamodule=_data(tiny_dir, task_dir, tmp_path, ["keyword"]))
    before = _files(run / "adapters" / "keyword")
    second = AdapterTrainer([task], backbone=str(tiny_dir), tasks_dir=str(task_dir), run_dir=str(run),
                            load_from=str(run), eval_tasks=["keyword"], lr=1e-2)
    trainer = _trainer(epochs=1)
    data = _data(tiny_dir, task_dir, tmp_path, [task], eval_tasks=["keyword"])
    trainer.fit(second, datamodule=data)
    assert {"val/keyword/acc", *(f"val/{task}/{m}" for m in metrics)} <= set(trainer.callback_metrics)
    assert _files(run / "adapters" / "keyword") == before
    reloaded = MTLModel.from_pretrained(run, backbone=str(tiny_dir)).eval()
    assert reloaded.heads[task].problem == problem
    second.model.eval()
    batch = next(iter(data.val_dataloader()[0]))
    args = (batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
    assert torch.equal(reloaded(*args, tasks=task)[task], second.model(*args, tasks=task)[task])
    saved = tmp_path / "saved"
    reloaded.save_pretrained(saved)
    again = MTLModel.from_pretrained(saved, backbone=str(tiny_dir)).eval()
    assert torch.equal(again(*args, tasks=task)[task], second.model(*args, tasks=task)[task])


@pytest.mark.parametrize("task", ["tagger", "qa", "choice"])
def test_the_prefix_cache_with_adapterdrop_trains_a_windowed_task_as_without_it(task, tiny_dir, task_dir, tmp_path):
    def run(folder, **kwargs):
        L.seed_everything(0)
        module = AdapterTrainer([task], backbone=str(tiny_dir), tasks_dir=str(task_dir), run_dir=str(folder),
                                export=False, lr=5e-3, adapter={"type": "pfeiffer", "drop_first": 1}, **kwargs)
        recorder = LossRecorder()
        trainer = _trainer(epochs=2, callbacks=[recorder])
        trainer.fit(module, datamodule=_data(tiny_dir, task_dir, folder, [task]))
        return recorder.losses, trainer

    plain, _ = run(tmp_path / "plain")
    cached, trainer = run(tmp_path / "cached", cache_frozen_prefix=True)
    assert len(plain) == len(cached) > 10
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(plain), rtol=1e-4, atol=1e-5)
    assert trainer.callback_metrics["cache/hit_rate"] == 1.0


@pytest.mark.parametrize("task", ["tagger", "qa", "choice"])
def test_fusion_with_a_windowed_target_and_a_classifier_fused_over_its_adapter(task, tiny_dir, task_dir, tmp_path):
    run = tmp_path / "run"
    for name in ("keyword", task):
        module = AdapterTrainer([name], backbone=str(tiny_dir), tasks_dir=str(task_dir), run_dir=str(run),
                                load_from=str(run) if name == task else None, lr=1e-2)
        _trainer(epochs=1).fit(module, datamodule=_data(tiny_dir, task_dir, tmp_path, [name]))
    before = _files(run / "adapters")
    for target, name in ((task, "own_fusion"), ("keyword", "key_fusion")):
        fusion = {"name": name, "adapters": ["keyword", task], "config": {"type": "dynamic"}}
        module = AdapterTrainer([target], backbone=str(tiny_dir), tasks_dir=str(task_dir), run_dir=str(run),
                                load_from=str(run), fusion=fusion, lr=5e-3)
        trainer = _trainer(epochs=1)
        data = _data(tiny_dir, task_dir, tmp_path, [target])
        trainer.fit(module, datamodule=data)
        assert f"val/{name}/{HEADLINE[target]}" in trainer.callback_metrics
        assert module.model.heads[name].problem == module.model.heads[target].problem
        reloaded = MTLModel.from_pretrained(run, backbone=str(tiny_dir)).eval()
        module.model.eval()
        batch = next(iter(data.val_dataloader()[0]))
        args = (batch["input_ids"], batch["attention_mask"])
        assert torch.equal(reloaded(*args, tasks=name)[name], module.model(*args, tasks=name)[name])
    assert _files(run / "adapters") == before


def test_routed_predict_tags_the_words_of_the_texts_a_router_sends_to_a_tagger(tiny_dir, task_dir, tmp_path):
    from mtl.routing.base import rows_of

    class FixedRouter:
        """Sends the texts to the given tasks in turn (which task a router picks is tested in test_routing)."""

        def routed_logits(self, model, input_ids, attention_mask=None, token_type_ids=None):
            chosen = [ORDER[i % len(ORDER)] for i in range(len(input_ids))]
            logits = model(input_ids, attention_mask, token_type_ids, row_tasks=chosen)
            return chosen, rows_of(chosen, logits)

    ORDER = ["tagger", "keyword"]
    run = tmp_path / "run"
    model = MTLModel(str(tiny_dir))
    model.add_task("keyword", 2, labels=["bad", "good"])
    model.add_task("tagger", 3, problem="token_classification", pooling="none", labels=["O", "B-KEY", "I-KEY"])
    for task in model.tasks:
        model_files.save_task(model, task, run / "adapters")
    lines = ["alpha, good river!", "stone cloud", "seven table beta delta gamma"]
    texts = tmp_path / "in.txt"
    texts.write_text("\n".join(lines) + "\n")
    module = AdapterTrainer([], backbone=str(tiny_dir), tasks_dir=str(task_dir), run_dir=str(run), load_from=str(run))
    module.router = FixedRouter()
    rows = _predict(module, _data(tiny_dir, task_dir, tmp_path, [], predict_file=str(texts)), tmp_path / "p.jsonl")
    assert [(r["index"], r["task"]) for r in rows] == [(0, "tagger"), (1, "keyword"), (2, "tagger")]
    for row in rows:
        if row["task"] == "tagger":  # a tag per word of the text, as without a router
            assert row["words"] == split_words(lines[row["index"]])[0] and len(row["label"]) == len(row["words"])
        else:
            assert row["label"] in ("bad", "good") and isinstance(row["score"], float)


def test_the_sampler_weights_tasks_by_examples_not_by_the_windows_a_long_sentence_makes(tiny_dir, task_dir, tmp_path):
    from mtl.data.sampling import task_probabilities

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tagger.yaml").write_text((task_dir / "tagger.yaml").read_text().replace("max_length: 16", "max_length: 6")
                                       .replace("doc_stride: 4", "doc_stride: 2")
                                       .replace("tagger.jsonl", str(task_dir / "tagger.jsonl")))
    (tasks / "keyword.yaml").write_text((task_dir / "keyword.yaml").read_text().replace(
        "keyword.csv", str(task_dir / "keyword.csv")))
    data = _data(tiny_dir, tasks, tmp_path, ["keyword", "tagger"])
    data.setup("fit")
    windows = data.task_datasets["tagger"]["train"]
    sentences = len(set(windows["example"]))
    assert len(windows) > sentences  # some sentences are two windows or more
    sampler = data.train_dataloader().batch_sampler
    keyword = len(data.task_datasets["keyword"]["train"])
    assert sampler.probs == pytest.approx(task_probabilities([keyword, sentences]))


def test_a_taggers_training_loss_divides_its_words_by_the_mean_count_per_batch_not_the_batchs_own(
        tiny_dir, task_dir, tmp_path):
    from torch.nn import functional as F

    from mtl.kinds import kind_of

    data = _data(tiny_dir, task_dir, tmp_path, ["keyword", "tagger"])
    data.setup("fit")
    rows = data.task_datasets["tagger"]["train"]
    words = sum(sum(t != -100 for t in labels) for labels in rows["labels"])  # every word labelled once
    assert words == sum(len(tags) for tags in data._raw_dataset("tagger")["train"]["label"])
    expected = words / len(rows) * 16
    seen = set()
    for batch in data.train_dataloader():
        seen.add(batch["task"])
        if batch["task"] == "keyword":
            assert "loss_per_batch" not in batch  # one term per row: the batch's mean stays right
            continue
        assert batch["loss_per_batch"] == pytest.approx(expected)
        logits = torch.randn(*batch["labels"].shape, 3)
        kind = kind_of("token_classification")
        flat, target = logits.reshape(-1, 3), batch["labels"].reshape(-1)
        by_hand = F.cross_entropy(flat, target, ignore_index=-100, reduction="sum") / expected
        assert torch.allclose(kind.loss(logits, batch["labels"], batch["loss_per_batch"]), by_hand)
        assert torch.allclose(kind.loss(logits, batch["labels"]), F.cross_entropy(flat, target, ignore_index=-100))
    assert seen == {"keyword", "tagger"}
    assert "loss_per_batch" not in next(iter(data.val_dataloader()[1]))  # validation losses stay per-batch means
