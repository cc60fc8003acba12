"""benchmarks/fit_wall.py's pure parts (no fit runs here): the fixed split it materialises for both systems, the phase
arithmetic of benchmarks/fit_phases.py, and the table's medians and ratios; plus the peer script's CSV reader and
macro-F1 against what mtl logs."""

from __future__ import annotations

import dataclasses
import importlib.util
import random
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torchmetrics.classification import MulticlassF1Score

from mtl.data.sources import load_task_dataset
from mtl.data.spec import load_task_spec

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
LABELS = ["red", "blue", "pink"]
# texts a CSV round trip could change: separators, quotes, line breaks, missing-value words, numbers, non-ASCII
TRICKY = ['comma, inside', 'a "quoted" word', 'two\nlines', 'carriage\rreturn', 'NA', 'null', '12345',
          'café ünïcode', 'trailing backslash \\', "it's"]


@pytest.fixture()
def bench(monkeypatch):
    """The benchmarks folder first on sys.path, as when fit_wall.py runs; its modules imported afresh."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    for name in ("fit_wall", "fit_phases"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import fit_wall

    return fit_wall


@pytest.fixture()
def colours(tmp_path) -> Path:
    """A 'colours' task (3 unbalanced classes, 200 unique rows, train file only: mtl carves validation and test)."""
    rng = random.Random(0)
    folder = tmp_path / "tasks"
    folder.mkdir()
    rows = [(f"{TRICKY[i % len(TRICKY)]} {rng.random():.6f} {i}", LABELS[0 if i % 5 < 3 else 1 if i % 5 == 3 else 2])
            for i in range(200)]
    import csv

    with (folder / "colours.csv").open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("text", "label"), *rows])
    (folder / "colours.yaml").write_text("source: {type: files, train: colours.csv}\ntext_fields: [text]\n"
                                         f"label_field: label\nlabels: [{', '.join(LABELS)}]\nmax_length: 16\n")
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_materialise_is_repeatable_disjoint_stratified_and_read_back_exactly(bench, colours, tmp_path):
    sizes = (60, 15, 12)
    meta = bench.materialise("colours", sizes, tmp_path / "a", tasks_dir=colours)
    bench.materialise("colours", sizes, tmp_path / "b", tasks_dir=colours)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")  # byte-identical on a second call
    assert set(_files(tmp_path / "a")) == {"train.csv", "validation.csv", "test.csv", "colours.yaml", "meta.json"}
    assert meta["sizes"] == {"train": 60, "validation": 15, "test": 12}
    assert meta["labels"] == LABELS and meta["max_length"] == 16
    splits = {s: bench.read_csv_split(tmp_path / "a" / f"{s}.csv") for s in bench.SPLITS}
    assert [len(splits[s][0]) for s in bench.SPLITS] == list(sizes)
    texts = [set(splits[s][0]) for s in bench.SPLITS]
    assert all(len(t) == n for t, n in zip(texts, sizes))
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])  # disjoint
    # stratified: each class in proportion (60% / 20% / 20%) within one
    for split, n in zip(bench.SPLITS, sizes):
        counts = Counter(splits[split][1])
        assert all(abs(counts[c] - n * share) <= 1 for c, share in zip(LABELS, (0.6, 0.2, 0.2))), (split, counts)
    # the tricky texts survive the CSV both ways: mtl's reader (pandas) and the peer's (csv) see the same strings
    assert any("\n" in t for t in texts[0]) and any("\r" in t for t in texts[0]) and any('"' in t for t in texts[0])
    bench.check_readback("colours", tmp_path / "a")
    peer = _peer_module()
    for split in bench.SPLITS:
        peer_texts, peer_labels = peer.read_split(tmp_path / "a" / f"{split}.csv", LABELS)
        assert peer_texts == splits[split][0] and [LABELS[i] for i in peer_labels] == splits[split][1]


def test_materialise_uses_mtls_own_split_and_cap(bench, colours, tmp_path):
    """The train CSV is exactly what the spec's max_train_examples cap would give mtl; a split of exactly its size is
    kept whole, in mtl's order; a size beyond a split is refused."""
    bench.materialise("colours", (50, 20, 20), tmp_path / "m", tasks_dir=colours)
    spec = load_task_spec("colours", colours)
    capped = load_task_dataset(dataclasses.replace(spec, max_train_examples=50))
    whole = load_task_dataset(spec, limit=False)
    assert bench.read_csv_split(tmp_path / "m" / "train.csv")[0] == capped["train"]["text"]
    for split in ("validation", "test"):
        assert bench.read_csv_split(tmp_path / "m" / f"{split}.csv")[0] == whole[split]["text"]
    with pytest.raises(SystemExit, match="fewer than the 500"):
        bench.materialise("colours", (500, 10, 10), tmp_path / "x", tasks_dir=colours)


