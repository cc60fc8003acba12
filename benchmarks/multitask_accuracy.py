"""Joint multi-task training vs one adapter per task trained alone, on the offline tasks.

Usage: python benchmarks/multitask_accuracy.py [--tasks bbc_news tweet_sentiment language_id] [--epochs 3]

Runs ``train.py fit`` then ``train.py test`` (best checkpoint by val/avg/score) through configs/multitask.yaml
for: each task alone, all tasks jointly with one adapter each, and all tasks jointly with one shared adapter.
Every task trains on at most 1,000 examples (the config's caps). Prints test accuracy / macro-F1 per task and
the wall time of each fit. Outputs go to checkpoints/bench-multitask/.
"""

from __future__ import annotations

import argparse
import sys

from cli_runs import ROOT, fit_and_test

OUT = ROOT / "checkpoints" / "bench-multitask"


def run(variant: str, tasks: list[str], epochs: int, extra: list[str]) -> tuple[dict[str, float], float]:
    """Fit then test one variant; return its test metrics and the fit's wall time."""
    return fit_and_test("configs/multitask.yaml", OUT / variant,
                        ["--data.tasks", f"[{','.join(tasks)}]", "--trainer.max_epochs", str(epochs), *extra])


def main() -> None:
    """Run every variant and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["bbc_news", "tweet_sentiment", "language_id"])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    results = {}
    for task in args.tasks:
        results[f"alone: {task}"] = run(f"alone-{task}", [task], args.epochs, [])
        print(f"  alone {task}: {results[f'alone: {task}'][1]:.0f} s", file=sys.stderr, flush=True)
    results["joint, adapter per task"] = run("joint", args.tasks, args.epochs, [])
    print("  joint done", file=sys.stderr, flush=True)
    results["joint, one shared adapter"] = run("joint-shared", args.tasks, args.epochs,
                                               ["--model.adapter_sharing", "shared"])
    alone_wall = sum(results[f"alone: {t}"][1] for t in args.tasks)
    print(f"\nMiniLM-L6 + Pfeiffer, <=1,000 train examples per task, {args.epochs} epochs, test split\n")
    print("| task | alone acc / F1 | joint (adapter per task) acc / F1 | joint (shared adapter) acc / F1 |")
    print("|---|---:|---:|---:|")
    for task in args.tasks:
        cells = []
        for name in (f"alone: {task}", "joint, adapter per task", "joint, one shared adapter"):
            m = results[name][0]
            cells.append(f"{m[f'test/{task}/acc']:.3f} / {m[f'test/{task}/f1']:.3f}")
        print(f"| {task} | " + " | ".join(cells) + " |")
    avg = [sum(results[f"alone: {t}"][0][f"test/{t}/acc"] for t in args.tasks) / len(args.tasks),
           results["joint, adapter per task"][0]["test/avg/acc"], results["joint, one shared adapter"][0]["test/avg/acc"]]
    print(f"| macro average acc | {avg[0]:.3f} | {avg[1]:.3f} | {avg[2]:.3f} |")
    print(f"| fit wall time | {alone_wall:.0f} s (sum) | {results['joint, adapter per task'][1]:.0f} s "
          f"| {results['joint, one shared adapter'][1]:.0f} s |")


if __name__ == "__main__":
    main()
