"""Multiple choice: a question (with an optional context) and a fixed number of answer choices, one of them right.

The spec's ``text_fields`` name the question's column and the choices' (a list of texts), with the context's column
first where there is one: ``[question, choices]`` or ``[context, question, choices]``. Its ``labels`` name the choice
positions (``[A, B, C]``: a task with 3 choices per example, always); a label in a file is a position's index, its
name, or the text of the right choice.

Each (context + question, choice) pair is one encoded row: the first segment is the context (the question where there
is none), the second the question and the choice (the choice alone where there is no context); a pair longer than
``max_length`` is cut from its longest segment. The rows of an example are consecutive in the tokenised split and
always share a batch: the training sampler draws whole examples (``batch_size`` counts examples, so a batch holds
``batch_size`` x choices rows) and evaluation batches hold whole examples. The head (`TaskHead`, one output) scores
each pooled row; the loss is the cross-entropy of a softmax over an example's choices. Metric: accuracy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from mtl.errors import MTLConfigError
from mtl.kinds.base import MODEL_INPUTS, EncodedText, TaskKind, check_encodable


def pairs(question: str, choices: list[str], context: str = "") -> list[tuple[str, str]]:
    """The (first, second) segment of each choice's row."""
    if context:
        return [(context, f"{question} {choice}") for choice in choices]
    return [(question, choice) for choice in choices]


