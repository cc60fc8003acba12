"""AdapterFusion vs the target's single adapter, where fusion should help: a small 3-way target task.

Usage: python benchmarks/fusion_accuracy.py [--seeds 0 1 2] [--epochs 10] [--prune 2]

Stage 1 (once): configs/multitask.yaml trains bbc_news, tweet_sentiment and language_id adapters (<= 1,000
examples each). Then per seed, in its own copy of that run folder:
- single adapter: configs/fusion_target.yaml trains tweet_sentiment3's own adapter on <= 300 examples;
- fusion: configs/fusion.yaml fuses tweet_sentiment, bbc_news, language_id and that adapter (same 300 examples,
  same epochs), training only the fusion layers and head;
- pruned fusion (``--prune m``): the m adapters with the highest mean validation attention in that seed's fusion,
  fused again from scratch (AdapterDrop paper, section on AdapterFusion).
``--batch-study`` instead trains the fusion of seed 0's run at batch 8, batch 8 with 4-step gradient accumulation
(effective 32) and batch 32, same epochs, and reports test accuracy, best validation accuracy and the training
loss range (AdapterHub users report divergence below an effective batch of 16).
Every variant is tested on the same capped test split (best checkpoint by validation accuracy). Prints test
accuracy and macro-F1 per seed and the mean, with each fit's wall time. Outputs go to checkpoints/bench-fusion/.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import statistics
import sys

from cli_runs import ROOT, best_fit_metric, fit_and_test

OUT = ROOT / "checkpoints" / "bench-fusion"
TARGET = "tweet_sentiment3"
FUSION = "tweet_sentiment3_fusion"
FUSED = ["tweet_sentiment", "bbc_news", "language_id", TARGET]


def stage_one(epochs: int) -> None:
    """The three source adapters, trained jointly once (skipped if already there)."""
    if all((OUT / "stage1" / "adapters" / t / "adapter.safetensors").is_file() for t in FUSED[:3]):
        return
    fit_and_test("configs/multitask.yaml", OUT / "stage1", ["--data.tasks", f"[{','.join(FUSED[:3])}]",
                                                            "--trainer.max_epochs", str(epochs)])


def run_seed(seed: int, epochs: int, prune: int | None) -> dict[str, tuple[dict[str, float], float]]:
    """Single adapter, fusion and (optionally) pruned fusion for one seed."""
    run = OUT / f"seed{seed}"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(OUT / "stage1" / "adapters", run / "adapters")
    common = ["--seed_everything", str(seed), "--model.load_from", str(run), "--trainer.max_epochs", str(epochs)]
    out = {"single adapter": fit_and_test("configs/fusion_target.yaml", run, common)}
    report(seed, "single adapter", out["single adapter"])
    metrics, wall = fit_and_test("configs/fusion.yaml", run, common)
    out["fusion (4 adapters)"] = ({k.replace(FUSION, TARGET): v for k, v in metrics.items()}, wall)
    report(seed, "fusion (4 adapters)", out["fusion (4 adapters)"])
    if prune:
        attention = json.loads((run / "fusions" / FUSION / "attention.json").read_text())
        keep = sorted(attention["overall"], key=attention["overall"].get, reverse=True)[:prune]
        keep = [a for a in attention["adapters"] if a in keep]
        print(f"  seed {seed}: attention {attention['overall']} -> keep {keep}", file=sys.stderr, flush=True)
        metrics, wall = fit_and_test("configs/fusion.yaml", run, common + [
            "--model.fusion.name", f"pruned{prune}", "--model.fusion.adapters", f"[{','.join(keep)}]"])
        out[f"pruned fusion (top {prune})"] = ({k.replace(f"pruned{prune}", TARGET): v for k, v in metrics.items()}, wall)
        report(seed, f"pruned fusion (top {prune})", out[f"pruned fusion (top {prune})"])
    return out


def report(seed: int, variant: str, result: tuple[dict[str, float], float]) -> None:
    """One finished fit, as soon as it is done (a long run keeps what it measured)."""
    metrics, wall = result
    print(f"  seed {seed} | {variant} | test acc {metrics[f'test/{TARGET}/acc']:.3f} | macro-F1 "
          f"{metrics[f'test/{TARGET}/f1']:.3f} | fit {wall:.0f} s", file=sys.stderr, flush=True)


def loss_range(run_dir) -> tuple[float, float, bool]:
    """(first-epoch mean, last-epoch mean) of the logged training loss, and whether any value was not finite."""
    with open(run_dir / "lightning" / "logs" / "fit" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    epochs: dict[int, list[float]] = {}
    for r in rows:
        epochs.setdefault(int(r["epoch"]), []).append(float(r["train/loss"]))
    values = [v for vs in epochs.values() for v in vs]
    first, last = epochs[min(epochs)], epochs[max(epochs)]
    return statistics.mean(first), statistics.mean(last), not all(math.isfinite(v) for v in values)


def batch_study(epochs: int) -> None:
    """Fusion training at batch 8, 8 x 4 accumulated, and 32 on seed 0's adapters."""
    source = OUT / "seed0"
    if not (source / "adapters" / TARGET).is_dir():
        raise SystemExit(f"{source}: run the seed-0 comparison first")
    print("| fusion training | test acc / F1 | best val acc | train loss first -> last epoch | non-finite | fit wall |")
    print("|---|---:|---:|---:|---|---:|")
    for label, extra in (("batch 8", ["--data.batch_size", "8"]),
                         ("batch 8, accumulate 4 (effective 32)", ["--data.batch_size", "8",
                                                                   "--trainer.accumulate_grad_batches", "4"]),
                         ("batch 32", ["--data.batch_size", "32"])):
        run = OUT / f"batch-{label.split(',')[0].replace(' ', '')}{'-acc' if 'accumulate' in label else ''}"
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(source / "adapters", run / "adapters")
        metrics, wall = fit_and_test("configs/fusion.yaml", run, ["--seed_everything", "0", "--model.load_from",
                                                                  str(run), "--trainer.max_epochs", str(epochs), *extra])
        first, last, bad = loss_range(run)

        best = best_fit_metric(run, f"val/{FUSION}/acc")
        print(f"| {label} | {metrics[f'test/{FUSION}/acc']:.3f} / {metrics[f'test/{FUSION}/f1']:.3f} | {best:.3f} | "
              f"{first:.3f} -> {last:.3f} | {'yes' if bad else 'no'} | {wall:.0f} s |", flush=True)


