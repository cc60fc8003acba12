"""A sentence of words as subword windows the encoder can take, with one owner window per word.

Taggers are given words; the encoder sees subwords. `encode_words` tokenises each word, and when a sentence's
subwords do not fit ``max_length`` it cuts the sentence into windows at word boundaries that overlap by about
``stride`` subwords, never dropping a word. Every word is owned by exactly one window: the one where it sits
furthest from an edge, so it has the most context on both sides. A window labels (and later predicts) only the words
it owns, on their first subword (or on every subword with ``label_all_subwords``); every other position is
``IGNORE`` in the labels, as the loss and the metrics skip it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mtl.kinds.base import IGNORE


@dataclass
class Window:
    """One encoder input cut from a sentence: its token ids (special tokens included), one word index per token (-1
    for special tokens), the labels per token if tags were given, and the (word, token position) of every word it
    owns, at the word's first subword."""

    input_ids: list[int]
    token_type_ids: list[int]
    word_ids: list[int]
    owned: list[tuple[int, int]]
    labels: list[int] | None = None


def _spans(sizes: list[int], budget: int, stride: int) -> list[tuple[int, int]]:
    """Word ranges [a, b) of the windows: each as long as ``budget`` subwords allow (at least one word), the next
    starting where about ``stride`` subwords of this one remain."""
    spans, start, n = [], 0, len(sizes)
    while True:
        end, used = start, 0
        while end < n and (end == start or used + sizes[end] <= budget):
            used += sizes[end]
            end += 1
        spans.append((start, end))
        if end >= n:
            return spans
        nxt, overlap = end, 0
        while nxt - 1 > start and overlap + sizes[nxt - 1] <= stride:
            nxt -= 1
            overlap += sizes[nxt]
        start = nxt


def _owners(spans: list[tuple[int, int]], n: int) -> list[int]:
    """The window that owns each word: where the word is furthest from the window's edges (the first on a tie)."""
    owners = []
    for word in range(n):
        best = max((min(word - a, b - 1 - word), -k) for k, (a, b) in enumerate(spans) if a <= word < b)
        owners.append(-best[1])
    return owners


def encode_words(tokenizer: Any, words: Sequence[str], tags: Sequence[int] | None, max_length: int, stride: int,
                 label_all_subwords: bool = False) -> list[Window]:
    """The windows of one sentence (``tags``: one label index per word, or None when predicting)."""
    # the whole sentence through the tokenizer once (its special tokens and token types, per family): the windows
    # when it fits, and each word's subword count otherwise
    whole = tokenizer(list(words), is_split_into_words=True)
    sizes = [0] * len(words)
    for word in whole.word_ids():
        if word is not None:
            sizes[word] += 1
    fits = len(whole["input_ids"]) <= max_length and all(sizes)
    # a word the tokenizer maps to nothing is read as the unknown token, so that it still gets a prediction
    words = [w if n else tokenizer.unk_token for w, n in zip(words, sizes)]
    budget = max_length - tokenizer.num_special_tokens_to_add(pair=False)
    spans = [(0, len(words))] if fits else _spans([min(max(n, 1), budget) for n in sizes], budget, stride)
    owners = _owners(spans, len(words))
    windows = []
    for k, (a, b) in enumerate(spans):
        encoded = whole if fits else tokenizer(list(words[a:b]), is_split_into_words=True, truncation=True,
                                               max_length=max_length)
        word_ids = [-1 if w is None else a + w for w in encoded.word_ids()]
        if set(range(a, b)) - set(word_ids):
            raise RuntimeError(f"words {sorted(set(range(a, b)) - set(word_ids))} lost their subwords in a window")
        owned, labels = [], [IGNORE] * len(word_ids) if tags is not None else None
        for position, word in enumerate(word_ids):
            if word < 0 or owners[word] != k:
                continue
            first = position == 0 or word_ids[position - 1] != word
            if first:
                owned.append((word, position))
            if labels is not None and (first or label_all_subwords):
                labels[position] = int(tags[word])
        token_types = encoded.get("token_type_ids") or [0] * len(word_ids)
        windows.append(Window(list(encoded["input_ids"]), list(token_types), word_ids, owned, labels))
    return windows


# a word of raw text: letters, digits and underscores, joined by an inner apostrophe, hyphen or period ("don't",
# "well-known", "U.S", "3.5"); every other non-space character is a word of its own (punctuation)
WORD = re.compile(r"\w+(?:['’.\-]\w+)*|[^\w\s]")


def split_words(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """Raw text -> its words and each word's (start, end) character offsets (see `WORD`)."""
    found = list(WORD.finditer(text))
    return [m.group() for m in found], [m.span() for m in found]


def join_windows(logits: Sequence[Any], word_ids: Sequence[Sequence[int]], words: int) -> Any:
    """One sentence's logits per word ([words, tags]) from its windows' logits per token: each word's from its first
    subword in the window that owns it (the rule `encode_words` labels by)."""
    import torch  # the windows are cut without torch; only joining predictions needs it

    spans = []
    for ids in word_ids:
        present = [w for w in ids if w >= 0]
        spans.append((min(present), max(present) + 1))
    owners = _owners(spans, words)
    out = [None] * words
    for k, (rows, ids) in enumerate(zip(logits, word_ids)):
        for position, word in enumerate(ids):
            if word >= 0 and owners[word] == k and (position == 0 or ids[position - 1] != word):
                out[word] = rows[position]
    if any(row is None for row in out):
        raise RuntimeError(f"words {[i for i, r in enumerate(out) if r is None]} have no window that owns them")
    return torch.stack(out)
