"""Extractive question answering: the answer to a question is a span of its context (SQuAD style).

An example is a question, a context and its gold answers (each a text and the character where it starts in the
context; none: the question has no answer in the context). The encoder sees (question, context) pairs; a context too
long for one window of ``max_length`` tokens is cut into overlapping windows (``doc_stride`` tokens shared, the fast
tokenizer's offset mapping keeping each token's characters). Training labels a window with the start and end tokens
of the first gold answer, or with the first token ([CLS]) where the answer is not wholly inside it. The head gives a
start and an end logit per token. A window's best span maximises start + end logit over context tokens with
start <= end < start + ``max_answer_length`` (the spec's; default 30, SQuAD's); an example's answer is the best
span over its windows, mapped back to characters of the context. Metrics: SQuAD's exact match and F1
(`mtl.kinds.answer_match`), headline F1.

A task whose spec says ``no_answer: true`` (SQuAD 2.0 style) may answer "no answer": an example's null score is the
lowest start + end logit of [CLS] over its windows, and the answer is empty where that beats the best span by more
than the task's threshold, which validation chooses (`mtl.kinds.answer_scores`) and the task's saved spec keeps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from mtl.errors import MTLConfigError
from mtl.kinds.base import MODEL_INPUTS, EncodedText, TaskKind, check_encodable
from mtl.kinds.answer_match import THRESHOLD_KEY, exact_match, f1_score, no_answer_threshold
from mtl.kinds.token_classification import TokenHead

MAX_ANSWER_TOKENS = 30  # the longest span a prediction may be, unless the spec says (SQuAD's max_answer_length)
NO_OFFSET = (-1, -1)  # a token outside the context (the question, special tokens, padding)


class QAHead(TokenHead):
    """Dropout -> Linear(H, 2) on every token: a start and an end logit (AdapterHub's question-answering head with one
    layer); padding gets the lowest logit, so no span and no softmax mass falls on it."""

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """[rows, tokens, 2]: start and end logits."""
        logits = self.out(self.dropout(hidden))
        if attention_mask is None:
            return logits
        return logits.masked_fill(~attention_mask.bool().unsqueeze(-1), torch.finfo(logits.dtype).min)


def best_spans(logits: torch.Tensor, offsets: torch.Tensor, longest: int = MAX_ANSWER_TOKENS
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row (window) the best span of at most ``longest`` tokens over its context tokens: (start token, end token,
    start + end logit); a row without context tokens gets (0, 0, -inf)."""
    start, end = logits[..., 0].float(), logits[..., 1].float()
    context = offsets[..., 0] >= 0
    low = torch.finfo(start.dtype).min / 4  # halved twice: start + end of two masked tokens stays finite
    start, end = start.masked_fill(~context, low), end.masked_fill(~context, low)
    pair = start.unsqueeze(2) + end.unsqueeze(1)  # [rows, start token, end token]
    tokens = pair.shape[1]
    at = torch.arange(tokens, device=pair.device)
    allowed = (at.unsqueeze(0) >= at.unsqueeze(1)) & (at.unsqueeze(0) < at.unsqueeze(1) + longest)
    pair = pair.masked_fill(~allowed, float("-inf"))
    score, flat = pair.reshape(pair.shape[0], -1).max(-1)
    score = torch.where(context.any(-1), score, torch.full_like(score, float("-inf")))
    return flat // tokens, flat % tokens, score