def main() -> None:
    """Run every seed and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--stage1-epochs", type=int, default=3)
    parser.add_argument("--prune", type=int, default=2, help="also fuse only the top-m adapters (0: skip)")
    parser.add_argument("--batch-study", action="store_true", help="only the batch-size study (needs seed 0's run)")
    args = parser.parse_args()
    if args.batch_study:
        batch_study(args.epochs)
        return
    stage_one(args.stage1_epochs)
    results = {}
    for seed in args.seeds:
        results[seed] = run_seed(seed, args.epochs, args.prune or None)
        print(f"  seed {seed} done", file=sys.stderr, flush=True)
    variants = list(results[args.seeds[0]])
    print(f"\nMiniLM-L6, target {TARGET} (<= 300 training examples, {args.epochs} epochs), test split (<= 1,000)\n")
    print("| variant | " + " | ".join(f"seed {s} acc / F1" for s in args.seeds) + " | mean acc / F1 | fit wall |")
    print("|---|" + "---:|" * (len(args.seeds) + 2))
    for variant in variants:
        cells, accs, f1s, walls = [], [], [], []
        for seed in args.seeds:
            m, wall = results[seed][variant]
            accs.append(m[f"test/{TARGET}/acc"])
            f1s.append(m[f"test/{TARGET}/f1"])
            walls.append(wall)
            cells.append(f"{accs[-1]:.3f} / {f1s[-1]:.3f}")
        print(f"| {variant} | " + " | ".join(cells) + f" | {statistics.mean(accs):.3f} / {statistics.mean(f1s):.3f} "
              f"| {statistics.median(walls):.0f} s |")


if __name__ == "__main__":
    main()
