"""A tagger trained jointly with classifiers: CoNLL-2003 NER with bbc_news and language_id, each task next to its
single-task runs, over seeds.

Usage: python benchmarks/tagging_multitask.py [--seeds 0 1 2] [--joint-seeds 0 1 2] [--epochs 8]
       [--alone-from checkpoints/bench-tagging]

Every run is ``train.py fit`` then ``train.py test`` with configs/tagging.yaml's settings (Pfeiffer r16 on MiniLM-L6,
lr 5e-3, batch 32, 8 epochs, best checkpoint by val/avg/score, the mean of the tasks' headline metrics) and each
task's own spec caps (NER 3,000 train sentences; bbc_news 1,000 articles; language_id all of its train split).
Joint runs draw one task per batch in proportion to the tasks' sizes. Prints each task's headline (entity F1 for
NER, accuracy for the classifiers) per seed, alone and joint, and whether the joint median lies within the alone
runs' spread. NER alone is read from benchmarks/tagging_accuracy.py's runs when ``--alone-from`` holds them.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

from cli_runs import ROOT, fit_and_test

OUT = ROOT / "checkpoints" / "bench-tagging-multitask"
TASKS = {"conll2003_ner": "f1", "bbc_news": "acc", "language_id": "acc"}


def fit(name: str, tasks: list[str], seed: int, epochs: int) -> dict[str, float]:
    """One fit and test; each task's headline on the test split."""
    metrics, _ = fit_and_test("configs/tagging.yaml", OUT / f"{name}-{seed}",
                              ["--data.tasks", f"[{','.join(tasks)}]", "--seed_everything", str(seed),
                               "--trainer.max_epochs", str(epochs), "--model.test_after_fit", "false"])
    return {t: metrics[f"test/{t}/{TASKS[t]}"] for t in tasks}


def earlier_ner(folder: Path, seed: int) -> float | None:
    """NER alone from benchmarks/tagging_accuracy.py's run of this seed (its test metrics), if there is one."""
    path = folder / f"mtl-{seed}" / "lightning" / "logs" / "test" / "metrics.csv"
    if not path.exists():
        return None
    with open(path) as f:
        row = list(csv.DictReader(f))[-1]
    return float(row["test/conll2003_ner/f1"])


def main() -> None:
    """Run the single-task and joint fits and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--joint-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--alone-from", type=Path, default=ROOT / "checkpoints" / "bench-tagging")
    args = parser.parse_args()
    alone: dict[str, list[float]] = {t: [] for t in TASKS}
    for seed in args.seeds:
        for task in TASKS:
            score = earlier_ner(args.alone_from, seed) if task == "conll2003_ner" else None
            alone[task].append(score if score is not None else fit(task, [task], seed, args.epochs)[task])
            print(f"  alone {task} seed {seed}: {alone[task][-1]:.4f}", file=sys.stderr, flush=True)
    joint: dict[str, list[float]] = {t: [] for t in TASKS}
    for seed in args.joint_seeds:
        for task, value in fit("joint", list(TASKS), seed, args.epochs).items():
            joint[task].append(value)
        print(f"  joint seed {seed}: {[round(v[-1], 4) for v in joint.values()]}", file=sys.stderr, flush=True)
    print(f"\nMiniLM-L6 + Pfeiffer r16, lr 5e-3, {args.epochs} epochs; test split; alone seeds {args.seeds}, joint "
          f"seeds {args.joint_seeds}\n")
    print("| task (headline) | alone per seed | alone median (min-max) | joint per seed | joint median | "
          "joint median within the alone spread |")
    print("|---|---|---:|---|---:|---|")
    for task, metric in TASKS.items():
        a, j = alone[task], joint[task]
        inside = min(a) <= statistics.median(j) <= max(a) or statistics.median(j) > max(a)
        print(f"| {task} ({'entity F1' if metric == 'f1' else 'accuracy'}) | {' '.join(f'{v:.3f}' for v in a)} | "
              f"{statistics.median(a):.3f} ({min(a):.3f}-{max(a):.3f}) | {' '.join(f'{v:.3f}' for v in j)} | "
              f"{statistics.median(j):.3f} | {'yes' if inside else 'no'}"
              f"{' (above)' if statistics.median(j) > max(a) else ''} |")


if __name__ == "__main__":
    main()
