"""The token-classification kind's parts (mtl/kinds/token_classification.py, tag_scores.py): the tag set decides the
headline, tags read from files, the per-token head and loss, and scores over whole sentences joined from windows."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from mtl.errors import MTLConfigError
from mtl.kinds.base import IGNORE
from mtl.kinds.entities import entity_counts, scores
from mtl.kinds.token_classification import TokenClassification, TokenHead, is_entity_tag_set

NER = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
KIND = TokenClassification()


def test_the_tag_set_decides_the_metrics_and_the_headline():
    assert is_entity_tag_set(NER) and is_entity_tag_set(["O", "S-PER", "B-PER", "E-PER"])
    assert not is_entity_tag_set(["NOUN", "VERB", "PUNCT"]) and not is_entity_tag_set(["O", "NN"])
    assert KIND.metrics_for(NER) == (["f1", "precision", "recall", "acc"], "f1")
    assert KIND.metrics_for(["NOUN", "VERB"]) == (["acc"], "acc")
    assert KIND.check_labels(["O"]) == "at least 2 tag names"


def test_tags_are_read_per_word_and_an_unknown_tag_names_the_word():
    assert KIND.read_label(["B-PER", "I-PER", "O"], NER, "f") == [1, 2, 0]
    with pytest.raises(MTLConfigError, match=r"^f: word 2: tag 'B-ORG' not in labels, expected one of \['O', 'B-PER'"):
        KIND.read_label(["O", "B-ORG"], NER, "f")
    with pytest.raises(MTLConfigError, match=r"^f: got 'O', expected a non-empty list of tags"):
        KIND.read_label("O", NER, "f")


def test_the_head_tags_every_token_and_the_loss_reads_only_labelled_positions():
    torch.manual_seed(0)
    head = TokenHead(8, len(NER)).eval()
    hidden = torch.randn(2, 5, 8)
    logits = head(hidden, torch.ones(2, 5))
    assert logits.shape == (2, 5, len(NER)) and head.settings()["pooling"] == "none"
    labels = torch.tensor([[IGNORE, 1, 2, IGNORE, IGNORE], [IGNORE, 0, 3, 4, IGNORE]])
    keep = labels != IGNORE
    assert torch.isclose(KIND.loss(logits, labels), F.cross_entropy(logits[keep], labels[keep]))
    pred, score = KIND.predict(logits)
    assert torch.equal(pred, logits.argmax(-1)) and torch.allclose(score, logits.softmax(-1).amax(-1))
    with pytest.raises(MTLConfigError, match="a tagger's head reads every token"):
        TokenHead(8, 3, pooling="mean")


def test_scores_join_a_sentences_windows_so_an_entity_across_them_counts_once():
    # sentence 7: words 0-3 = PER PER LOC LOC (gold); its windows own words 0-1 and 2-3, in two rows of two batches
    # sentence 9: one window, a wrong type
    gold = {7: ["B-PER", "I-PER", "B-LOC", "I-LOC"], 9: ["B-LOC", "O"]}
    guess = {7: ["B-PER", "I-PER", "I-PER", "B-LOC"], 9: ["B-PER", "O"]}
    idx = {t: i for i, t in enumerate(NER)}

    def row(example, words, width=6):
        labels, preds, word_ids = [IGNORE] * width, [0] * width, [-1] * width
        for k, w in enumerate(words):
            labels[1 + k], preds[1 + k], word_ids[1 + k] = idx[gold[example][w]], idx[guess[example][w]], w
        return labels, preds, word_ids

    metrics = {name: KIND.metric(name, NER) for name in ("f1", "precision", "recall", "acc")}
    for batch in ([(9, [0, 1]), (7, [2, 3])], [(7, [0, 1])]):  # windows out of order, as longest-first batches are
        rows = [row(e, w) for e, w in batch]
        labels, preds, word_ids = (torch.tensor([r[k] for r in rows]) for k in range(3))
        for metric in metrics.values():
            metric.update(preds, labels, torch.tensor([e for e, _ in batch]), word_ids)
    want = scores(*entity_counts([gold[7], gold[9]], [guess[7], guess[9]]))
    assert entity_counts([gold[7], gold[9]], [guess[7], guess[9]]) == (0, 3, 3)  # PER-span wrong end; LOC/PER wrong
    for name in ("f1", "precision", "recall"):
        assert float(metrics[name].compute()) == want[name]
    # scored window by window, the PER entity cut at the window edge would count as right: 1 correct of 4 found
    windows = [gold[7][:2], gold[7][2:], gold[9]], [guess[7][:2], guess[7][2:], guess[9]]
    assert entity_counts(*windows) == (1, 4, 3)
    right = sum(g == p for e in (7, 9) for g, p in zip(gold[e], guess[e]))  # words 0 and 1 of 7, word 1 of 9
    assert right == 3 and float(metrics["acc"].compute()) == right / 6


def test_sentences_become_window_rows_that_the_collator_pads_for_the_loss(monkeypatch):
    from types import SimpleNamespace

    from mtl.backbone import load_tokenizer
    from mtl.data import module
    from mtl.data.module import TaskCollator

    tokenizer = load_tokenizer("minilm-l6")
    spec = SimpleNamespace(text_fields=["words"], max_length=6, stride=2, label_all_subwords=False)
    batch = {"words": [["Anna", "sings"], ["Peter", "Blackburn", "visited", "Reykjavík", "in", "May"]],
             "label": [[1, 0], [1, 2, 0, 3, 0, 0]]}
    rows = KIND.encode(tokenizer, batch, [4, 9], spec)
    assert rows["example"][0] == 4 and rows["example"].count(9) >= 2  # the long sentence is cut into windows
    owned = sorted((e, w) for e, labels, words in zip(rows["example"], rows["labels"], rows["word_ids"])
                   for label, w in zip(labels, words) if label != IGNORE)
    assert owned == [(4, 0), (4, 1)] + [(9, w) for w in range(6)]  # every word labelled once, in one window
    monkeypatch.setattr(module, "kind_of", lambda problem: KIND)
    features = [{**{k: rows[k][i] for k in rows}, "task": "ner"} for i in range(len(rows["example"]))]
    collated = TaskCollator(tokenizer, {"ner": KIND.name})(features)
    width = collated["input_ids"].shape[1]
    assert collated["labels"].shape == collated["word_ids"].shape == (len(features), width)
    assert collated["example"].tolist() == rows["example"]
    assert int((collated["labels"] != IGNORE).sum()) == 8 and int((collated["word_ids"] == -1).sum()) > 0
    logits = torch.randn(len(features), width, len(NER))
    keep = collated["labels"] != IGNORE
    assert torch.isclose(KIND.loss(logits, collated["labels"]), F.cross_entropy(logits[keep], collated["labels"][keep]))


def test_every_kinds_head_reports_the_settings_a_pool_keeps_it_under():
    from mtl.kinds import KINDS

    for kind in [*KINDS.values(), KIND]:
        for pooling in ("mean", "cls"):
            head = kind.build_head(8, 3, pooling, 0.2)
            assert head.settings() == kind.head_settings(3, pooling, 0.2), kind.name
