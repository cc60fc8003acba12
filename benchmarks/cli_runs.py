"""Run ``train.py fit`` then ``train.py test`` in a subprocess and read back the test metrics; keep results over seeds."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fit_and_test(config: str, run_dir: Path, args: list[str], test_args: list[str] | None = None,
                 test_only: bool = False) -> tuple[dict[str, float], float]:
    """Fit (best checkpoint by the config's monitor, saved as best.ckpt), test it; return test metrics and the fit's
    wall time. Logs go to ``<run_dir>/lightning/logs/{fit,test}/``."""
    common = ["--config", config, "--model.run_dir", str(run_dir), "--model.overwrite", "true",
              "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.name", "logs", *args]
    if not test_only:  # a previous variant's logs and best.ckpt in this run folder would be picked up instead
        for stage in ("fit", "test"):
            shutil.rmtree(run_dir / "lightning" / "logs" / stage, ignore_errors=True)
    start = time.perf_counter()
    if not test_only:
        _call(["fit", *common, "--trainer.logger.init_args.version", "fit"])
    wall = time.perf_counter() - start
    best = run_dir / "lightning" / "logs" / "fit" / "checkpoints" / "best.ckpt"
    _call(["test", *common, *(test_args or []), "--ckpt_path", str(best), "--trainer.logger.init_args.version", "test"])
    with open(run_dir / "lightning" / "logs" / "test" / "metrics.csv") as f:
        row = list(csv.DictReader(f))[-1]
    return {k: float(v) for k, v in row.items() if k.startswith("test/") and v}, wall


def best_fit_metric(run_dir: Path, name: str) -> float:
    """The highest value of a validation metric logged during the fit (the best checkpoint's, for a max monitor)."""
    with open(run_dir / "lightning" / "logs" / "fit" / "metrics.csv") as f:
        return max(float(row[name]) for row in csv.DictReader(f) if row.get(name))


def _call(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"train.py {args[0]} failed:\n{done.stderr[-3000:]}")


def run_seeds(store: Path, seeds: list[int], systems: list[str],
              runners: dict[str, Callable[[int], tuple[dict[str, float], float] | None]]) -> dict:
    """Run each system for each seed, keeping every result in ``store`` (JSON: system -> seed -> metrics and fit
    wall); a rerun of a system and seed replaces its result. A runner returning None is skipped with a note. Returns
    every kept result."""
    kept = json.loads(store.read_text()) if store.exists() else {}
    for seed in seeds:
        for system in systems:
            result = runners[system](seed)
            if result is None:
                print(f"  {system}: not run (see benchmarks/peers/README.md)", file=sys.stderr, flush=True)
                continue
            kept.setdefault(system, {})[str(seed)] = {"metrics": result[0], "wall_s": result[1]}
            store.parent.mkdir(parents=True, exist_ok=True)
            store.write_text(json.dumps(kept, indent=1))
            print(f"  {system} seed {seed}: {result}", file=sys.stderr, flush=True)
    return kept
