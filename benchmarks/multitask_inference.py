"""Multi-task inference: N separate forwards vs one multi-task forward on MiniLM-L6 (or a random backbone).

Usage: python benchmarks/multitask_inference.py [--tasks 1 2 4 8] [--leave-out 0 L/2] [--batch 32] [--seq 128]
       [--repeats 7] [--threads 2] [--backbone-config NAME|FILE] [--seed 0]

Each task has its own Pfeiffer adapter (random weights) in every layer except the first ``leave-out`` layers
(default 0 and L/2, AdapterDrop). The one-forward path replicates the rows inside the first adapter slot (layer
k+1, after its feed-forward block), so everything below runs once. ``--backbone-config`` measures a randomly
initialised backbone of another family and shape instead of the pretrained MiniLM-L6: a short name from
benchmarks/backbones/ (``bert-base``, ``deberta-v3-base``, ``modernbert-base``) or a JSON file of Hugging Face config
fields with ``model_type`` (weights drawn under ``--seed``; see benchmarks/backbones/__init__.py).

Prints the backbone and its shape, then a markdown table: input rows/s for both paths (each row answered for all N
tasks), the ratio beside its limit N L / ((k+1) + N (L-k-1)), and the largest output difference between the two
paths; then, in words, the largest N against N separate forwards at k = 0 and at the largest k (each beside its
limit), and the process's peak RSS. Times are medians over ``repeats`` interleaved runs.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

import backbones
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


def main(argv: list[str] | None = None) -> None:
    """Measure every (leave-out, N) pair and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--leave-out", type=int, nargs="+", default=None, help="adapter-free first layers k "
                        "(default: 0 and L/2)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backbone-config", metavar="NAME|FILE",
                        help="a random backbone of this shape instead of the pretrained MiniLM-L6 "
                             "(a name from benchmarks/backbones/ or a JSON file)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random backbone's weights")
    args = parser.parse_args(argv)
    try:
        backbone = backbones.load(args.backbone_config, args.seed)
    except backbones.ShapeError as err:
        parser.error(str(err))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ids = backbones.random_ids(backbone.config, args.batch, args.seq)
    mask = torch.ones_like(ids)
    base = MTLModel(backbone)
    layers = base.num_layers
    leave_out = args.leave_out if args.leave_out is not None else sorted({0, layers // 2})
    rows = []
    for k in leave_out:
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
    print(f"\nBackbone: {backbones.describe(backbone)}")
    print(f"Pfeiffer adapters, batch {args.batch}, seq {args.seq}, {args.threads} threads, median of {args.repeats}\n")
    print("| adapter-free first layers | tasks N | N separate forwards (rows/s) | one multi-task forward (rows/s) "
          "| speed-up | limit | max |diff| |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for k, n, sep, one, ratio, diff in rows:
        print(f"| {k} | {n} | {sep:.1f} | {one:.1f} | {ratio:.2f}x | {multitask_limit(n, k, layers):.2f}x "
              f"| {diff:.1e} |")
    print()
    n_max = max(args.tasks)
    for k in sorted({min(leave_out), max(leave_out)}):
        k, n, sep, one, ratio, diff = next(r for r in rows if r[0] == k and r[1] == n_max)
        limit = multitask_limit(n, k, layers)
        print(f"{n} tasks, k={k} of L={layers}: one forward {ratio:.2f}x of {n} separate forwards "
              f"({one:.1f} vs {sep:.1f} rows/s), limit {limit:.2f}x, {ratio / limit:.0%} of the limit, "
              f"max |diff| {diff:.1e}")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
