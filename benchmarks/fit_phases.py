"""Run ``train.py`` with phase timestamps, for benchmarks/fit_wall.py; mtl's own files are not touched.

    FIT_PHASES_OUT=phases.json python benchmarks/fit_phases.py fit --config configs/quickstart.yaml ... \
        --trainer.callbacks+=fit_phases.PhaseTimer

Everything after the script name goes to ``mtl.cli.main`` as ``train.py`` would get it. Two kinds of records, all
``time.time()`` stamps (so that fit_wall.py can set them against the launch time it took before starting the
process):

- Trainer hooks, from the ``PhaseTimer`` callback (``--trainer.callbacks+=fit_phases.PhaseTimer``): ``setup``
  (after the data module's ``prepare_data`` / ``setup``), ``train_epoch_start`` / ``train_epoch_end``,
  ``validation_start`` / ``validation_end`` (the sanity check too), ``test_start`` / ``test_end``, ``fit_end``.
- Spans of calls wrapped here: ``data`` (``load_task_dataset``, reading and splitting a task's data, and
  ``TaskDataModule._tokenised``, tokenising it into the cache; nested calls count once), ``checkpoint``
  (``Trainer.save_checkpoint``) and ``export`` (``AdapterTrainer.on_fit_end``: restoring the best checkpoint and
  writing the adapters).

At exit the records go to the JSON file named by ``FIT_PHASES_OUT`` (nothing is written without it), with the best
checkpoint's path. `phases` turns a record into seconds per phase.
"""

from __future__ import annotations

import time

IMPORTED = time.time()

import atexit  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

from lightning.pytorch.callbacks import Callback  # noqa: E402

EVENTS: list[tuple[str, float]] = []  # (hook, time.time())
SPANS: list[tuple[str, float, float]] = []  # (kind, start, end)
INFO: dict[str, Any] = {"imported": IMPORTED}
_depth: dict[str, int] = {}


def mark(name: str) -> None:
    EVENTS.append((name, time.time()))


class PhaseTimer(Callback):
    """Stamps the Trainer hooks that bound mtl's phases (see the module docstring)."""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        mark("setup")

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        mark("train_epoch_start")

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        mark("train_epoch_end")

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        mark("validation_start")

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        mark("validation_end")

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        mark("test_start")

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        mark("test_end")

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        mark("fit_end")
        callback = trainer.checkpoint_callback
        INFO["best_model_path"] = getattr(callback, "best_model_path", "") or ""
        INFO["global_step"] = int(trainer.global_step)
        INFO["epochs"] = int(trainer.current_epoch)


def timed(owner: Any, attr: str, kind: str) -> None:
    """Replace ``owner.attr`` by a wrapper that records its outermost calls as ``kind`` spans."""
    original = getattr(owner, attr)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        depth = _depth.get(kind, 0)
        _depth[kind] = depth + 1
        start = time.time()
        try:
            return original(*args, **kwargs)
        finally:
            _depth[kind] = depth
            if depth == 0:
                SPANS.append((kind, start, time.time()))

    setattr(owner, attr, wrapper)


def install() -> None:
    """Wrap the data, checkpoint and export calls (class and module attributes, looked up at call time)."""
    import lightning.pytorch as pl

    import mtl.data.module as data_module
    from mtl.lit import AdapterTrainer

    timed(data_module, "load_task_dataset", "data")
    timed(data_module.TaskDataModule, "_tokenised", "data")
    timed(pl.Trainer, "save_checkpoint", "checkpoint")
    timed(AdapterTrainer, "on_fit_end", "export")


def dump() -> None:
    path = os.environ.get("FIT_PHASES_OUT")
    if not path:
        return
    record = {"events": EVENTS, "spans": SPANS, **INFO, "exited": time.time()}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f)


def _overlap(start: float, end: float, spans: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(end, e) - max(start, s)) for s, e in spans)


def _pairs(events: list[tuple[str, float]], begin: str, finish: str) -> list[tuple[float, float]]:
    """(start, end) of each ``begin`` ... ``finish`` pair, in order."""
    out, opened = [], None
    for name, t in events:
        if name == begin:
            opened = t
        elif name == finish and opened is not None:
            out.append((opened, t))
            opened = None
    return out


def phases(record: dict[str, Any], launch: float, wall: float) -> dict[str, float]:
    """Seconds per phase of one process: ``startup`` (launch to the Trainer's ``setup`` hook, less data reading in
    between: imports, configuration, the backbone, the Trainer), ``data``, ``train`` (the training epochs less the
    validation and checkpoint writes inside them), ``validation`` (the sanity check too), ``test``, ``export``
    (checkpoint writes and the final adapter export) and ``other`` (``wall`` less all of those: the rest, such as
    printing, loading a checkpoint for test, and the process's exit)."""
    events = [(str(n), float(t)) for n, t in record.get("events", [])]
    spans = [(str(k), float(s), float(e)) for k, s, e in record.get("spans", [])]
    data = [(s, e) for k, s, e in spans if k == "data"]
    saves = [(s, e) for k, s, e in spans if k == "checkpoint"]
    exports = [(s, e) for k, s, e in spans if k == "export"]
    vals = _pairs(events, "validation_start", "validation_end")
    tests = _pairs(events, "test_start", "test_end")
    epochs = _pairs(events, "train_epoch_start", "train_epoch_end")
    setup = next((t for n, t in events if n == "setup"), None)
    out = {
        "data": sum(e - s for s, e in data),
        "train": sum((e - s) - _overlap(s, e, vals) - _overlap(s, e, saves) for s, e in epochs),
        "validation": sum(e - s for s, e in vals),
        "test": sum(e - s for s, e in tests),
        # a checkpoint written inside an export (none today) would count twice without the overlap
        "export": sum(e - s for s, e in exports) + sum(e - s for s, e in saves) - sum(
            _overlap(s, e, saves) for s, e in exports),
    }
    out["startup"] = max(0.0, (setup - launch) - _overlap(launch, setup, data)) if setup is not None else 0.0
    out["other"] = wall - sum(out.values())
    return out


def main() -> None:
    install()
    atexit.register(dump)
    from mtl.cli import main as mtl_main

    mtl_main()


if __name__ == "__main__":
    # run through the importable module (benchmarks/ is sys.path[0] here), so that the callback class that
    # --trainer.callbacks+=fit_phases.PhaseTimer names records into the same lists as the wrappers
    sys.modules.pop("fit_phases", None)
    import fit_phases

    fit_phases.main()
