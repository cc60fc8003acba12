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


# the forms a raw example (a request's text, a row of a predict file) may take besides a plain text: the keys it has
FORMS = {"question": ("question", "context"), "choices": ("question", "choices")}
OPTIONAL_KEYS = {"question": (), "choices": ("context",)}
FORM_NAMES = {"text": "texts", "question": "questions about a context ({question, context})",
              "choices": "questions with answer choices ({question, choices} or {context, question, choices})"}
EXPECTED_EXAMPLE = ("a string, a question about a context {question, context}, or a question with answer choices "
                    "{question, choices[, context]}")


def read_example(value: Any, where: str) -> str | dict[str, Any]:
    """A raw example as a task reads it (the one place that checks its shape): a non-empty text, stripped; a question
    about a context ``{question, context}`` (the context kept as is: answers index its characters); or a question with
    answer choices ``{question, choices: [at least 2 texts], context (optional)}``. Else one line naming ``where``."""
    if isinstance(value, str):
        if not value.strip():
            raise MTLConfigError(f"{where}: got {value!r}, expected a non-empty string")
        return check_encodable(value.strip(), where)
    if not isinstance(value, dict):
        raise MTLConfigError(f"{where}: got {str(value)[:40]!r}, expected {EXPECTED_EXAMPLE}")
    form = example_form(value)
    allowed = set(FORMS[form]) | set(OPTIONAL_KEYS[form])
    if not set(FORMS[form]) <= set(value) <= allowed:
        raise MTLConfigError(f"{where}: got keys {sorted(value)}, expected {EXPECTED_EXAMPLE}")
    out: dict[str, Any] = {}
    for key, item in value.items():
        if key == "choices":
            if not isinstance(item, list) or len(item) < 2:
                raise MTLConfigError(f"{where}.choices: got {repr(item)[:40]}, expected a list of at least 2 answer "
                                     "texts")
            out[key] = [read_example(c, f"{where}.choices[{n}]") for n, c in enumerate(item)]
        elif not isinstance(item, str) or not item.strip():
            raise MTLConfigError(f"{where}.{key}: got {str(item)[:40]!r}, expected a non-empty string")
        else:  # a QA context keeps its characters (answers are offsets into it)
            out[key] = check_encodable(item if key == "context" and form == "question" else item.strip(),
                                       f"{where}.{key}")
    return out


def example_form(example: Any) -> str:
    """The form of an example, raw or read (`read_example`): ``text`` for a string, else ``choices`` or ``question``."""
    if isinstance(example, str):
        return "text"
    return "choices" if "choices" in example else "question"


def plain_text(text: Any, kind: str) -> str:
    """``text`` if it is a string; else one line saying what a task of ``kind`` reads."""
    if not isinstance(text, str):
        raise MTLConfigError(f"got {str(text)[:40]!r}, expected a string: a {kind} task reads one text")
    return text


@dataclass
class EncodedText:
    """One raw text (a request's, a prediction file's) as the encoder rows its task's kind reads: one row for a
    text, one per window of its words (``words``, ``offsets``: each word's characters in ``text``), or one per
    answer choice (``choices``)."""

    text: str
    rows: list[dict[str, list[int]]]
    words: list[str] | None = None
    offsets: list[tuple[int, int]] | None = None
    choices: list[str] | None = None


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
    text_fields_help = "one text column, or two for a sentence pair"  # what a spec's text_fields must name
    reads = "text"  # the form of a raw example a task of this kind answers (a request's, a predict file's): FORMS
    drops_empty = True  # an example with an empty text is dropped and counted (else `check_example` refuses it)
    windowed = False  # an example becomes several rows, each with its ``example``: the windows of a long text
    # (``doc_stride`` apart), or one row per answer choice (see `example_rows`)
    reads_words = False  # examples are lists of words (read from word-and-tag files; predicted per word)
    label_dtype = torch.float  # of ``labels`` in a batch
    terms_per_row = False  # a row gives several loss terms (one per labelled token): see `loss`
    # keys of a task's saved spec that its validation metrics choose (and its test metrics, predictions and answers
    # read): kept with each checkpoint, so the best checkpoint brings back what its own validation chose
    chosen_keys: tuple[str, ...] = ()

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

    def check_example(self, texts: tuple[Any, ...], label: Any, where: str, names: list[str]) -> Any:
        """The example's label once its read texts and label are checked together (one line naming ``where`` where
        they do not fit; ``names``: the spec's labels)."""
        return label

    def split_note(self, labels: list[Any], names: list[str]) -> str | None:
        """Something worth telling the user about a split's read labels (a warning line), or None."""
        return None

    def read_label(self, value: Any, names: list[str], where: str) -> Any:
        """One raw label value from a data file -> what the dataset stores (``where`` names file and row)."""
        raise NotImplementedError

    def example_rows(self, spec: Any) -> int | None:
        """The number of rows every example of a task with this spec encodes to, where they must share every batch,
        training too (one per answer choice); None: an example's rows train apart (windows)."""
        return None

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
    def metric(self, name: str, labels: list[str], spec: dict[str, Any] | None = None, stage: str = "val") -> Any:
        """A fresh torchmetrics ``Metric`` called ``name`` (one of `metric_names`) for a task with these labels, at
        ``stage`` (``val`` or ``test``) of the task whose saved spec is ``spec`` (see `chosen_keys`)."""
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
                       rows: list[int], spec: dict[str, Any] | None = None) -> dict[str, Any]:
        """A windowed kind's prediction file row (``text`` included) for one example of a split, from the logits of
        its ``rows`` of ``batch`` (all its windows; ``spec``: as for `text_answer`)."""
        raise NotImplementedError