@pytest.mark.integration
def test_bbc_news_split_is_the_quickstarts_data(bench, tmp_path):
    meta = bench.materialise("bbc_news", bench.SIZES["bbc_news"], tmp_path / "bbc")
    assert meta["sizes"] == {"train": 1000, "validation": 212, "test": 212}
    quickstart = load_task_dataset(load_task_spec("bbc_news"))  # the spec's own caps, as the quickstart trains
    for split in bench.SPLITS:
        assert bench.read_csv_split(tmp_path / "bbc" / f"{split}.csv")[0] == quickstart[split]["text"]


def test_parse_variants_and_sizes(bench):
    assert bench.parse_variants(None, {"default": ""}, "--variant") == {"default": ""}
    assert bench.parse_variants(["default=", "fp32=--trainer.precision 32-true"], {}, "--variant") == {
        "default": "", "fp32": "--trainer.precision 32-true"}
    for bad in (["noequals"], ["a=x", "a=y"], ["bad name=x"]):
        with pytest.raises(SystemExit):
            bench.parse_variants(bad, {}, "--variant")
    assert bench._glue(["--mtl-args", "--data.group_by_length=false", "--variant", "a=--x", "--smoke"]) == [
        "--mtl-args=--data.group_by_length=false", "--variant=a=--x", "--smoke"]
    assert bench.parse_sizes(["bbc_news=10/5/5"], ["bbc_news", "language_id"], False) == {
        "bbc_news": (10, 5, 5), "language_id": (2000, 500, 585)}
    assert bench.parse_sizes(None, ["x"], True) == {"x": (64, 32, 32)}
    with pytest.raises(SystemExit, match="no sizes"):
        bench.parse_sizes(None, ["unknown_task"], False)


def test_summary_line_scores(bench):
    line = ("fit: 3 epochs, 96 steps in 2 min 01 s; best val/avg/score 0.962 (run/best.ckpt); "
            "test (best checkpoint, 5 s): bbc_news acc 0.981 f1 0.982; exported bbc_news -> run/adapters/bbc_news")
    assert bench.summary_test_scores(line, "bbc_news") == {"acc": 0.981, "f1": 0.982}
    assert bench.summary_test_scores(line.replace("bbc_news acc", "a acc 0.5 f1 0.4, bbc_news acc"), "bbc_news") == {
        "acc": 0.981, "f1": 0.982}
    assert bench.summary_test_scores("fit: 1 epoch; exported x -> y", "bbc_news") == {}


def test_phases_split_one_processs_record(bench):
    from fit_phases import phases

    launch = 1000.0
    record = {
        "events": [["setup", 1010.0], ["validation_start", 1011.0], ["validation_end", 1012.0],  # sanity check
                   ["train_epoch_start", 1012.0], ["validation_start", 1030.0], ["validation_end", 1034.0],
                   ["train_epoch_end", 1035.0], ["train_epoch_start", 1035.0], ["validation_start", 1050.0],
                   ["validation_end", 1053.0], ["train_epoch_end", 1054.0], ["fit_end", 1054.5],
                   ["test_start", 1056.0], ["test_end", 1060.0]],
        "spans": [["data", 1004.0, 1006.0], ["data", 1008.0, 1009.0], ["checkpoint", 1034.0, 1034.5],
                  ["checkpoint", 1053.0, 1053.5], ["export", 1054.5, 1055.5]],
    }
    out = phases(record, launch, wall=62.0)
    assert out["data"] == pytest.approx(3.0)
    assert out["startup"] == pytest.approx(10.0 - 3.0)  # launch -> setup, less data
    assert out["validation"] == pytest.approx(1.0 + 4.0 + 3.0)
    assert out["train"] == pytest.approx((23.0 - 4.0 - 0.5) + (19.0 - 3.0 - 0.5))
    assert out["test"] == pytest.approx(4.0)
    assert out["export"] == pytest.approx(1.0 + 0.5 + 0.5)
    assert sum(out.values()) == pytest.approx(62.0)  # "other" is the rest of the wall time
    assert out["other"] == pytest.approx(62.0 - 7.0 - 3.0 - 34.0 - 8.0 - 4.0 - 2.0)


