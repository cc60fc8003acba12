"""What a run prints: Lightning's start-up chatter filtered out by exact message, and fit's one summary line.

Only the messages listed here are dropped; every other log record and warning still shows.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import Any

# (logger, message pattern) of Lightning's informational lines that mtl says better itself or that say nothing
# about the run. Lightning's rank_zero_info logs through lightning.pytorch.utilities.rank_zero (fabric's
# rank_zero module hands its calls to the same logger once lightning.pytorch is imported).
CHATTER = {
    "lightning.pytorch.utilities.rank_zero": (
        r"^GPU available: ", r"^TPU available: ", r"^HPU available: ",  # the precision line names the device
        r"^💡 Tip: ",  # advertisements for Lightning's cloud logger (fit) and model registry (predict, test)
        r"^Using (16bit|bfloat16) Automatic Mixed Precision \(AMP\)$",  # said by mtl's precision line
        r"^Loading `train_dataloader` to estimate number of stepping batches\.$",
        r"^`Trainer\.fit` stopped: `max_epochs=\d+` reached\.$",  # fit's summary line counts the epochs
    ),
    "lightning.fabric.utilities.rank_zero": (r"^GPU available: ", r"^TPU available: ", r"^💡 Tip: "),
    "lightning.fabric.utilities.seed": (r"^(\[rank: \d+\] )?Seed set to \d+$",),  # the seed is in config.yaml
    "lightning.pytorch.accelerators.cuda": (r"^LOCAL_RANK: \d+ - CUDA_VISIBLE_DEVICES: ",),
}

# Trainer defaults of train.py fit and continual (a config or the command line still wins)
QUIET_TRAINER_DEFAULTS = {
    # mtl prints its own table of parts at the start of fit; Lightning's summary repeats it less clearly
    "enable_model_summary": False,
    # Lightning's 50 leaves the training loss out of the logs of epochs under 50 batches (the quickstart has 32)
    "log_every_n_steps": 10,
}


class DropMessages(logging.Filter):
    """Drops the records whose message matches one of ``patterns``."""

    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a listed message."""
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


def quiet_lightning() -> None:
    """Filter Lightning's start-up chatter (`CHATTER`) and two warnings that are no fault of the user's run;
    calling it again adds nothing."""
    for name, patterns in CHATTER.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages(patterns))
    # Lightning's own code uses torch's deprecated LeafSpec (torch 2.13 warns on every fit); nothing a user can change
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")
    # LightningCLI seeds every command; without seed_everything in the config it says so (the seed is in config.yaml)
    warnings.filterwarnings("ignore", message=r"No seed found, seed set to \d+")
    # epochs shorter than log_every_n_steps only log the training loss at epoch ends; the progress bar shows it anyway
    warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the logging "
                            r"interval Trainer\(log_every_n_steps=\d+\)")


def duration(seconds: float) -> str:
    """``42 s`` or ``2 min 41 s``."""
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def _scores(metrics: dict[str, Any], stage: str) -> str:
    """``task acc 0.981 f1 0.982, ...`` from ``<stage>/<task>/<metric>`` values (losses left out)."""
    by_task: dict[str, list[str]] = {}
    for key in sorted(metrics):
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == stage and parts[2] != "loss":
            by_task.setdefault(parts[1], []).append(f"{parts[2]} {float(metrics[key]):.3f}")
    if len(by_task) == 2 and "avg" in by_task:  # one task: its average is itself
        del by_task["avg"]
    order = sorted(by_task, key=lambda task: task == "avg")  # the average last
    return ", ".join(f"{task} {' '.join(by_task[task])}" for task in order)


def fit_summary(trainer: Any, exported: dict[str, Path], fit_seconds: float, test_metrics: dict[str, Any] | None,
                test_seconds: float = 0.0, tested: str = "") -> str:
    """The one line that ends ``train.py fit``: epochs and time, the best checkpoint and its score, test scores
    (``tested`` says which weights), and where each task was exported."""
    epochs = trainer.current_epoch
    parts = [f"fit: {epochs} epoch{'' if epochs == 1 else 's'}, {trainer.global_step} steps in {duration(fit_seconds)}"]
    callback = trainer.checkpoint_callback
    best = getattr(callback, "best_model_path", "")
    score = getattr(callback, "best_model_score", None)
    if best and score is not None:
        parts.append(f"best {callback.monitor} {float(score):.3f} ({best})")
    elif best:
        parts.append(f"checkpoint {best}")
    if test_metrics is not None:
        parts.append(f"test ({tested}, {duration(test_seconds)}): {_scores(test_metrics, 'test') or 'no scores'}")
    if exported:
        parts.append("exported " + ", ".join(f"{task} -> {path}" for task, path in exported.items()))
    return "; ".join(parts)
