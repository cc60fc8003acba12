"""Entities in a tag sequence, and entity-level precision, recall and F1 as the CoNLL evaluation counts them.

Tags are ``O`` or ``<P>-<TYPE>`` with P in B (begin), I (inside), E (end), S (single): BIO / IOB2 and BIOES, and
IOB1 too. Chunking follows the CoNLL shared tasks' ``conlleval`` script: an entity ends where the type changes or an
``O``, a ``B`` or (after an ``E``) an ``I`` or ``E`` follows, and starts where the type changes or a ``B`` follows;
an ``I`` after ``O`` starts an entity (ill-formed sequences are not repaired). As in the ``seqeval`` package's
default mode, ``S`` also starts and ends an entity, and an entity ends after ``E``, which conlleval (written for
BIO) does not say. A predicted entity is correct when its type, start and end all equal a true entity's; the scores
are micro averages over entities.
"""

from __future__ import annotations

from collections.abc import Sequence


def split_tag(tag: str) -> tuple[str, str]:
    """(prefix, type): ``B-PER`` -> (``B``, ``PER``); ``O`` -> (``O``, ``""``); a tag without a prefix is I."""
    if tag == "O":
        return "O", ""
    prefix, sep, kind = tag.partition("-")
    if sep and prefix in ("B", "I", "E", "S"):
        return prefix, kind
    return "I", tag


def _ends(prev: str, tag: str, prev_type: str, kind: str) -> bool:
    if prev in ("E", "S"):
        return True
    if prev in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev != "O" and prev_type != kind


def _starts(prev: str, tag: str, prev_type: str, kind: str) -> bool:
    if tag in ("B", "S"):
        return True
    if prev in ("E", "S", "O") and tag in ("I", "E"):
        return True
    return tag != "O" and prev_type != kind


def entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Every entity of one sentence as (type, first word, last word + 1)."""
    found: list[tuple[str, int, int]] = []
    prev, prev_type, start = "O", "", -1
    for i, tag in enumerate([*tags, "O"]):  # the trailing O closes an entity at the sentence end
        prefix, kind = split_tag(tag)
        if start >= 0 and _ends(prev, prefix, prev_type, kind):
            found.append((prev_type, start, i))
            start = -1
        if prefix != "O" and _starts(prev, prefix, prev_type, kind):
            start = i
        prev, prev_type = prefix, kind
    return found


def entity_counts(true: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> tuple[int, int, int]:
    """(correct, predicted, true) entity counts over sentences of tags."""
    correct = predicted = gold = 0
    for true_tags, pred_tags in zip(true, pred, strict=True):
        want, got = set(entities(true_tags)), entities(pred_tags)
        correct += sum(entity in want for entity in got)
        predicted += len(got)
        gold += len(want)
    return correct, predicted, gold


def scores(correct: int, predicted: int, gold: int) -> dict[str, float]:
    """Precision, recall and F1 (0 where a denominator is 0, as conlleval prints them)."""
    precision = correct / predicted if predicted else 0.0
    recall = correct / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def ill_formed_starts(tags: Sequence[str]) -> int:
    """Entities of one sentence that start with an I- or E- tag (IOB1, or a tagger's slip): counted as entities, as
    conlleval does, and worth reporting for a BIO or BIOES tag set."""
    return sum(split_tag(tags[start])[0] in ("I", "E") for _, start, _ in entities(tags))
