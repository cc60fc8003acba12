"""Bad tagging input through ``train.py fit``: one line naming the file, the line and the field, exit 2, before any
work (no run folder); an I- tag that starts an entity is counted and reported, not fatal."""

from __future__ import annotations

import json
import re

import pytest

from tests.test_hardening import error_line, run_cli

SPEC = ("source: {{type: files, train: {file}{src}}}\ntext_fields: [tokens]\nlabel_field: tags\n"
        "labels: [O, B-KEY, I-KEY]\nproblem: token_classification\nmax_length: 16\n{extra}")
CONLL = "-DOCSTART- O\n\nalpha O\ngood B-KEY\nriver I-KEY\n\nbeta O\nbad B-KEY\n"
CONLLU = "# sent_id = 1\n1\talpha\t_\tX\t_\t_\t0\troot\t_\tNER=O\n2\tgood\t_\tADJ\t_\t_\t1\tamod\t_\tNER=B-KEY\n\n"


def _fit(tmp_path, tiny_dir, capsys, name: str, text: str, src: str = "") -> tuple[int, list[str]]:
    data = tmp_path / name
    data.write_text(text)
    (tmp_path / "t.yaml").write_text(SPEC.format(file=data, src=src, extra=""))
    return run_cli(["fit", "--model.backbone", str(tiny_dir), "--data.tasks", f"[{tmp_path / 't.yaml'}]",
                    "--model.run_dir", str(tmp_path / "run"), "--data.cache_dir", str(tmp_path / "cache"),
                    "--trainer.max_epochs", "1", "--trainer.logger", "false",
                    # without a logger the CLI saves config.yaml into the default root: the run's, not the repo's
                    "--trainer.default_root_dir", str(tmp_path / "run")], capsys)


def _jsonl(*rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


GOOD = {"tokens": ["alpha", "good"], "tags": ["O", "B-KEY"]}


@pytest.mark.parametrize("name, text, src, expected", [
    ("a.jsonl", _jsonl(GOOD, {"tokens": ["a", "b"], "tags": ["O"]}), "",
     r"a\.jsonl:2: 2 tokens but 1 tags, expected one tag per word$"),
    ("a.jsonl", _jsonl(GOOD, GOOD, {"tokens": [], "tags": []}), "",
     r"a\.jsonl:3: tokens: got '\[\]', expected a non-empty list of strings$"),
    ("a.jsonl", _jsonl(GOOD, {"tokens": ["a", 7], "tags": ["O", "O"]}), "",
     r"a\.jsonl:2: tokens\[1\]: got '7', expected a non-empty string$"),
    ("a.jsonl", _jsonl(GOOD, {"tokens": ["a", "b"], "tags": ["O", "B-ORG"]}), "",
     r"a\.jsonl:2: tags: word 2: tag 'B-ORG' not in labels, expected one of \['O', 'B-KEY', 'I-KEY'\]$"),
    ("a.txt", CONLL.replace("river I-KEY", "river I-KEE"), "",
     r"a\.txt:5: tags: word 3: tag 'I-KEE' not in labels"),
    ("a.txt", CONLL.replace("beta O", "beta"), ", tag_column: 1",
     r"a\.txt:7: 1 column\(s\), expected at least 2 \(word column 0, tag column 1\)$"),
    ("a.conllu", CONLLU.replace("\tNER=B-KEY", ""), "",
     r"a\.conllu:3: 9 tab-separated column\(s\), expected 10 \(ID FORM LEMMA UPOS XPOS FEATS HEAD DEPREL DEPS MISC\)$"),
    ("a.conllu", CONLLU, ", conllu_tag: 'MISC:NEW'",
     r"a\.conllu:2: MISC 'NER=O' has no NEW=\.\.\., expected every word to carry its NEW tag$"),
])
def test_bad_tagging_files_are_one_line_naming_file_line_and_field(tmp_path, tiny_dir, capsys, name, text, src,
                                                                     expected):
    code, lines = _fit(tmp_path, tiny_dir, capsys, name, text, src)
    assert code == 2
    line = error_line(lines)
    assert line.startswith(f"error: {tmp_path / name}:") and re.search(expected, line), line
    assert not (tmp_path / "run").exists()


def test_an_i_tag_that_starts_an_entity_is_counted_and_reported_not_fatal(tmp_path, tiny_dir, capsys):
    rows = [{"tokens": ["alpha", "good", str(i)], "tags": ["O", "B-KEY", "O"]} for i in range(30)]
    rows += [{"tokens": ["alpha", "river", str(i)], "tags": ["O", "I-KEY", "O"]} for i in range(3)]
    code, lines = _fit(tmp_path, tiny_dir, capsys, "a.jsonl", _jsonl(*rows))
    assert code == 0, lines
    assert f"warning: {tmp_path / 't.yaml'}: source.train: 3 entities start with an I- or E- tag (counted as " \
           "entities, as conlleval does)" in lines


def test_conll_and_conllu_sources_read_the_chosen_columns(tmp_path):
    from mtl.data.sources import load_task_dataset
    from mtl.data.spec import load_task_spec

    conll = tmp_path / "a.txt"
    conll.write_text(CONLL.replace(" O\n", " X O\n").replace(" B-KEY\n", " X B-KEY\n").replace(" I-KEY\n", " X I-KEY\n"))
    (tmp_path / "u.conllu").write_text(CONLLU + CONLLU.replace("alpha", "beta"))
    cases = {conll: (", format: conll, tag_column: 2", [(["alpha", "good", "river"], [0, 1, 2]), (["beta", "bad"], [0, 1])]),
             tmp_path / "u.conllu": (", conllu_tag: 'MISC:NER'", [(["alpha", "good"], [0, 1]), (["beta", "good"], [0, 1])])}
    for path, (src, expected) in cases.items():
        splits = f", validation: {path}, test: {path}"
        (tmp_path / "t.yaml").write_text(SPEC.format(file=path, src=src + splits, extra=""))
        rows = load_task_dataset(load_task_spec(tmp_path / "t.yaml"), limit=False)
        for split in rows.values():
            assert list(zip(split["tokens"], split["label"])) == expected