class ExtractiveQA(TaskKind):
    """A label in a file is a list of answers ``{text, answer_start}`` (empty: no answer in the context)."""

    name = "extractive_qa"
    metric_titles = {"exact": "exact match", "f1": "SQuAD F1"}
    metric_names = ("exact", "f1")
    default_metrics = ("exact", "f1")
    headline = "f1"
    label_dtype = torch.long
    windowed = True
    drops_empty = False  # a question without words or a context without text is a mistake in the file
    min_text_fields = 2  # the question and the context
    text_fields_help = "two columns: the question's and the context's"
    reads = "question"
    chosen_keys = (THRESHOLD_KEY,)

    def check_labels(self, labels: list[str]) -> str | None:
        """None: the answer is a span of the context, there are no label names."""
        return None if not labels else "no labels (the answer is a span of the context): leave labels out"

    def head_outputs(self, labels: list[str]) -> int:
        """A start and an end logit per token."""
        return 2

    def read_label(self, value: Any, names: list[str], where: Any) -> list[dict[str, Any]]:
        """A list of answers, each ``{text, answer_start}`` with a non-empty text and a character index >= 0."""
        where = where[0] if isinstance(where, list) and where else where
        if value is None:
            return []
        if isinstance(value, dict):  # SQuAD 1.1 style single answer
            value = [value]
        if not isinstance(value, list):
            raise MTLConfigError(f"{where}: got {str(value)[:60]!r}, expected a list of answers "
                                 "{text, answer_start} (empty: no answer)")
        out = []
        for n, answer in enumerate(value):
            text, start = (answer.get("text"), answer.get("answer_start")) if isinstance(answer, dict) else (None, None)
            if not isinstance(text, str) or not text.strip() or not isinstance(start, int) or isinstance(start, bool) \
                    or start < 0:
                raise MTLConfigError(f"{where}: answer {n + 1}: got {str(answer)[:60]!r}, expected "
                                     "{text: non-empty string, answer_start: int >= 0}")
            out.append({"text": check_encodable(text, f"{where}: answer {n + 1}"), "answer_start": start})
        return out

    def check_example(self, texts: tuple[Any, ...], label: Any, where: str, names: list[str]) -> Any:
        """A question and a context with text; each answer's text stands at its ``answer_start`` in the context."""
        for text, what in zip(texts, ("question", "context")):
            if not text:
                raise MTLConfigError(f"{where}: the {what} is empty, expected text")
        context = texts[1]
        for n, answer in enumerate(label):
            start, text = answer["answer_start"], answer["text"]
            if context[start:start + len(text)] != text:
                raise MTLConfigError(f"{where}: answer {n + 1}: {text[:40]!r} is not at answer_start {start} of the "
                                     f"context (found {context[start:start + len(text)][:40]!r}), expected the answer's "
                                     "text at that character")
        return label

    def read_text(self, value: Any, where: str) -> str:
        """A question or a context, as given (a context keeps its spaces: answers index its characters)."""
        if value is None or (isinstance(value, float) and value != value):
            return ""
        text = check_encodable(str(value), where)
        return text if text.strip() else ""

    # ---- encoding ------------------------------------------------------------------------------
    def encode(self, tokenizer: Any, batch: dict[str, list], indices: list[int], spec: Any) -> dict[str, list]:
        """A row per window of each (question, context): the encoder inputs, ``labels`` = [start, end] token of the
        first answer (0, 0 where it is not in the window), ``offsets`` (characters of each context token, -1 outside
        the context), ``example`` (the row in the split), and what the metrics read: the ``context``, the gold answer
        texts (``golds``) and the ``longest`` answer to consider (the spec's ``max_answer_length``)."""
        questions, contexts = batch[spec.text_fields[0]], batch[spec.text_fields[1]]
        out: dict[str, list] = {}
        for example, inputs, offsets in windows(tokenizer, questions, contexts, spec.max_length, spec.stride):
            answers = batch["label"][example]
            row = {**inputs, "labels": answer_tokens(offsets, answers[0] if answers else None),
                   "longest": spec.max_answer_length or MAX_ANSWER_TOKENS,
                   "offsets": [list(o) for o in offsets], "example": indices[example], "context": contexts[example],
                   "golds": [a["text"] for a in answers]}
            for key, value in row.items():
                out.setdefault(key, []).append(value)
        return out

    def check_tokenized(self, tokenizer: Any, split: Any, spec: Any) -> tuple[int, str] | None:
        """The first question that leaves a window no room for its context (see `check_room`)."""
        return check_room(tokenizer, list(split[spec.text_fields[0]]), spec.max_length, spec.stride)

    def encode_text(self, tokenizer: Any, text: Any, max_length: int, doc_stride: int) -> EncodedText:
        """A request's ``{question, context}`` as the windows of its context (``offsets`` per row); ``text``: the
        context, which the answer's characters index."""
        if not isinstance(text, dict) or sorted(text) != ["context", "question"] or \
                not all(isinstance(v, str) for v in text.values()):
            raise MTLConfigError(f"got {str(text)[:40]!r}, expected {{question, context}}: an {self.name} task "
                                 "answers a question about a context")
        too_long = check_room(tokenizer, [text["question"]], max_length, doc_stride)
        if too_long is not None:
            raise MTLConfigError(too_long[1])
        rows = [{**inputs, "offsets": offsets}
                for _, inputs, offsets in windows(tokenizer, [text["question"]], [text["context"]], max_length,
                                                  doc_stride)]
        return EncodedText(text["context"], rows)

    def text_answer(self, labels: list[str] | None, logits: list[torch.Tensor], encoded: EncodedText,
                    spec: dict[str, Any] | None = None) -> dict[str, Any]:
        """The answer (`best_answer`): at most the task spec's ``max_answer_length`` tokens long, or "no answer" where
        the spec allows one."""
        offsets = [torch.tensor(r["offsets"], dtype=torch.long) for r in encoded.rows]
        return best_answer(logits, offsets, encoded.text, (spec or {}).get("max_answer_length") or MAX_ANSWER_TOKENS,
                           no_answer_threshold(spec))

    def collate(self, column: str, values: list[Any], width: int) -> Any:
        """``offsets`` padded to the batch's width with -1; the context and gold texts as lists."""
        if column in ("context", "golds"):
            return values
        if column == "offsets":
            return torch.tensor([list(v) + [list(NO_OFFSET)] * (width - len(v)) for v in values], dtype=torch.long)
        return torch.tensor(values, dtype=torch.long)

    # ---- the head ------------------------------------------------------------------------------
    def head_settings(self, num_outputs: int, pooling: str, dropout: float) -> dict[str, Any]:
        """As for every kind, with pooling ``none`` (every token gets its logits)."""
        return {**super().head_settings(num_outputs, pooling, dropout), "pooling": "none"}

    def build_head(self, hidden_size: int, num_outputs: int, pooling: str, dropout: float) -> QAHead:
        """A `QAHead`."""
        return QAHead(hidden_size, num_outputs, self.name, "none", dropout)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, per_batch: float | None = None) -> torch.Tensor:
        """The mean of the start and end tokens' cross-entropies (one term per window: ``per_batch`` does not
        apply)."""
        labels = labels.long()
        return (F.cross_entropy(logits[..., 0], labels[:, 0]) + F.cross_entropy(logits[..., 1], labels[:, 1])) / 2

    # ---- predictions ---------------------------------------------------------------------------
    def example_answer(self, labels: list[str] | None, logits: list[torch.Tensor], batch: dict[str, Any],
                       rows: list[int], spec: dict[str, Any] | None = None) -> dict[str, Any]:
        """An example of a split: its answer (`best_answer`) and its question as ``text``."""
        return {**best_answer(logits, [batch["offsets"][r] for r in rows], batch["context"][rows[0]],
                              int(batch["longest"][rows[0]]), no_answer_threshold(spec)),
                "text": batch["text"][rows[0]]}

    # ---- scores --------------------------------------------------------------------------------
    def metric(self, name: str, labels: list[str], spec: dict[str, Any] | None = None, stage: str = "val") -> Any:
        """SQuAD's ``exact`` or ``f1``, each example counted once (`AnswerScores`: validation chooses the no-answer
        threshold of a ``no_answer`` task and writes it into ``spec``)."""
        from mtl.kinds.answer_scores import AnswerScores  # torchmetrics imports Lightning's utilities

        return AnswerScores(name, spec, choose=stage == "val")

    def metric_inputs(self, logits: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        """Per window: its example, its best span's score, its null score ([CLS] as start and end), that span's exact
        match and F1 against the golds, and what an empty answer scores (as SQuAD counts it)."""
        start, end, score = best_spans(logits, batch["offsets"], int(batch["longest"][0]))
        null = logits[:, 0, 0].float() + logits[:, 0, 1].float()
        offsets = batch["offsets"].tolist()
        exact, f1 = [], []
        for row, (s, e) in enumerate(zip(start.tolist(), end.tolist())):
            a, b = offsets[row][s][0], offsets[row][e][1]
            answer = batch["context"][row][a:b] if a >= 0 else ""
            exact.append(exact_match(answer, batch["golds"][row]))
            f1.append(f1_score(answer, batch["golds"][row]))
        # an empty answer scores 1 against no gold answer, and against a gold that normalises to nothing ("An"):
        # exact match and F1 agree on it
        empty = torch.tensor([exact_match("", golds) for golds in batch["golds"]])
        return batch["example"], score, null, torch.tensor(exact), torch.tensor(f1), empty


def best_answer(logits: list[torch.Tensor], offsets: list[torch.Tensor], context: str,
                longest: int = MAX_ANSWER_TOKENS, threshold: float | None = None) -> dict[str, Any]:
    """An example's answer from its windows' logits and token offsets: the best span over all windows, as ``label``
    (its text), ``start`` / ``end`` (characters of ``context``) and ``score`` (the span's probability in its window:
    softmax of its start times softmax of its end). With a no-answer ``threshold``, ``no_answer`` too: true (``label``
    "", ``start`` / ``end`` None, ``score`` [CLS]'s probability as start and end) where the lowest null score over
    the windows minus the best span's score exceeds it."""
    if not logits:
        return {"label": "", "start": 0, "end": 0, "score": 0.0}
    # a window's logits may be padded to its batch's width: its own tokens are those its offsets cover
    stacked = torch.nn.utils.rnn.pad_sequence([x[:len(o)].float() for x, o in zip(logits, offsets)], batch_first=True,
                                              padding_value=torch.finfo(torch.float).min)
    where = torch.nn.utils.rnn.pad_sequence(offsets, batch_first=True, padding_value=-1)
    start, end, score = best_spans(stacked, where, longest)
    window = int(score.argmax())
    if threshold is not None:
        nulls = stacked[:, 0, 0] + stacked[:, 0, 1]
        if float(nulls.min() - score[window]) > threshold:
            probs = stacked[int(nulls.argmin())].softmax(0)
            return {"label": "", "start": None, "end": None, "score": float(probs[0, 0] * probs[0, 1]),
                    "no_answer": True}
    s, e = int(start[window]), int(end[window])
    a, b = int(where[window, s, 0]), int(where[window, e, 1])
    if a < 0:  # no window has a context token
        return {"label": "", "start": 0, "end": 0, "score": 0.0}
    probs = stacked[window].softmax(0)
    answer = {"label": context[a:b], "start": a, "end": b, "score": float(probs[s, 0] * probs[e, 1])}
    return answer if threshold is None else {**answer, "no_answer": False}


def answer_tokens(offsets: list[tuple[int, int]], answer: dict[str, Any] | None) -> list[int]:
    """[start, end] token of ``answer`` (characters) in a window whose context tokens have ``offsets``; [0, 0] (the
    first token, [CLS]) where there is no answer or it is not wholly inside the window."""
    if answer is None:
        return [0, 0]
    first, last = answer["answer_start"], answer["answer_start"] + len(answer["text"])
    tokens = [t for t, (a, b) in enumerate(offsets) if a >= 0 and b > a]
    if not tokens or offsets[tokens[0]][0] > first or offsets[tokens[-1]][1] < last:
        return [0, 0]
    start = next(t for t in tokens if offsets[t][1] > first)
    end = next(t for t in reversed(tokens) if offsets[t][0] < last)
    return [start, end]


def windows(tokenizer: Any, questions: list[str], contexts: list[str], max_length: int, stride: int
            ) -> list[tuple[int, dict[str, list[int]], list[tuple[int, int]]]]:
    """Each (question, context) pair's windows: (its position in the lists, the encoder inputs, each token's
    characters in the context or ``NO_OFFSET``)."""
    encoded = tokenizer(questions, contexts, truncation="only_second", max_length=max_length, stride=stride,
                        return_overflowing_tokens=True, return_offsets_mapping=True)
    inputs = [k for k in MODEL_INPUTS if k in encoded]
    out = []
    for row, example in enumerate(encoded["overflow_to_sample_mapping"]):
        sequence = encoded.sequence_ids(row)
        offsets = [tuple(o) if s == 1 else NO_OFFSET for o, s in zip(encoded["offset_mapping"][row], sequence)]
        out.append((example, {k: encoded[k][row] for k in inputs}, offsets))
    return out


def check_room(tokenizer: Any, questions: list[str], max_length: int, stride: int) -> tuple[int, str] | None:
    """The first question so long that a window of ``max_length`` tokens has no room for ``stride`` + 1 context
    tokens beside it (its position and why), or None."""
    room = max_length - tokenizer.num_special_tokens_to_add(pair=True) - stride - 1
    for n, question in enumerate(tokenizer(questions, add_special_tokens=False)["input_ids"]):
        if len(question) > room:
            return n, (f"the question {questions[n][:30]!r}... is {len(question)} tokens; with max_length {max_length} "
                       f"and doc_stride {stride} "
                       f"a window has room for questions of up to {room} tokens beside the context, expected a "
                       "shorter question (or raise max_length)")
    return None
