"""Inference cost of routing without a task id, against a forward that is told the task.

Loads the final stage of a continual run (its adapters and its prototype router), takes batches of the mixed test
stream (every task's test texts, shuffled with a fixed seed), and times, interleaved and repeated:
  - task given: one forward of the batch's true tasks (``row_tasks``: each row runs its own task);
  - prototype: prefix states once, route from them, then the chosen task per row from that prefix;
  - entropy: every task in one multi-task forward, the most confident head per row.
Prints a table of medians and ratios against "task given" measured in the same run.

    python benchmarks/routing_cost.py --run checkpoints/bench-continual/A/per_task
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from mtl.data.module import TaskCollator, TaskDataModule
from mtl.model import MTLModel
from mtl.routing import EntropyRouter, load_router

ROOT = Path(__file__).resolve().parents[1]


def mixed_batches(run: Path, batch_size: int, batches: int, seed: int = 0) -> list[tuple[dict, list[str]]]:
    """Batches of test texts from every task of the run, shuffled together: (batch, true task per row)."""
    results = json.loads((run / "results.json").read_text())
    config = results["config"]
    data = TaskDataModule(tasks=[], eval_tasks=results["order"], backbone=config["model.backbone"],
                          tasks_dir=config.get("continual.tasks_dir", "tasks"),
                          max_eval_examples=config.get("data.max_eval_examples"))
    rows = [(task, i) for task in results["order"] for i in range(len(data.task_datasets[task]["test"]))]
    random.Random(seed).shuffle(rows)
    collate = TaskCollator(data.tokenizer, {"mixed": "classification"})
    out = []
    for b in range(batches):
        chunk = rows[b * batch_size:(b + 1) * batch_size]
        features = [{k: v for k, v in data.task_datasets[t]["test"][i].items() if k != "labels"} | {"task": "mixed"}
                    for t, i in chunk]
        out.append((collate(features), [t for t, _ in chunk]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="checkpoints/bench-continual/A/per_task")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = ROOT / args.run
    final = run / json.loads((run / "results.json").read_text())["steps"][-1]
    model = MTLModel.from_pretrained(final).eval()
    prototype, entropy = load_router(final / "router"), EntropyRouter()
    data = mixed_batches(run, args.batch_size, args.batches)

    def given(batch: dict, truth: list[str]) -> None:
        model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), row_tasks=truth)

    variants = {"task given": given,
                "prototype router": lambda b, t: prototype.predict(model, b["input_ids"], b["attention_mask"],
                                                                   b.get("token_type_ids")),
                "entropy router": lambda b, t: entropy.predict(model, b["input_ids"], b["attention_mask"],
                                                               b.get("token_type_ids"))}
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        for name, fn in variants.items():  # warm-up
            fn(*data[0])
        for _ in range(args.rounds):
            for name, fn in variants.items():  # interleaved, so load changes hit every variant alike
                start = time.perf_counter()
                for batch, truth in data:
                    fn(batch, truth)
                times[name].append(time.perf_counter() - start)
    rows = args.batches * args.batch_size
    base = statistics.median(times["task given"])
    print(f"{rows} mixed test texts per round ({args.batches} batches of {args.batch_size}), {args.rounds} rounds, "
          f"{args.threads} threads; run {args.run}, tasks {prototype.tasks}, router feature depth {prototype.depth}")
    print("| variant | rows/s (median) | time vs task given |\n|---|---:|---:|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {rows / median:.1f} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
