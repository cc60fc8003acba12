"""Prediction input from a file: ``.txt`` (one example per non-empty line) or ``.jsonl``.

A ``.jsonl`` row is a text (under the text field), or a question: an object with ``question`` and ``context`` strings
(for question-answering tasks) or with ``question`` and ``choices`` (and an optional ``context``: for multiple-choice
tasks). A file holds one form throughout, as its first row does.

The file is streamed: read line by line and tokenised one batch at a time, so memory does not grow with the file.
Pure Python + torch's ``IterableDataset``; no Lightning.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from mtl.errors import MTLConfigError
from mtl.kinds.base import FORM_NAMES, FORMS, MODEL_INPUTS, OPTIONAL_KEYS, check_encodable, example_form, read_example

PREDICT_SUFFIXES = (".txt", ".jsonl")


def check_predict_file_name(path: str) -> None:
    """Fail early on a suffix we cannot read (the file itself is read only when predicting)."""
    if Path(path).suffix.lower() not in PREDICT_SUFFIXES:
        raise MTLConfigError(
            f"{path}: data.predict_file: unknown format '{Path(path).suffix}', expected a file ending in .txt or .jsonl"
        )


def iter_predict_texts(path: str | Path, text_field: str = "text") -> Iterator[str | dict[str, str]]:
    """The file's texts in order, read lazily: non-empty lines of a .txt, ``text_field`` of each .jsonl object (or its
    question, in a file of questions: see `mtl.kinds.base.read_example`).

    Blank lines are skipped in both formats; texts are stripped of surrounding whitespace (as the
    training sources do). Errors name the file, and the 1-based line for .jsonl and for a text the tokenizer
    cannot encode (a lone surrogate); a file without examples is an error once it has been read to the end.
    """
    path = Path(path).expanduser()
    check_predict_file_name(str(path))
    if not path.is_file():
        raise MTLConfigError(f"{path}: data.predict_file: no such file, expected a .txt or .jsonl file of texts")
    jsonl, count, offset, first = path.suffix.lower() == ".jsonl", 0, 0, None
    # binary lines split on b"\n" only (not str.splitlines): line numbers then match what an editor shows
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            if n == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]  # utf-8-sig: a BOM must not become part of the first text
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as err:
                # byte offsets count from after the BOM, as decoding the whole file with utf-8-sig did
                raise MTLConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {offset + err.start}), "
                                     "expected UTF-8") from None
            offset += len(raw)
            if line:
                count += 1
                text = _jsonl_text(path, n, line, text_field) if jsonl else line
                form = example_form(text)
                first = first or form
                if form != first:
                    raise MTLConfigError(f"{path}: line {n}: a row of {FORM_NAMES[form]} in a file of "
                                         f"{FORM_NAMES[first]} (as its first row), expected one form throughout")
                if form == "text":
                    yield check_encodable(text, f"{path}: line {n}" + (f": '{text_field}'" if jsonl else ""))
                else:
                    yield text
    if not count:
        raise MTLConfigError(f"{path}: no examples (empty or blank lines only), expected one example per line")


def count_predict_examples(path: str | Path, text_field: str = "text") -> int:
    """Validate the whole file (every error `iter_predict_texts` can raise) and count its examples, keeping no text."""
    # a cheap first pass: mistakes are found before any work starts, at the cost of reading the file twice
    return sum(1 for _ in iter_predict_texts(path, text_field))


def file_form(path: str | Path, text_field: str = "text") -> str:
    """The form of the file's examples (`mtl.kinds.base.FORMS`: ``text``, ``question`` or ``choices``), from its first
    row."""
    return example_form(next(iter_predict_texts(path, text_field)))


def _jsonl_text(path: Path, n: int, line: str, field: str) -> str | dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise MTLConfigError(f"{path}: line {n}: invalid JSON ({err.msg}), expected one JSON object per line") from None
    if not isinstance(row, dict):
        raise MTLConfigError(f"{path}: line {n}: got a JSON {type(row).__name__}, expected an object with key '{field}'")
    if "question" in row and ("context" in row or "choices" in row) and field not in row:  # a question
        form = example_form(row)
        # a file's row may carry more (its answers, an id): only the question's own keys are read
        return read_example({k: row[k] for k in (*FORMS[form], *OPTIONAL_KEYS[form]) if k in row}, f"{path}: line {n}")
    if field not in row:
        raise MTLConfigError(
            f"{path}: line {n}: key '{field}' missing (keys: {sorted(row)}), expected the text there "
            "(or set data.predict_text_field)"
        )
    value = row[field]
    if not isinstance(value, str) or not value.strip():
        raise MTLConfigError(f"{path}: line {n}: '{field}' is {value!r}, expected a non-empty string")
    return value.strip()


def predict_stride(max_length: int) -> int:
    """Tokens that consecutive windows of a predict file's example share: a quarter of ``max_length`` (a task spec's
    default ``doc_stride``)."""
    return max_length // 4


class TextStream(IterableDataset):
    """The file's examples as lists of ``batch_size`` items (``index``: position in the file, ``text``, ``task`` None),
    read and tokenised one batch at a time; use with ``DataLoader(batch_size=None)``."""

    def __init__(self, path: str | Path, text_field: str, tokenizer: Any, max_length: int, batch_size: int,
                 windows: Any = None) -> None:
        """Nothing is read until iteration. ``windows``: a windowed task kind (a tagger's for texts, or the kind that
        answers the file's questions) that also encodes each example as its rows (``words``), windows sharing a quarter
        of ``max_length`` (a task spec's default ``doc_stride``)."""
        self.path, self.text_field = path, text_field
        self.tokenizer, self.max_length, self.batch_size = tokenizer, max_length, batch_size
        self.windows = windows

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        texts = iter_predict_texts(self.path, self.text_field)
        # every worker reads the file but tokenises only every workers-th batch; the DataLoader takes the workers'
        # batches in turn, so the order is the file's
        for number, chunk in enumerate(iter(lambda: list(islice(texts, self.batch_size)), [])):
            if number % workers == worker:
                yield self._items(chunk, number * self.batch_size)

    def _items(self, texts: list[Any], start: int) -> list[dict[str, Any]]:
        # task None: the batch is meant for every task of the model that reads such examples (the collator passes it on)
        items: list[dict[str, Any]] = [{"index": start + i, "text": text, "task": None} for i, text in enumerate(texts)]
        if isinstance(texts[0], str):  # texts: one encoder row each for the tasks that read one text
            enc = self.tokenizer(texts, truncation=True, max_length=self.max_length)
            for i, item in enumerate(items):
                item.update({k: enc[k][i] for k in MODEL_INPUTS if k in enc})
        if self.windows is not None:
            for item, text in zip(items, texts):
                item["words"] = self.windows.encode_text(self.tokenizer, text, self.max_length,
                                                         predict_stride(self.max_length))
        return items
