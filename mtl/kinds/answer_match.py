"""Exact match and F1 of extractive answers as SQuAD's evaluation script counts them (pure Python).

An answer is normalised (lower case; punctuation removed; the articles a / an / the removed; whitespace collapsed),
then compared with each gold answer; a question scores its best match over its gold answers. F1 is over the
normalised words (their multiset overlap). A question without gold answers (SQuAD 2.0's unanswerable) scores 1 when
the prediction is empty, else 0. `mtl.kinds.answer_scores` averages them over examples. `best_threshold` is SQuAD
2.0's choice of the no-answer threshold.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Any

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)
THRESHOLD_KEY = "no_answer_threshold"  # where a task's spec keeps the no-answer threshold its validation chose


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, golds: list[str]) -> float:
    """1.0 if the normalised prediction equals a normalised gold answer (or both are empty), else 0.0."""
    if not golds:
        return float(not normalize_answer(prediction))
    return float(any(normalize_answer(prediction) == normalize_answer(g) for g in golds))


def f1_score(prediction: str, golds: list[str]) -> float:
    """The best word-overlap F1 of the normalised prediction against each gold answer."""
    if not golds:
        return float(not normalize_answer(prediction))
    words = normalize_answer(prediction).split()
    best = 0.0
    for gold in golds:
        gold_words = normalize_answer(gold).split()
        if not words or not gold_words:  # an empty side matches only another empty side
            best = max(best, float(words == gold_words))
            continue
        common = sum((Counter(words) & Counter(gold_words)).values())
        if common:
            precision, recall = common / len(words), common / len(gold_words)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def no_answer_threshold(spec: dict[str, Any] | None) -> float | None:
    """The threshold past which a task answers "no answer" (its spec's, 0 before validation chose one); None where
    its spec does not allow "no answer"."""
    if not (spec or {}).get("no_answer"):
        return None
    return float(spec.get(THRESHOLD_KEY, 0.0))


def best_threshold(diffs: list[float], values: list[float], empties: list[float]) -> float:
    """The no-answer threshold that maximises the total score when an example whose null-minus-span score ``diffs``
    exceeds it is answered empty (scoring its ``empties`` value) and every other keeps its span (its ``values``):
    halfway between the last example answered empty and the next; the highest diff where none should be (the fewest
    "no answer"s on a tie)."""
    order = sorted(range(len(diffs)), key=lambda i: diffs[i], reverse=True)
    total = best = sum(values)
    cut = 0  # the examples answered empty: the first `cut` of `order`
    for k, i in enumerate(order, 1):
        total += empties[i] - values[i]
        # a threshold cannot part equal diffs: cut only where the next diff is lower
        if total > best and (k == len(order) or diffs[order[k]] < diffs[i]):
            best, cut = total, k
    if cut == 0:
        return diffs[order[0]]
    if cut == len(order):
        return math.nextafter(diffs[order[-1]], -math.inf)
    return (diffs[order[cut - 1]] + diffs[order[cut]]) / 2