def per_example(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(each example's choice scores [examples, choices], its right choice) from a batch of whole examples' rows: a
    score per row (``logits`` [rows, 1]) and ``labels`` 1 on each example's right row, 0 on the others."""
    examples = int(labels.sum())
    if examples == 0 or labels.shape[0] % examples:
        raise ValueError(f"a batch of {labels.shape[0]} rows with {examples} right choices: expected whole examples")
    choices = labels.shape[0] // examples
    return logits.reshape(examples, choices), labels.reshape(examples, choices).argmax(-1)


class MultipleChoice(TaskKind):
    """A label in a file is a choice's index, its position's name (the spec's ``labels``) or its text."""

    name = "multiple_choice"
    metric_titles = {"acc": "accuracy"}
    metric_names = ("acc",)
    default_metrics = ("acc",)
    headline = "acc"
    label_dtype = torch.long
    text_fields = 3  # context, question, choices
    min_text_fields = 2  # question, choices
    text_fields_help = "the question's column and the choices' (a list of texts), after the context's where there is one"
    drops_empty = False  # an empty question or choice is a mistake in the file
    windowed = True  # an example is one row per choice
    reads = "choices"

    def check_labels(self, labels: list[str]) -> str | None:
        """A name per choice position: at least 2."""
        return None if len(labels) >= 2 else "a name per choice position (at least 2, e.g. [A, B, C])"

    def head_outputs(self, labels: list[str]) -> int:
        """One score per (question, choice) row."""
        return 1

    def example_rows(self, spec: Any) -> int:
        """One row per choice."""
        return len(spec.labels)

    # ---- reading -------------------------------------------------------------------------------
    def read_text(self, value: Any, where: str) -> Any:
        """A context or question (stripped; "" when missing), or the list of choices (each a non-empty text)."""
        if isinstance(value, (list, tuple)):
            out = []
            for n, choice in enumerate(value):
                if not isinstance(choice, str) or not choice.strip():
                    raise MTLConfigError(f"{where}: choice {n + 1}: got {str(choice)[:40]!r}, expected a non-empty "
                                         "string")
                out.append(check_encodable(choice.strip(), f"{where}: choice {n + 1}"))
            return out
        return super().read_text(value, where)

    def read_label(self, value: Any, names: list[str], where: str) -> int | str:
        """A choice index, or a position's name -> the index; any other text is kept, to be found among the
        choices (`check_example`)."""
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value < len(names):
                raise MTLConfigError(f"{where}: label index {value} out of range, expected 0..{len(names) - 1} (one of "
                                     f"the {len(names)} choices)")
            return value
        if isinstance(value, str) and value.strip():
            return names.index(value) if value in names else value.strip()
        raise MTLConfigError(f"{where}: label {str(value)[:40]!r}, expected a choice index 0..{len(names) - 1}, one "
                             f"of {names}, or the right choice's text")

    def check_example(self, texts: tuple[Any, ...], label: Any, where: str, names: list[str]) -> int:
        """A question, as many choices as the spec names positions, and a label among them -> the right index."""
        *_, question, choices = texts
        if not isinstance(choices, list):
            raise MTLConfigError(f"{where}: choices: got {str(choices)[:40]!r}, expected a list of answer texts")
        if not question:
            raise MTLConfigError(f"{where}: the question is empty, expected text")
        if len(choices) != len(names):
            raise MTLConfigError(f"{where}: {len(choices)} choices, expected {len(names)} (the spec's labels "
                                 f"{names}: one per choice position{'; at least 2' if len(choices) < 2 else ''})")
        if isinstance(label, str):
            if label not in choices:
                raise MTLConfigError(f"{where}: label {label[:40]!r} is not among the choices {choices}, expected a "
                                     f"choice's text, its index or one of {names}")
            return choices.index(label)
        return label

    # ---- encoding ------------------------------------------------------------------------------
    def encode(self, tokenizer: Any, batch: dict[str, list], indices: list[int], spec: Any) -> dict[str, list]:
        """A row per (example, choice), an example's rows consecutive: the encoder inputs, ``labels`` (1 on the right
        choice, else 0), ``example`` (the row in the split) and the choice's text (``choice``)."""
        *context_field, question_field, choices_field = spec.text_fields
        out: dict[str, list] = {}
        for k, (question, choices, right) in enumerate(zip(batch[question_field], batch[choices_field],
                                                           batch["label"])):
            context = batch[context_field[0]][k] if context_field else ""
            first, second = zip(*pairs(question, choices, context))
            encoded = tokenizer(list(first), list(second), truncation=True, max_length=spec.max_length)
            for c, choice in enumerate(choices):
                row = {**{key: encoded[key][c] for key in MODEL_INPUTS if key in encoded},
                       "labels": int(c == right), "example": indices[k], "choice": choice}
                for key, value in row.items():
                    out.setdefault(key, []).append(value)
        return out

    def collate(self, column: str, values: list[Any], width: int) -> Any:
        """The choices' texts as a list; the rest as long tensors."""
        return values if column == "choice" else torch.tensor(values, dtype=torch.long)

    def encode_text(self, tokenizer: Any, text: Any, max_length: int, doc_stride: int) -> EncodedText:
        """A request's ``{question, choices, context (optional)}`` as one row per choice (any count >= 2)."""
        if not isinstance(text, dict) or "choices" not in text:
            raise MTLConfigError(f"got {str(text)[:40]!r}, expected {{question, choices}} (and an optional context): a "
                                 f"{self.name} task picks one of a question's answer choices")
        first, second = zip(*pairs(text["question"], text["choices"], text.get("context", "")))
        encoded = tokenizer(list(first), list(second), truncation=True, max_length=max_length)
        rows = [{key: list(encoded[key][c]) for key in MODEL_INPUTS if key in encoded} for c in range(len(first))]
        return EncodedText(text["question"], rows, choices=list(text["choices"]))

    # ---- the head ------------------------------------------------------------------------------
    def loss(self, logits: torch.Tensor, labels: torch.Tensor, per_batch: float | None = None) -> torch.Tensor:
        """Cross-entropy of the softmax over each example's choices (one term per example: the mean)."""
        scores, right = per_example(logits, labels)
        return F.cross_entropy(scores, right)

    def metric(self, name: str, labels: list[str], spec: dict[str, Any] | None = None, stage: str = "val") -> Any:
        """Accuracy over examples."""
        from torchmetrics.classification import MulticlassAccuracy  # torchmetrics imports Lightning's utilities

        return MulticlassAccuracy(len(labels), average="micro")

    def metric_inputs(self, logits: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        """Each example's choice scores and its right choice."""
        return per_example(logits, batch["labels"])

    # ---- what is written -----------------------------------------------------------------------
    def text_answer(self, labels: list[str] | None, logits: list[torch.Tensor], encoded: EncodedText,
                    spec: dict[str, Any] | None = None) -> dict[str, Any]:
        """The chosen choice: its text (``label``), its index (``choice``), its probability (``score``) and every
        choice's (``scores``, in the given order)."""
        return choose(logits, encoded.choices or [])

    def example_answer(self, labels: list[str] | None, logits: list[torch.Tensor], batch: dict[str, Any],
                       rows: list[int], spec: dict[str, Any] | None = None) -> dict[str, Any]:
        """An example of a split: its chosen choice (`choose`) and its first text field as ``text``."""
        return {**choose(logits, [batch["choice"][r] for r in rows]), "text": batch["text"][rows[0]]}


def choose(logits: list[torch.Tensor], choices: list[str]) -> dict[str, Any]:
    """The best of an example's choices from each choice row's score."""
    probs = torch.stack([x.float().reshape(-1)[0] for x in logits]).softmax(0)
    best = int(probs.argmax())
    return {"label": choices[best], "choice": best, "score": float(probs[best]), "scores": probs.tolist()}
