"""Prediction input from a file: ``.txt`` (one example per non-empty line) or ``.jsonl``.

Texts are tokenised in memory (no cache: the file is read once per prediction run). Pure
Python + torch's ``Dataset``; no Lightning.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from mtl.errors import MTLConfigError

PREDICT_SUFFIXES = (".txt", ".jsonl")
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def check_predict_file_name(path: str) -> None:
    """Fail early on a suffix we cannot read (the file itself is read only when predicting)."""
    if Path(path).suffix.lower() not in PREDICT_SUFFIXES:
        raise MTLConfigError(
            f"{path}: data.predict_file: unknown format '{Path(path).suffix}', expected a file ending in .txt or .jsonl"
        )


def read_predict_texts(path: str | Path, text_field: str = "text") -> list[str]:
    """The file's texts in order: non-empty lines of a .txt, ``text_field`` of each .jsonl object.

    Blank lines are skipped in both formats; texts are stripped of surrounding whitespace (as the
    training sources do). Errors name the file, and the 1-based line for .jsonl.
    """
    path = Path(path).expanduser()
    check_predict_file_name(str(path))
    if not path.is_file():
        raise MTLConfigError(f"{path}: data.predict_file: no such file, expected a .txt or .jsonl file of texts")
    try:
        # utf-8-sig: a BOM written by some editors must not become part of the first text
        content = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise MTLConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}), expected UTF-8") from None
    # split on "\n" only (not str.splitlines): line numbers then match what an editor shows
    lines = [(n, line.strip()) for n, line in enumerate(content.split("\n"), start=1)]
    lines = [(n, line) for n, line in lines if line]
    if path.suffix.lower() == ".jsonl":
        texts = [_jsonl_text(path, n, line, text_field) for n, line in lines]
    else:
        texts = [line for _, line in lines]
    if not texts:
        raise MTLConfigError(f"{path}: no examples (empty or blank lines only), expected one example per line")
    return texts


def _jsonl_text(path: Path, n: int, line: str, field: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise MTLConfigError(f"{path}: line {n}: invalid JSON ({err.msg}), expected one JSON object per line") from None
    if not isinstance(row, dict):
        raise MTLConfigError(f"{path}: line {n}: got a JSON {type(row).__name__}, expected an object with key '{field}'")
    if field not in row:
        raise MTLConfigError(
            f"{path}: line {n}: key '{field}' missing (keys: {sorted(row)}), expected the text there "
            "(or set data.predict_text_field)"
        )
    value = row[field]
    if not isinstance(value, str) or not value.strip():
        raise MTLConfigError(f"{path}: line {n}: '{field}' is {value!r}, expected a non-empty string")
    return value.strip()


class TextDataset(Dataset):
    """Texts tokenised in memory; items carry ``index`` (position in the file), ``text`` and ``task`` None."""

    def __init__(self, texts: list[str], tokenizer: Any, max_length: int) -> None:
        """Tokenise ``texts`` (truncated to ``max_length`` tokens) once, up front."""
        self.texts = texts
        enc = tokenizer(texts, truncation=True, max_length=max_length)
        self.columns = {k: enc[k] for k in MODEL_INPUTS if k in enc}

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        # task None: the batch is meant for every task of the model (the collator passes it on)
        return {**{k: v[index] for k, v in self.columns.items()}, "index": index, "text": self.texts[index], "task": None}
