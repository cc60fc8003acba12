"""How well a router does on a mixed stream of tasks: routing accuracy, confusion, routed vs task-given accuracy.

Routed accuracy counts a row as right only when the router picked its true task AND that head gave its label;
task-given accuracy is what the true task's head gets when the task id is known. Their gap is the price of
not knowing the task. A tagger's row is a window of a sentence, and it counts as right when every word it labels
gets its true tag (an exact match of the row: a tagger's task-given accuracy is not its word accuracy).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mtl.atomic import write_bytes_atomic
from mtl.figures import png_bytes, pyplot
from mtl.kinds.base import IGNORE
from mtl.routing.base import Router, check_routable, inference, label_of

if TYPE_CHECKING:
    from mtl.model import MTLModel


def _rate(hits: int, rows: int) -> float | None:
    return hits / rows if rows else None


def answer_is_right(answer: int | list[int], truth: torch.Tensor) -> bool:
    """Whether one row's answer (`label_of`) is its true label: a classifier's label index, or a tagger's tag at every
    labelled token (``truth`` ``[tokens]``, IGNORE where no word starts; the answer has one tag per token)."""
    if isinstance(answer, int):
        return answer == int(truth)
    truth = truth.reshape(-1).tolist()
    return len(answer) == len(truth) and all(a == t for a, t in zip(answer, truth) if t != IGNORE)


def routing_report(model: MTLModel, router: Router, batches: dict[str, Sequence[dict[str, Any]]]) -> dict[str, Any]:
    """Route every batch (keyed by its true task) and score it; a JSON-ready dict (accuracies None for no rows).

    Keys: ``router`` (kind), ``tasks`` (the confusion axes: true tasks, then other chosen ones),
    ``confusion`` (rows: true task, columns: chosen task, counts), ``per_task`` and ``overall`` (``rows``,
    ``routing_accuracy``, ``routed_accuracy``, ``task_given_accuracy``).
    """
    device = next(model.parameters()).device
    check_routable(model, list(batches))
    counts: dict[tuple[str, str], int] = {}
    scores = {t: {"rows": 0, "routed": 0, "correct": 0, "given": 0} for t in batches}
    for true, task_batches in batches.items():
        for batch in task_batches:
            ids, mask, types = (batch[k].to(device) if batch.get(k) is not None else None
                                for k in ("input_ids", "attention_mask", "token_type_ids"))
            answers = router.predict(model, ids, mask, types)
            with inference(model):
                given = model(ids, mask, types, tasks=true)[true]
            score = scores[true]
            for (chosen, answer), truth, alone in zip(answers, batch["labels"].cpu(), given):
                counts[true, chosen] = counts.get((true, chosen), 0) + 1
                score["rows"] += 1
                score["routed"] += chosen == true
                score["correct"] += chosen == true and answer_is_right(answer, truth)
                score["given"] += answer_is_right(label_of(alone), truth)
    axis = list(dict.fromkeys([*batches, *router.tasks, *(c for _, c in counts)]))
    summary = {"rows": 0, "routed": 0, "correct": 0, "given": 0}
    for score in scores.values():
        for key in summary:
            summary[key] += score[key]

    def rates(s: dict[str, int]) -> dict[str, Any]:
        return {"rows": s["rows"], "routing_accuracy": _rate(s["routed"], s["rows"]),
                "routed_accuracy": _rate(s["correct"], s["rows"]), "task_given_accuracy": _rate(s["given"], s["rows"])}

    return {"router": router.kind, "tasks": axis,
            "confusion": [[counts.get((t, c), 0) for c in axis] for t in axis],
            "per_task": {t: rates(s) for t, s in scores.items()}, "overall": rates(summary)}


def save_confusion_png(report: dict[str, Any], path: str | Path) -> None:
    """The confusion matrix as a heatmap PNG (colour: share of the true task's rows; text: counts), atomically."""
    plt = pyplot()

    tasks, counts = report["tasks"], report["confusion"]
    shares = [[v / max(sum(row), 1) for v in row] for row in counts]
    fig, ax = plt.subplots(figsize=(1.6 + 0.9 * len(tasks), 1.2 + 0.6 * len(tasks)))
    image = ax.imshow(shares, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel("chosen task")
    ax.set_ylabel("true task")
    for i, row in enumerate(counts):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if shares[i][j] < 0.6 else "black",
                    fontsize=8)
    accuracy = report["overall"]["routing_accuracy"]
    ax.set_title(f"{report['router']} router: routing accuracy "
                 f"{'n/a' if accuracy is None else f'{accuracy:.3f}'}")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    write_bytes_atomic(path, png_bytes(fig))