def _row(system, variant, wall, acc=0.9, f1=0.8, error=None, **phases):
    split = {p: phases.get(p, 1.0) for p in ("startup", "data", "train", "validation", "test", "export", "other")}
    row = {"task": "t", "system": system, "variant": variant, "wall_s": wall, "test_acc": acc, "test_f1": f1,
           "phases": split}
    if system == "mtl":
        row["precision"] = "bf16-mixed"
    if error:
        row = {"task": "t", "system": system, "variant": variant, "wall_s": wall, "error": error}
    return row


def test_summary_medians_ratios_and_table(bench):
    rows = [_row("mtl", "default", 5.5, train=3.0), _row("adapterhub", "default", 10.0, acc=0.8),
            _row("mtl", "fp32", 9.0, acc=0.91), _row("adapterhub", "default", 12.0, acc=0.8),
            _row("mtl", "default", 5.0, train=2.0), _row("mtl", "fp32", 8.0, acc=0.93),
            _row("adapterhub", "default", 11.0, acc=0.8), _row("mtl", "default", 6.0, train=4.0),
            _row("mtl", "fp32", 99.0, error="fit exited 1"), {**_row("mtl", "default", 1.0), "task": "other"}]
    summary = bench.summarise(rows, "t")
    assert [(e["system"], e["variant"]) for e in summary] == [("adapterhub", "default"), ("mtl", "default"),
                                                              ("mtl", "fp32")]
    peer, default, fp32 = summary
    assert peer["median_wall_s"] == 11.0 and peer["ratio"] == 1.0 and peer["rounds"] == 3
    assert default["median_wall_s"] == 5.5 and default["ratio"] == pytest.approx(0.5)
    assert default["phases"]["train"] == 3.0 and default["phases"]["data"] == 1.0
    assert fp32["rounds"] == 2 and fp32["failed"] == 1  # the failed row is counted, not measured
    assert fp32["median_wall_s"] == 8.5 and fp32["ratio"] == pytest.approx(8.5 / 11.0)
    table = bench.format_table("t", summary, (10, 5, 5))
    lines = table.splitlines()
    assert lines[0] == "### t (10 / 5 / 5)"
    assert "| adapterhub / default | 3 | 11.0 | 1.00 | 0.800 | 0.800 |" in table
    assert "| mtl / default [bf16-mixed] | 3 | 5.5 | 0.50 | 0.900 | 0.800 | 1.0 | 1.0 | 3.0 |" in table
    assert "| mtl / fp32 [bf16-mixed] | 2 (1 failed) | 8.5 | 0.77 | 0.920 (0.910-0.930) |" in table
    # without a peer row: no ratio
    alone = bench.summarise([r for r in rows if r["system"] == "mtl"], "t")
    assert [e["ratio"] for e in alone] == [None, None]
    assert "| - |" in bench.format_table("t", alone)


def _peer_module():
    spec = importlib.util.spec_from_file_location("adapterhub_fit", BENCHMARKS / "peers" / "adapterhub_fit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peer_macro_f1_is_what_mtl_logs():
    """The peer's macro-F1 equals torchmetrics' MulticlassF1Score(average='macro'), mtl's f1, also with a class that
    neither the predictions nor the labels hold."""
    peer = _peer_module()
    rng = random.Random(1)
    for classes, seen in ((2, 2), (5, 5), (8, 6)):
        golds = [rng.randrange(seen) for _ in range(97)]
        preds = [g if rng.random() < 0.7 else rng.randrange(seen) for g in golds]
        ref = MulticlassF1Score(classes, average="macro")(torch.tensor(preds), torch.tensor(golds)).item()
        assert peer.macro_f1(preds, golds, classes) == pytest.approx(ref, abs=1e-6)
