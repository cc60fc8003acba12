"""`TaskKind`: the interface every kind of task implements (see `mtl.kinds`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mtl.errors import MTLConfigError
from mtl.heads import TaskHead

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # what a row holds for the encoder

IGNORE = -100  # a label position that no loss or metric counts (torch's cross-entropy ignore_index)


def check_encodable(text: str, where: str) -> str:
    """``text`` if it encodes as UTF-8; else one line naming ``where`` and the first code point that does not."""
    # JSON (and Python) strings may hold lone UTF-16 surrogates ("\\ud800"): valid JSON, but no Unicode character, so
    # the tokenizer fails on them deep inside a batch; they are refused where the text is read, not replaced, so no
    # example silently differs from its file
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise MTLConfigError(f"{where}: holds a lone surrogate U+{ord(text[err.start]):04X} at character {err.start + 1} "
                             "(a \\u escape that is half of a UTF-16 pair, not a character; the tokenizer cannot "
                             "encode it), expected Unicode text: remove it or write the whole character") from None
    return text


def plain_text(text: Any, kind: str) -> str:
    """``text`` if it is a string; else one line saying what a task of ``kind`` reads."""
    if not isinstance(text, str):
        raise MTLConfigError(f"got {str(text)[:40]!r}, expected a string: a {kind} task reads one text")
    return text


@dataclass
class EncodedText:
    """One raw text (a request's, a prediction file's) as the encoder rows its task's kind reads: one row for a
    text, or one per window of its words (``words``, ``offsets``: each word's characters in ``text``)."""

    text: str
    rows: list[dict[str, list[int]]]
    words: list[str] | None = None
    offsets: list[tuple[int, int]] | None = None


class TaskKind:
    """What one kind of task reads, predicts, scores and writes. Subclasses set the attributes and override what
    differs; the defaults are those of a task with one pooled head per text."""

    name = ""  # the task spec's ``problem`` value
    metric_names: tuple[str, ...] = ()  # metrics a task of this kind may list
    default_metrics: tuple[str, ...] = ()
    metric_titles: dict[str, str] = {}  # what a report calls each metric (the continual report's column titles)
    headline = ""  # the higher-is-better metric that stands for the task (checkpoint choice, val/avg/score)
    has_classes = False  # one class per row: splits stratified by it, classes checked, ambiguous duplicates dropped
    text_fields = 2  # the most text columns an example may have (two: a sentence pair)
    min_text_fields = 1  # and the fewest
    reads_questions = False  # an example is a question about a context (a predict file's {question, context} rows)
    drops_empty = True  # an example with an empty text is dropped and counted (else `check_example` refuses it)
    windowed = False  # a long example becomes several rows (windows, ``doc_stride`` apart), each with its ``example``
    reads_words = False  # examples are lists of words (read from word-and-tag files; predicted per word)
    label_dtype = torch.float  # of ``labels`` in a batch
    terms_per_row = False  # a row gives several loss terms (one per labelled token): see `loss`

    # ---- the task spec and its data ------------------------------------------------------------
    def metrics_for(self, labels: list[str]) -> tuple[list[str], str]:
        """(default metrics, headline metric) of a task with these labels (a tagger's depend on its tag set)."""
        return list(self.default_metrics), self.headline

    def check_labels(self, labels: list[str]) -> str | None:
        """None when ``labels`` suits this kind, else what the spec's ``labels:`` should hold."""
        return None if labels else "at least 1 label name"

    def read_text(self, value: Any, where: str) -> Any:
        """One raw text value from a data file -> what the dataset stores ("" when missing or blank: the row is
        dropped and counted)."""
        if value is None or (isinstance(value, float) and value != value):  # None or NaN: a missing cell
            return ""
        return check_encodable(str(value).strip(), where)

    def check_example(self, texts: tuple[Any, ...], label: Any, where: str) -> None:
        """Refuse an example whose read text and label do not fit together (one line naming ``where``)."""

    def split_note(self, labels: list[Any], names: list[str]) -> str | None:
        """Something worth telling the user about a split's read labels (a warning line), or None."""
        return None

    def read_label(self, value: Any, names: list[str], where: str) -> Any:
        """One raw label value from a data file -> what the dataset stores (``where`` names file and row)."""
        raise NotImplementedError

    def check_tokenized(self, tokenizer: Any, split: Any, spec: Any) -> tuple[int, str] | None:
        """The first example of a read split (a ``datasets.Dataset``) that this kind cannot encode with ``tokenizer``
        (its row and why), or None; checked before any split is tokenised."""
        return None

    # ---- encoding and collation ----------------------------------------------------------------
    def encode(self, tokenizer: Any, batch: dict[str, list], indices: list[int], spec: Any) -> dict[str, list]:
        """Rows for the encoder from a batch of read examples (``label`` column included; ``indices``: their rows in
        the split; ``spec``: the task's `TaskSpec`): one row per example here, the text (or sentence pair) truncated
        at the spec's ``max_length``, its label as ``labels``."""
        encoded = tokenizer(*[batch[f] for f in spec.text_fields], truncation=True, max_length=spec.max_length)
        out = {k: encoded[k] for k in MODEL_INPUTS if k in encoded}
        out["labels"] = batch["label"]
        return out

    def collate(self, column: str, values: list[Any], width: int) -> torch.Tensor:
        """One of a batch's columns besides the encoder inputs (``labels``, and what `encode` adds) as a tensor;
        ``width``: the batch's padded token length."""
        return torch.tensor(values, dtype=self.label_dtype if column == "labels" else torch.long)

    def encode_text(self, tokenizer: Any, text: str, max_length: int, doc_stride: int) -> EncodedText:
        """A raw text as encoder rows: here one, truncated at ``max_length`` (``doc_stride``: see the taggers)."""
        plain_text(text, self.name)
        encoded = tokenizer(text, truncation=True, max_length=max_length)
        return EncodedText(text, [{k: list(encoded[k]) for k in MODEL_INPUTS if k in encoded}])

    # ---- the head ------------------------------------------------------------------------------
    def head_outputs(self, labels: list[str]) -> int:
        """Width of the head's output layer."""
        return len(labels)

    def head_settings(self, num_outputs: int, pooling: str, dropout: float) -> dict[str, Any]:
        """What a head built with these arguments reports as its ``settings()`` (a `PartPool` keeps heads under it)."""
        return {"num_outputs": num_outputs, "problem": self.name, "pooling": pooling, "dropout": dropout}

    def build_head(self, hidden_size: int, num_outputs: int, pooling: str, dropout: float) -> nn.Module:
        """A new head; it gets all hidden states of its rows and their mask."""
        return TaskHead(hidden_size, num_outputs, self.name, pooling, dropout)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, per_batch: float | None = None) -> torch.Tensor:
        """Loss of a batch: the mean over its loss terms, or (kinds with several terms per row, given ``per_batch``:
        the mean count of terms in a training batch of the task) their sum divided by ``per_batch``."""
        raise NotImplementedError

    def loss_terms(self, labels: Any) -> int:
        """How many terms of the loss one encoded row's ``labels`` give (one here: a row is one term)."""
        return 1

    def predict(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction, score) per row."""
        raise NotImplementedError

    # ---- scores --------------------------------------------------------------------------------
    def metric(self, name: str, labels: list[str]) -> Any:
        """A fresh torchmetrics ``Metric`` called ``name`` (one of `metric_names`) for a task with these labels."""
        raise NotImplementedError

    def metric_inputs(self, logits: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        """What this kind's metrics' ``update`` takes, from a batch's logits and the batch."""
        return logits, batch["labels"].long()

    # ---- what is written -----------------------------------------------------------------------
    def file_row(self, labels: list[str] | None, pred: Any, score: Any) -> dict[str, Any]:
        """``label`` and ``score`` of one prediction file row, from one row of `predict`'s output (as lists)."""
        return {"label": pred, "score": score}

    def answer(self, labels: list[str] | None, logits: torch.Tensor) -> dict[str, Any]:
        """``label``, ``score`` and ``scores`` of the server's answer for one row's logits."""
        raise NotImplementedError

    def text_answer(self, labels: list[str] | None, logits: list[torch.Tensor], encoded: EncodedText,
                    spec: dict[str, Any] | None = None) -> dict[str, Any]:
        """The server's answer for one text from the logits of its `encode_text` rows (``spec``: the task's saved spec,
        for settings a kind reads when answering)."""
        return self.answer(labels, logits[0])

    def example_answer(self, labels: list[str] | None, logits: list[torch.Tensor], batch: dict[str, Any],
                       rows: list[int]) -> dict[str, Any]:
        """A windowed kind's prediction file row (``text`` included) for one example of a split, from the logits of
        its ``rows`` of ``batch`` (all its windows)."""
        raise NotImplementedError
