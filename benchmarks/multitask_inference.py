"""Multi-task inference: N separate forwards vs one multi-task forward on MiniLM-L6.

Usage: python benchmarks/multitask_inference.py [--tasks 1 2 4 8] [--leave-out 0 3] [--batch 32] [--seq 128]
       [--repeats 7] [--threads 2]

Each task has its own Pfeiffer adapter (random weights) in every layer except the first ``leave-out`` layers.
The one-forward path replicates the rows inside the first adapter slot (layer k+1, after its feed-forward block),
so everything below runs once. Prints a markdown table: input rows/s for both paths (each row answered for all N
tasks), the ratio beside its limit N L / ((k+1) + N (L-k-1)), and the largest output difference between the two
paths. Times are medians over ``repeats`` interleaved runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mtl.adapters.config import AdapterConfig
from mtl.model import MTLModel


def multitask_limit(n: int, k: int, layers: int) -> float:
    """Best speed-up of one N-task forward over N forwards: rows are copied inside layer k+1, after its FFN."""
    return n * layers / ((k + 1) + n * (layers - k - 1))


def median_times(fns: list, repeats: int) -> list[float]:
    """Median wall time of each ``fn()``, the functions interleaved so drift on a shared machine hits all alike."""
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(bucket) for bucket in times]


def main() -> None:
    """Measure every (leave-out, N) pair and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--leave-out", type=int, nargs="+", default=[0, 3])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ids = torch.randint(1000, 30000, (args.batch, args.seq))
    mask = torch.ones_like(ids)
    base = MTLModel("minilm-l6")
    rows = []
    for k in args.leave_out:
        for n in args.tasks:
            model = base
            for task in list(model.tasks):
                model.remove_task(task)
            names = [f"task{i}" for i in range(n)]
            for name in names:
                model.add_task(name, 4, AdapterConfig(type="pfeiffer", leave_out=list(range(k))))
                with torch.no_grad():
                    for p in model.task_parameters(name).values():
                        p.normal_(0, 0.05)
            model.eval()
            with torch.inference_mode():
                separate = {t: model(ids, mask, tasks=t)[t] for t in names}
                together = model(ids, mask, tasks=names)
                diff = max((separate[t] - together[t]).abs().max().item() for t in names)
                t_sep, t_one = median_times([lambda: [model(ids, mask, tasks=t) for t in names],
                                             lambda: model(ids, mask, tasks=names)], args.repeats)
            rows.append((k, n, args.batch / t_sep, args.batch / t_one, t_sep / t_one, diff))
            print(f"  leave_out={k} N={n}: separate {args.batch / t_sep:.1f} rows/s, one forward "
                  f"{args.batch / t_one:.1f} rows/s", flush=True)
    print(f"\nMiniLM-L6, Pfeiffer adapters, batch {args.batch}, seq {args.seq}, {args.threads} threads, "
          f"median of {args.repeats}\n")
    print("| adapter-free first layers | tasks N | N separate forwards (rows/s) | one multi-task forward (rows/s) "
          "| speed-up | limit | max |diff| |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    layers = base.num_layers
    for k, n, sep, one, ratio, diff in rows:
        print(f"| {k} | {n} | {sep:.1f} | {one:.1f} | {ratio:.2f}x | {multitask_limit(n, k, layers):.2f}x "
              f"| {diff:.1e} |")


if __name__ == "__main__":
    main()
