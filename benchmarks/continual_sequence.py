"""Continual learning on the offline sequence: every strategy, two task orders, the same budget.

Runs ``train.py continual`` once per (order, strategy), each in its own process, one after another, then
``train.py compare`` per order. Prints each run's accuracy matrix and the comparison tables, and copies the heatmaps
and comparison plots to ``--figures``. A finished run is reused (delete ``--out`` or pass ``--fresh`` to redo).

    python benchmarks/continual_sequence.py
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str]) -> float:
    """``train.py args`` in a subprocess (output to the terminal); its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, check=True)
    return time.perf_counter() - start


def matrix_table(results: dict) -> str:
    """The accuracy matrix R (with b) as markdown."""
    order = results["order"]
    acc = results["scores"]["acc"]
    lines = ["| after \\ on | " + " | ".join(order) + " |", "|---|" + "---:|" * len(order),
             "| before | " + " | ".join(f"{v:.3f}" for v in acc["before"]) + " |"]
    for stage, row in zip(results["stages"], acc["after"]):
        label = stage[0] if len(stage) == 1 else "all (joint)"
        lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    return "\n".join(lines)


def routing_table(kind: str, routing: dict) -> str:
    """One router's figures on the mixed test stream, per task, as markdown."""
    lines = [f"{kind} router:\n", "| task | rows | routing acc | routed acc | task-given acc | routed to |",
             "|---|---:|---:|---:|---:|---|"]
    for i, (task, r) in enumerate([*routing["per_task"].items(), ("all", routing["overall"])]):
        counts = routing["confusion"][i] if task != "all" else []
        where = ", ".join(f"{t} {n}" for t, n in zip(routing["tasks"], counts) if n)
        lines.append(f"| {task} | {r['rows']} | {r['routing_accuracy']:.3f} | {r['routed_accuracy']:.3f} | "
                     f"{r['task_given_accuracy']:.3f} | {where} |")
    return "\n".join(lines) + "\n"


def transfer_table(results: dict) -> str:
    """Per task: R[j][j] through its route against its own adapter alone (the fusion strategy's single-task transfer)."""
    after, alone, routes = results["scores"]["acc"]["after"], results["single_task"], results.get("routes", {})
    lines = ["| task | answered by | R[j][j] | own adapter alone | transfer |", "|---|---|---:|---:|---:|"]
    for j, task in enumerate(results["order"]):
        own = alone.get(task, {"acc": after[j][j]})["acc"]
        lines.append(f"| {task} | {routes.get(task, task)} | {after[j][j]:.3f} | {own:.3f} | {after[j][j] - own:+.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/continual.yaml")
    parser.add_argument("--out", default="checkpoints/bench-continual")
    parser.add_argument("--figures", default="benchmarks/figures/continual")
    parser.add_argument("--strategies", nargs="+", default=["per_task", "shared", "replay", "ewc", "fusion", "joint"])
    parser.add_argument("--routers", nargs="+", default=["prototype", "entropy"],
                        help="routers reported for the per_task runs (the others keep the config's)")
    parser.add_argument("--fresh", action="store_true", help="delete --out first")
    args = parser.parse_args()
    out, figures = ROOT / args.out, ROOT / args.figures
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    first = yaml.safe_load((ROOT / args.config).read_text())["continual"]["order"]
    orders = {"A": first, "B": list(reversed(first))}
    figures.mkdir(parents=True, exist_ok=True)
    walls: dict[str, float] = {}
    start = time.perf_counter()
    for tag, order in orders.items():
        for strategy in args.strategies:
            run_dir = out / tag / strategy
            if (run_dir / "results.json").is_file():
                print(f"reusing {run_dir}")
                continue
            walls[f"{tag}/{strategy}"] = run(["continual", "--config", args.config, "--continual.order",
                                              f"[{', '.join(order)}]", "--continual.strategy", strategy,
                                              "--continual.run_dir", str(run_dir),
                                              "--trainer.enable_progress_bar", "false",
                                              *(["--continual.routers", f"[{', '.join(args.routers)}]"]
                                                if strategy == "per_task" else [])])
    total = time.perf_counter() - start
    report = []
    for tag, order in orders.items():
        runs = [out / tag / s for s in args.strategies]
        run(["compare", *map(str, runs), "--output", str(out / tag), "--names",
             *[f"{s} ({tag})" for s in args.strategies]])
        shutil.copy(out / tag / "comparison.png", figures / f"comparison-{tag}.png")
        report.append(f"### Order {tag}: {' → '.join(order)}\n\n" + (out / tag / "comparison.md").read_text())
        for strategy, run_dir in zip(args.strategies, runs):
            results = json.loads((run_dir / "results.json").read_text())
            shutil.copy(run_dir / "heatmap.png", figures / f"heatmap-{tag}-{strategy}.png")
            check = results["zero_forgetting"]
            note = "" if check is None else f" (zero forgetting: {'verified' if check['verified'] else 'FAILED'})"
            report.append(f"R, accuracy, {strategy}, order {tag}{note}:\n\n{matrix_table(results)}\n")
            if results.get("single_task"):
                report.append(f"single-task transfer, {strategy}, order {tag}:\n\n{transfer_table(results)}")
            for kind, routing in (results.get("routing") or {}).items():
                shutil.copy(run_dir / f"routing-{kind}.png", figures / f"routing-{tag}-{strategy}-{kind}.png")
                report.append(routing_table(kind, routing))
    print("\n\n".join(report))
    print("\nprocess wall time per run (s): " + ", ".join(f"{k} {v:.0f}" for k, v in walls.items()))
    print(f"whole comparison: {total / 60:.1f} min (runs made in this call: {len(walls)})")


if __name__ == "__main__":
    main()
