"""Files of words with one tag each: CoNLL column files, CoNLL-U, and JSONL with token and tag lists.

Every reader returns the file's sentences as `Sentence`s (words, tags, and the line they start on) and refuses a
malformed file with one line naming the file, the line and what was expected, before any work. Which tags a task
allows is the task kind's business, not the reader's.

- CoNLL column files (CoNLL-2000/2003 style): whitespace-separated columns, one word per line, a blank line between
  sentences; ``-DOCSTART-`` lines are skipped. The word and the tag are chosen by column index (negative counts
  from the end, so -1 is the last column).
- CoNLL-U: ten tab-separated columns; ``#`` comments, multiword-token ranges (``1-2``) and empty nodes (``1.1``) are
  skipped. The tag is ``UPOS``, ``XPOS`` or a key of the ``MISC`` column (``MISC:NER`` reads ``NER=...``).
- JSONL: one object per line holding a list of words and a list of tags of the same length.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mtl.errors import MTLConfigError

CONLLU_COLUMNS = ("ID", "FORM", "LEMMA", "UPOS", "XPOS", "FEATS", "HEAD", "DEPREL", "DEPS", "MISC")


@dataclass
class Sentence:
    """One sentence: its words, one tag per word, and the 1-based line of the file each word is on."""

    words: list[str]
    tags: list[str]
    lines: list[int]


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise MTLConfigError(f"{path}: not UTF-8 text (byte {err.start}), expected a UTF-8 file of words and "
                             "tags") from None


def _blocks(path: Path) -> Iterator[list[tuple[int, str]]]:
    """The file's blank-line-separated blocks, as (1-based line number, line) pairs."""
    block: list[tuple[int, str]] = []
    for number, line in enumerate([*_lines(path), ""], start=1):
        if line.strip():
            block.append((number, line))
        elif block:
            yield block
            block = []


def _found(path: Path, sentences: list[Sentence], expected: str) -> list[Sentence]:
    if not sentences:
        raise MTLConfigError(f"{path}: no sentence found, expected {expected}")
    return sentences


def read_conll(path: str | Path, word_column: int = 0, tag_column: int = -1) -> list[Sentence]:
    """The sentences of a CoNLL column file (word and tag taken from the given columns)."""
    path = Path(path)
    # columns a line must have: a word and a tag are never the same column
    need = max(2, *(i + 1 if i >= 0 else -i for i in (word_column, tag_column)))
    sentences = []
    for block in _blocks(path):
        rows = [(number, line.split()) for number, line in block if line.split()[0] != "-DOCSTART-"]
        for number, columns in rows:
            if len(columns) < need:
                raise MTLConfigError(f"{path}:{number}: {len(columns)} column(s), expected at least {need} (word "
                                     f"column {word_column}, tag column {tag_column})")
        if rows:
            sentences.append(Sentence([c[word_column] for _, c in rows], [c[tag_column] for _, c in rows],
                                      [number for number, _ in rows]))
    return _found(path, sentences, "lines of words and tags with a blank line between sentences")


def read_conllu(path: str | Path, tag: str = "UPOS") -> list[Sentence]:
    """The sentences of a CoNLL-U file, tagged by ``UPOS``, ``XPOS`` or ``MISC:<key>``."""
    path = Path(path)
    key = tag[len("MISC:"):] if tag.startswith("MISC:") else None
    if key is None and tag not in ("UPOS", "XPOS") or key == "":
        raise MTLConfigError(f"{path}: tag column {tag!r}, expected 'UPOS', 'XPOS' or 'MISC:<key>'")
    column = CONLLU_COLUMNS.index("MISC" if key is not None else tag)
    sentences = []
    for block in _blocks(path):
        words, tags, lines = [], [], []
        for number, line in block:
            if line.startswith("#"):
                continue
            fields = line.split("\t")
            if len(fields) != len(CONLLU_COLUMNS):
                raise MTLConfigError(f"{path}:{number}: {len(fields)} tab-separated column(s), expected "
                                     f"{len(CONLLU_COLUMNS)} ({' '.join(CONLLU_COLUMNS)})")
            if "-" in fields[0] or "." in fields[0]:  # a multiword token's range or an empty node: not a word
                continue
            value = fields[column]
            if key is not None:
                pairs = dict(item.partition("=")[::2] for item in value.split("|") if "=" in item)
                if key not in pairs:
                    raise MTLConfigError(f"{path}:{number}: MISC {value!r} has no {key}=..., expected every word to "
                                         f"carry its {key} tag")
                value = pairs[key]
            lines.append(number)
            words.append(fields[1])
            tags.append(value)
        if words:
            sentences.append(Sentence(words, tags, lines))
    return _found(path, sentences, "CoNLL-U lines with a blank line after each sentence")


def read_token_jsonl(path: str | Path, words_field: str = "tokens", tags_field: str = "tags") -> list[Sentence]:
    """The sentences of a JSONL file whose objects hold a list of words and a list of tags."""
    path = Path(path)
    sentences = []
    for number, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise MTLConfigError(f"{path}:{number}: not valid JSON ({err.msg}), expected one object per line") from None
        if not isinstance(row, dict):
            raise MTLConfigError(f"{path}:{number}: got a JSON {type(row).__name__}, expected an object with "
                                 f"'{words_field}' and '{tags_field}'")
        values = {}
        for field in (words_field, tags_field):
            value = row.get(field)
            if not isinstance(value, list) or not value:
                raise MTLConfigError(f"{path}:{number}: {field}: got {str(value)[:40]!r}, expected a non-empty "
                                     "list of strings")
            bad = next((i for i, item in enumerate(value) if not isinstance(item, str) or not item.strip()), None)
            if bad is not None:
                raise MTLConfigError(f"{path}:{number}: {field}[{bad}]: got {str(value[bad])[:40]!r}, expected a "
                                     "non-empty string")
            values[field] = value
        words, tags = values[words_field], values[tags_field]
        if len(words) != len(tags):
            raise MTLConfigError(f"{path}:{number}: {len(words)} {words_field} but {len(tags)} {tags_field}, "
                                 "expected one tag per word")
        sentences.append(Sentence(words, tags, [number] * len(words)))
    return _found(path, sentences, "one JSON object per line")
