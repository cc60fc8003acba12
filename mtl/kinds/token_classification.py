"""Token classification: one tag per word (named entities, part of speech, chunks).

A task gives words and one tag per word (`mtl.data.token_files`); the encoder sees subword windows
(`mtl.kinds.word_windows`), labelled on each owned word's first subword and ``IGNORE`` elsewhere. The head tags every
token; the loss, the metrics and the predictions read only the labelled positions. For a BIO / IOB2 / BIOES tag set
the headline metric is entity F1 as the CoNLL evaluation counts it (`mtl.kinds.entities`); for other tag sets
(part of speech) it is word accuracy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from mtl.errors import MTLConfigError
from mtl.kinds.base import IGNORE, EncodedText, TaskKind, check_encodable, plain_text
from mtl.kinds.entities import entities, ill_formed_starts
from mtl.kinds.word_windows import encode_words, join_windows, split_words

def is_entity_tag_set(labels: list[str]) -> bool:
    """Whether the tags mark entities (``O`` plus ``B-``/``I-``/``E-``/``S-`` tags) rather than word classes."""
    return "O" in labels and len(labels) > 1 and all(t == "O" or (t[:2] in ("B-", "I-", "E-", "S-") and len(t) > 2)
                                                     for t in labels)


class TokenHead(nn.Module):
    """Dropout -> Linear(H, tags) on every token (AdapterHub's tagging head with one layer)."""

    def __init__(self, hidden_size: int, num_outputs: int, problem: str = "token_classification",
                 pooling: str = "none", dropout: float = 0.1) -> None:
        super().__init__()
        if pooling != "none":
            raise MTLConfigError(f"head pooling '{pooling}': a tagger's head reads every token, expected 'none'")
        self.problem, self.pooling, self.num_outputs = problem, pooling, num_outputs
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, num_outputs)

    def settings(self) -> dict[str, object]:
        """The constructor arguments (what an exported head's config stores)."""
        return {"num_outputs": self.num_outputs, "problem": self.problem, "pooling": self.pooling,
                "dropout": self.dropout.p}

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Logits per token: [rows, tokens, tags]."""
        return self.out(self.dropout(hidden))


class TokenClassification(TaskKind):
    """A label in a file is a list of tag names, one per word."""

    name = "token_classification"
    metric_titles = {"acc": "word accuracy", "f1": "entity F1"}
    metric_names = ("f1", "precision", "recall", "acc")
    headline = "f1"  # entity F1 for an entity tag set; `metrics_for` gives word accuracy ("acc") for the others
    label_dtype = torch.long
    text_fields = 1
    text_fields_help = "one column (of words, for a token_classification task)"
    reads_words = True
    windowed = True
    terms_per_row = True

    def read_text(self, value: Any, where: str) -> list[str]:
        """A list of words (each a non-empty string without spaces around it); an empty list is a dropped row."""
        if value is None:
            return []
        if not isinstance(value, (list, tuple)):
            raise MTLConfigError(f"{where}: got {str(value)[:40]!r}, expected a list of words")
        words = []
        for position, word in enumerate(value):
            if not isinstance(word, str) or not word.strip():
                raise MTLConfigError(f"{where}: word {position + 1}: got {str(word)[:40]!r}, expected a non-empty "
                                     "string")
            words.append(check_encodable(word.strip(), f"{where}: word {position + 1}"))
        return words

    def check_example(self, texts: tuple[Any, ...], label: Any, where: str, names: list[str]) -> Any:
        """One tag per word."""
        if len(texts[0]) != len(label):
            raise MTLConfigError(f"{where}: {len(texts[0])} words but {len(label)} tags, expected one tag per word")
        return label

    def split_note(self, labels: list[list[int]], names: list[str]) -> str | None:
        """For an entity tag set: how many gold entities start with an I- or E- tag (read as entities, as CoNLL's
        evaluation does)."""
        if not is_entity_tag_set(names):
            return None
        count = sum(ill_formed_starts([names[t] for t in tags]) for tags in labels)
        return f"{count} entities start with an I- or E- tag (counted as entities, as conlleval does)" if count else None

    def metrics_for(self, labels: list[str]) -> tuple[list[str], str]:
        """Entity scores and word accuracy for an entity tag set (headline entity F1), else word accuracy."""
        return (["f1", "precision", "recall", "acc"], "f1") if is_entity_tag_set(labels) else (["acc"], "acc")

    def check_labels(self, labels: list[str]) -> str | None:
        """At least two tags."""
        return None if len(labels) >= 2 else "at least 2 tag names"

    def read_label(self, value: Any, names: list[str], where: str | list[str]) -> list[int]:
        """A list of tag names, one per word -> their indices (``where``: one place, or one per word)."""
        if not isinstance(value, list) or not value:
            where = where[0] if isinstance(where, list) and where else where
            raise MTLConfigError(f"{where}: got {str(value)[:40]!r}, expected a non-empty list of tags, one per word")
        index = {name: i for i, name in enumerate(names)}
        out = []
        for position, tag in enumerate(value):
            if tag not in index:
                at = where[position] if isinstance(where, list) else where
                raise MTLConfigError(f"{at}: word {position + 1}: tag {str(tag)[:40]!r} not in labels, expected "
                                     f"one of {names[:12]}{' ...' if len(names) > 12 else ''}")
            out.append(index[tag])
        return out

    def encode(self, tokenizer: Any, batch: dict[str, list], indices: list[int], spec: Any) -> dict[str, list]:
        """A row per window of each sentence (`mtl.kinds.word_windows`): the encoder inputs, ``labels`` per token,
        ``word_ids`` per token and ``example``, the sentence's row in the split."""

        out: dict[str, list] = {k: [] for k in ("input_ids", "attention_mask", "token_type_ids", "labels",
                                                "word_ids", "example")}
        stride, every = spec.stride, spec.label_all_subwords
        for words, tags, example in zip(batch[spec.text_fields[0]], batch["label"], indices):
            for window in encode_words(tokenizer, words, tags, spec.max_length, stride, every):
                out["input_ids"].append(window.input_ids)
                out["attention_mask"].append([1] * len(window.input_ids))
                out["token_type_ids"].append(window.token_type_ids)
                out["labels"].append(window.labels)
                out["word_ids"].append(window.word_ids)
                out["example"].append(example)
        return out

    def collate(self, column: str, values: list[Any], width: int) -> torch.Tensor:
        """Tags and word ids padded to the batch's width (``IGNORE`` and -1); one sentence row per window."""
        if column in ("labels", "word_ids"):
            fill = IGNORE if column == "labels" else -1
            return torch.tensor([list(v) + [fill] * (width - len(v)) for v in values], dtype=torch.long)
        return torch.tensor(values, dtype=torch.long)

    def head_settings(self, num_outputs: int, pooling: str, dropout: float) -> dict[str, Any]:
        """As for every kind, with pooling ``none`` whatever was asked (see `build_head`)."""
        return {**super().head_settings(num_outputs, pooling, dropout), "pooling": "none"}

    def build_head(self, hidden_size: int, num_outputs: int, pooling: str, dropout: float) -> nn.Module:
        """A `TokenHead` (pooling does not apply: every token is tagged)."""
        return TokenHead(hidden_size, num_outputs, self.name, "none", dropout)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, per_batch: float | None = None) -> torch.Tensor:
        """Cross-entropy over the labelled positions: their mean, or in training their sum over ``per_batch``, the
        mean count of labelled positions in a training batch.

        Why not the batch's own mean in training: batches grouped by length hold 32 short sentences (~150 words) or
        32 long ones (~1,000); each batch's own mean gives a word of a short batch several times the weight of a word
        of a long one, which cost 0.02 entity F1 on CoNLL-2003 (benchmarks/RESULTS.md). A fixed divisor weighs
        every word the same whichever batch it lands in, as random batches do on average."""
        flat, target = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long()
        if per_batch is None:
            return F.cross_entropy(flat, target, ignore_index=IGNORE)
        return F.cross_entropy(flat, target, ignore_index=IGNORE, reduction="sum") / per_batch

    def loss_terms(self, labels: list[int]) -> int:
        """The row's labelled positions."""
        return sum(tag != IGNORE for tag in labels)

    def predict(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tag index, its softmax probability) per token."""
        confidence, pred = logits.softmax(-1).max(-1)
        return pred, confidence

    def metric(self, name: str, labels: list[str], spec: dict[str, Any] | None = None, stage: str = "val") -> Any:
        """Entity ``f1`` / ``precision`` / ``recall`` or word ``acc`` over whole sentences."""
        from mtl.kinds.tag_scores import TagScores  # a torchmetrics Metric: torchmetrics imports Lightning's utilities

        return TagScores(name, labels)

    def metric_inputs(self, logits: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        """(tags predicted, true tags, the sentence of each row, the word of each token): windows of one sentence
        are joined again before entities are counted."""
        return logits.argmax(-1), batch["labels"], batch["example"], batch["word_ids"]

    # ---- predictions ---------------------------------------------------------------------------
    def encode_text(self, tokenizer: Any, text: str, max_length: int, doc_stride: int) -> EncodedText:
        """Raw text -> its words (`mtl.kinds.word_windows.split_words`) -> their windows."""

        words, offsets = split_words(plain_text(text, self.name))
        if not words:
            return EncodedText(text, [], [], [])
        rows = [{"input_ids": w.input_ids, "attention_mask": [1] * len(w.input_ids), "token_type_ids": w.token_type_ids,
                 "word_ids": w.word_ids}
                for w in encode_words(tokenizer, words, None, max_length, doc_stride)]
        return EncodedText(text, rows, words, offsets)

    def tag_words(self, labels: list[str] | None, logits: list[torch.Tensor], word_ids: list[list[int]],
                  words: list[str], offsets: list[tuple[int, int]] | None = None, text: str | None = None
                  ) -> dict[str, Any]:
        """One sentence's prediction from its windows' logits: per word its tag (``label``) and probability
        (``score``); for an entity tag set the ``entities``, each with its type, words [start, end), characters
        [start, end) in ``text`` (the words joined by spaces when there is no text) and mean word probability."""

        if not words:
            return {"label": [], "score": [], "words": [], "entities": []}
        if offsets is None:
            starts = [sum(len(w) + 1 for w in words[:i]) for i in range(len(words))]
            offsets, text = [(a, a + len(w)) for a, w in zip(starts, words)], " ".join(words)
        probs = join_windows(logits, word_ids, len(words)).float().softmax(-1)
        score, pred = probs.max(-1)
        scores = score.tolist()
        tags = [labels[i] for i in pred.tolist()] if labels else pred.tolist()
        spans = []
        if labels and is_entity_tag_set(labels):
            for kind, a, b in entities(tags):
                start, end = offsets[a][0], offsets[b - 1][1]
                spans.append({"type": kind, "words": [a, b], "start": start, "end": end, "text": text[start:end],
                              "score": sum(scores[a:b]) / (b - a)})
        return {"label": tags, "score": scores, "words": list(words), "entities": spans}

    def text_answer(self, labels: list[str] | None, logits: list[torch.Tensor], encoded: EncodedText,
                    spec: dict[str, Any] | None = None) -> dict[str, Any]:
        """Per word of the text its tag and probability, and the entities with their character offsets."""
        return self.tag_words(labels, logits, [r["word_ids"] for r in encoded.rows], encoded.words or [],
                              encoded.offsets, encoded.text)

    def example_answer(self, labels: list[str] | None, logits: list[torch.Tensor], batch: dict[str, Any],
                       rows: list[int], spec: dict[str, Any] | None = None) -> dict[str, Any]:
        """A sentence of a split (its words in ``batch["text"]``), tagged as `tag_words` does; ``text``: the words
        joined by spaces (what the entities' characters index)."""
        words = batch["text"][rows[0]]
        out = self.tag_words(labels, logits, [batch["word_ids"][r].tolist() for r in rows], words)
        return {**out, "text": " ".join(words)}

    def answer(self, labels: list[str] | None, logits: torch.Tensor) -> dict[str, Any]:
        """Not used: a tagger answers a text (`text_answer`), whose windows are several rows."""
        raise TypeError("a tagger answers whole texts: call text_answer with the logits of all its windows")
