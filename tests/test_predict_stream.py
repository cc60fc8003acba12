"""Streamed prediction: the file is read lazily, rows are written batch by batch to a temp file renamed at the end."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from mtl.data.module import TaskCollator, TaskDataModule
from mtl.data.predict_input import MODEL_INPUTS, TextStream, iter_predict_texts
from mtl.errors import MTLConfigError
from mtl.lit import AdapterTrainer
from mtl.predict import FIELDS, PredictionWriter
from tests.conftest import export_random_tasks

TEXTS = ["alpha good river", "red stone, \"cloud\"", "beta bad", "café ünïcode pink", "gamma delta seven",
         "blue table", "good good good", "x", "stone river green", "the last one"]


@pytest.fixture(scope="module")
def run(tiny_dir, tmp_path_factory) -> Path:
    """An exported run with two tasks whose adapters and heads are random (so rows differ per text)."""
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    export_random_tasks(tiny_dir, run)
    return run


def _module(run: Path, tiny_dir, task_dir) -> AdapterTrainer:
    return AdapterTrainer([], backbone=str(tiny_dir), tasks_dir=str(task_dir), run_dir=str(run), load_from=str(run))


def _data(tiny_dir, task_dir, tmp_path, **kwargs) -> TaskDataModule:
    kwargs.setdefault("eval_batch_size", 3)
    return TaskDataModule(kwargs.pop("tasks", []), backbone=str(tiny_dir), tasks_dir=str(task_dir),
                          cache_dir=str(tmp_path / "cache"), **kwargs)


def _trainer(*callbacks) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     use_distributed_sampler=False, callbacks=list(callbacks))


def _write_input(path: Path) -> None:
    if path.suffix == ".jsonl":
        lines = [json.dumps({"text": f"  {t} ", "id": i}) for i, t in enumerate(TEXTS)]
    else:
        lines = [f"  {t}\t" for t in TEXTS]
    lines[3:3] = ["", "   "]  # blank lines are skipped and do not count in index
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode("utf-8") + b"\n\n")


def _old_bytes(rows: list[dict], suffix: str) -> bytes:
    """The bytes the previous writer produced for these rows (everything in memory, written once)."""
    buffer = io.StringIO()
    if suffix == ".csv":
        writer = csv.DictWriter(buffer, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    else:
        for row in rows:
            buffer.write(json.dumps(row, ensure_ascii=False) + "\n")
    return buffer.getvalue().encode("utf-8")


def _old_file_loader(data: TaskDataModule) -> DataLoader:
    """The previous input path: every text read and tokenised up front, a map-style dataset."""
    texts = list(iter_predict_texts(data.predict_file))
    enc = data.tokenizer(texts, truncation=True, max_length=data.predict_max_length)
    items = [{**{k: enc[k][i] for k in MODEL_INPUTS if k in enc}, "index": i, "text": t, "task": None}
             for i, t in enumerate(texts)]
    return DataLoader(items, batch_size=data.eval_batch_size, collate_fn=TaskCollator(data.tokenizer, {}))


@pytest.mark.parametrize("source", ["in.txt", "in.jsonl"])
@pytest.mark.parametrize("output", ["pred.jsonl", "pred.csv"])
def test_streamed_output_equals_the_in_memory_output(run, tiny_dir, task_dir, tmp_path, source, output):
    _write_input(tmp_path / source)
    module = _module(run, tiny_dir, task_dir)
    data = _data(tiny_dir, task_dir, tmp_path, predict_file=str(tmp_path / source))
    batches = _trainer().predict(module, dataloaders=_old_file_loader(data), return_predictions=True)
    expected = [row for batch in batches for row in batch]
    assert [r["text"] for r in expected if r["task"] == "keyword"] == TEXTS  # the reference reads what we meant
    out = tmp_path / output
    assert _trainer(PredictionWriter(str(out))).predict(module, datamodule=data) is None  # rows are not kept
    assert out.read_bytes() == _old_bytes(expected, out.suffix)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == sorted([source, output])


def test_task_split_output_is_unchanged(run, tiny_dir, task_dir, tmp_path):
    """Without predict_file: one loader per task over predict_split, rows in loader then batch order, as before."""
    module = _module(run, tiny_dir, task_dir)
    data = _data(tiny_dir, task_dir, tmp_path, tasks=["keyword", "colour"], predict_split="validation",
                 max_eval_examples=10)
    per_loader = _trainer().predict(module, datamodule=data, return_predictions=True)
    expected = [row for loader in per_loader for batch in loader for row in batch]
    assert [r["task"] for r in expected] == ["keyword"] * 10 + ["colour"] * 10  # one loader, then the next
    out = tmp_path / "pred.csv"
    _trainer(PredictionWriter(str(out))).predict(module, datamodule=data)
    assert out.read_bytes() == _old_bytes(expected, ".csv")


class _Spy(L.Callback):
    """After the writer: what the output folder holds at the end of each batch."""

    def __init__(self, out: Path) -> None:
        self.out, self.seen = out, []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        temps = sorted(self.out.parent.glob(f".{self.out.name}.*.tmp"))
        self.seen.append((self.out.read_bytes() if self.out.exists() else None, [t.stat().st_size for t in temps]))


def test_rows_are_written_batch_by_batch_and_renamed_at_the_end(run, tiny_dir, task_dir, tmp_path, capsys):
    _write_input(tmp_path / "in.txt")
    out = tmp_path / "pred.jsonl"
    out.write_text("old\n")
    leftover = tmp_path / ".pred.jsonl.deadbeef.tmp"  # what a killed run leaves
    leftover.write_text("half")
    spy = _Spy(out)
    data = _data(tiny_dir, task_dir, tmp_path, predict_file=str(tmp_path / "in.txt"))
    _trainer(PredictionWriter(str(out), overwrite=True), spy).predict(_module(run, tiny_dir, task_dir), datamodule=data)
    assert len(spy.seen) == 4  # 10 examples, batches of 3
    assert all(content == b"old\n" for content, _ in spy.seen)  # the target is replaced only at the end
    sizes = [temps for _, temps in spy.seen]
    assert all(len(temps) == 1 for temps in sizes)  # the leftover is gone, our temp file is there
    assert sizes[0][0] > 0 and all(a[0] < b[0] for a, b in zip(sizes, sizes[1:]))  # it grows with every batch
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(out.read_bytes()) == sizes[-1][0] and len(lines) == 2 * len(TEXTS)
    assert [json.loads(line)["index"] for line in lines[:6]] == [0, 1, 2] * 2  # both tasks for batch 0, then batch 1
    assert not list(tmp_path.glob(".pred.jsonl.*"))
    captured = capsys.readouterr()
    assert f"wrote {2 * len(TEXTS)} predictions -> {out}" in captured.out
    assert f"warning: {leftover}: left over from an interrupted prediction run; removing it" in captured.err


def _deep_bad_jsonl(path: Path, bad_line: int, lines: int = 60) -> None:
    rows = [json.dumps({"text": f"row {n}"}) if n != bad_line else '{"text": "broken' for n in range(1, lines + 1)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


def test_bad_jsonl_line_deep_in_the_file_is_found_before_any_work(run, tiny_dir, task_dir, tmp_path):
    path = tmp_path / "in.jsonl"
    _deep_bad_jsonl(path, 47)
    # lazily read: the first texts come out before the bad line is reached
    assert [next(texts) for texts in [iter_predict_texts(path)] for _ in range(3)] == ["row 1", "row 2", "row 3"]
    data = _data(tiny_dir, task_dir, tmp_path, predict_file=str(path))
    with pytest.raises(MTLConfigError) as err:
        data.check_before("predict")
    assert str(err.value) == (f"{path}: line 47: invalid JSON (Unterminated string starting at), "
                              "expected one JSON object per line")
    out = tmp_path / "pred.jsonl"
    writer, spy = PredictionWriter(str(out)), _Spy(out)
    with pytest.raises(MTLConfigError, match="line 47: invalid JSON"):  # without the preflight: when loaders are made
        _trainer(writer, spy).predict(_module(run, tiny_dir, task_dir), datamodule=data)
    assert spy.seen == [] and not out.exists() and not list(tmp_path.glob(".pred.jsonl*"))


def test_bad_line_met_while_streaming_leaves_no_output_and_no_temp_file(run, tiny_dir, task_dir, tmp_path):
    """The file changes after it was checked: the error stops the run mid-way; the partial rows are discarded."""
    path = tmp_path / "in.jsonl"
    _deep_bad_jsonl(path, 0)
    data = _data(tiny_dir, task_dir, tmp_path, predict_file=str(path))
    data.check_before("predict")
    _deep_bad_jsonl(path, 47)
    out = tmp_path / "pred.csv"
    spy = _Spy(out)
    with pytest.raises(MTLConfigError) as err:
        _trainer(PredictionWriter(str(out)), spy).predict(_module(run, tiny_dir, task_dir), datamodule=data)
    assert str(err.value).startswith(f"{path}: line 47: invalid JSON") and "\n" not in str(err.value)
    # 46 good rows make 15 full batches; Lightning fetches one batch ahead, so 14 were written when the error came
    assert len(spy.seen) == 14 and all(content is None and len(temps) == 1 for content, temps in spy.seen)
    assert spy.seen[-1][1][0] > spy.seen[0][1][0] > 0
    assert not out.exists() and not list(tmp_path.glob(".pred.csv*"))


def test_utf8_errors_keep_their_byte_offset(tmp_path):
    path = tmp_path / "in.txt"
    path.write_bytes(b"\xef\xbb\xbfab\n\ncaf\xe9\n")
    with pytest.raises(MTLConfigError) as err:
        list(iter_predict_texts(path))
    # what decoding the whole file with utf-8-sig reported: offsets after the BOM
    assert str(err.value) == f"{path}: not UTF-8 text (invalid continuation byte at byte 7), expected UTF-8"


def test_workers_keep_the_file_order(tiny_dir, tmp_path):
    from mtl.backbone import load_tokenizer

    path = tmp_path / "in.txt"
    path.write_text("".join(f"line {i}\n" + ("\n" if i % 4 == 0 else "") for i in range(23)), encoding="utf-8")
    stream = TextStream(path, "text", load_tokenizer(str(tiny_dir)), 16, 5)
    one = [(item["index"], item["text"]) for batch in DataLoader(stream, batch_size=None, collate_fn=list)
           for item in batch]
    two = [(item["index"], item["text"]) for batch in DataLoader(stream, batch_size=None, collate_fn=list,
                                                                num_workers=2) for item in batch]
    assert one == two == [(i, f"line {i}") for i in range(23)]


def test_a_lone_surrogate_deep_in_a_jsonl_file_is_found_before_any_work(tiny_dir, task_dir, tmp_path):
    """'\\ud800' is valid JSON but not a character: the tokenizer would fail on it mid-run with a TypeError."""
    path = tmp_path / "in.jsonl"
    rows = [json.dumps({"text": f"row {n}"}) for n in range(1, 61)]
    rows[46] = '{"text": "ok \\ud83d\\ude00 then a lone \\ud800 here"}'  # a full pair is fine, the lone half is not
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    data = _data(tiny_dir, task_dir, tmp_path, predict_file=str(path))
    with pytest.raises(MTLConfigError) as err:
        data.check_before("predict")
    assert str(err.value).startswith(f"{path}: line 47: 'text': holds a lone surrogate U+D800 at character 18 ")
    assert "\n" not in str(err.value)
    rows[46] = '{"text": "ok \\ud83d\\ude00 a pair"}'
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    assert list(iter_predict_texts(path))[46] == "ok \U0001F600 a pair"
