"""Words to subword windows for taggers (mtl/kinds/word_windows.py): every word predicted exactly once, never cut."""

from __future__ import annotations

import random

import pytest

from mtl.backbone import load_tokenizer
from mtl.kinds.word_windows import encode_words
from mtl.kinds.base import IGNORE
from tests.conftest import WORDS


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("minilm-l6")


def test_a_sentence_that_fits_is_one_window_equal_to_the_tokenizers_own_encoding(tokenizer):
    words = ["Anna", "Karenina", "visited", "Reykjavík", "."]
    (window,) = encode_words(tokenizer, words, [1, 2, 0, 3, 0], max_length=32, stride=8)
    assert window.input_ids == tokenizer(words, is_split_into_words=True)["input_ids"]
    assert [w for w, _ in window.owned] == [0, 1, 2, 3, 4]
    firsts = {w: p for w, p in window.owned}
    assert [window.labels[firsts[w]] for w in range(5)] == [1, 2, 0, 3, 0]  # each word's tag on its first subword
    assert sum(label != IGNORE for label in window.labels) == 5 and window.word_ids[0] == window.word_ids[-1] == -1
    every = encode_words(tokenizer, words, [1, 2, 0, 3, 0], 32, 8, label_all_subwords=True)[0]
    assert [every.labels[i] for i, w in enumerate(every.word_ids) if w >= 0] == \
        [[1, 2, 0, 3, 0][w] for w in every.word_ids if w >= 0]


@pytest.mark.parametrize("max_length, stride", [(12, 4), (16, 0), (10, 8), (40, 10)])
def test_a_long_sentence_is_cut_into_overlapping_windows_and_every_word_is_owned_once(tokenizer, max_length, stride):
    rng = random.Random(max_length)
    words = [rng.choice(WORDS + ["Reykjavík", "unbelievably", "x"]) for _ in range(60)]
    tags = [rng.randrange(5) for _ in words]
    windows = encode_words(tokenizer, words, tags, max_length, stride)
    assert len(windows) > 1 and all(len(w.input_ids) <= max_length for w in windows)
    owned = sorted(word for w in windows for word, _ in w.owned)
    assert owned == list(range(60))  # every word exactly once
    for w in windows:
        inner = [i for i in w.word_ids if i >= 0]
        assert inner == sorted(inner)  # words in order, whole: a window ends at a word boundary
        assert sorted(word for word, _ in w.owned) == sorted({word for word, _ in w.owned})
        for word, position in w.owned:
            assert w.labels[position] == tags[word] and w.word_ids[position] == word
        assert sum(label != IGNORE for label in w.labels) == len(w.owned)
    ranges = [(min(i for i in w.word_ids if i >= 0), max(i for i in w.word_ids if i >= 0)) for w in windows]
    if stride:
        assert all(b[0] <= a[1] for a, b in zip(ranges, ranges[1:]))  # consecutive windows overlap
    # an owned word is the one furthest from its window's edges among the windows holding it
    for k, w in enumerate(windows):
        a, b = ranges[k]
        for word, _ in w.owned:
            mine = min(word - a, b - word)
            assert all(min(word - c, d - word) <= mine for c, d in ranges if c <= word <= d)


def test_words_the_tokenizer_drops_or_cannot_fit_still_get_one_prediction(tokenizer):
    words = ["Anna", "\u200b", "x" * 300, "sings"]  # a zero-width space yields no subword; one word too long
    windows = encode_words(tokenizer, words, None, max_length=8, stride=2)
    owned = sorted(word for w in windows for word, _ in w.owned)
    assert owned == [0, 1, 2, 3] and all(len(w.input_ids) <= 8 for w in windows) and windows[0].labels is None
    unk = [w.input_ids[p] for w in windows for word, p in w.owned if word == 1]
    assert unk == [tokenizer.unk_token_id]
