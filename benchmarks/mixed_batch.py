"""Mixed-task batch vs one-task batch: the forward alone, in process, on MiniLM-L6.

Usage: python benchmarks/mixed_batch.py [--rows 32] [--tasks 32] [--seq 64] [--threads 1] [--repeats 15]

A server batches whatever requests arrive together, so a batch of ``rows`` rows spread over ``tasks`` different
Pfeiffer adapters (``row_tasks``) must cost about what the same batch costs through one adapter. The adapters are
about 1% of the FLOPs, so the limit of the ratio is about 0.99. Prints a markdown table: rows/s of the one-task batch,
of the mixed batch with each slot's adapters run as two batched matmuls (the default), and of the mixed batch with a
loop of small matmuls per task (what the slots did before), the ratios, and the largest difference between the
mixed forward and each row's own single-task forward. Times are medians of interleaved runs.
"""

from __future__ import annotations

import argparse

import torch
from multitask_inference import median_times  # the same interleaved timing loop

from mtl.adapters import inject
from mtl.model import MTLModel


def main() -> None:
    """Build the model, time both batches, print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MTLModel("minilm-l6").eval()
    names = [f"t{i}" for i in range(args.tasks)]
    for name in names:
        model.add_task(name, 3, "pfeiffer")
        with torch.no_grad():
            for p in model.task_parameters(name).values():
                p.add_(torch.randn_like(p) * 0.05)
    ids = torch.randint(1000, 20000, (args.rows, args.seq))
    mask = torch.ones_like(ids)
    mixed = [names[i % args.tasks] for i in range(args.rows)]
    same = [names[0]] * args.rows
    grouped_min = inject.GROUPED_MIN

    def looped() -> None:
        inject.GROUPED_MIN = 1 << 30  # never group: one matmul pair per task and slot
        try:
            model(ids, mask, row_tasks=mixed)
        finally:
            inject.GROUPED_MIN = grouped_min

    with torch.inference_mode():
        t_same, t_mixed, t_loop = median_times([lambda: model(ids, mask, row_tasks=same),
                                                lambda: model(ids, mask, row_tasks=mixed), looped], args.repeats)
        out = model(ids, mask, row_tasks=mixed)
        seen = dict.fromkeys(names, 0)
        diff = 0.0
        for row, task in enumerate(mixed):
            alone = model(ids[row:row + 1], mask[row:row + 1], tasks=task)[task][0]
            diff = max(diff, float((out[task][seen[task]] - alone).abs().max()))
            seen[task] += 1
    print(f"MiniLM-L6, {args.rows} rows x {args.seq} tokens, {args.tasks} Pfeiffer tasks, {args.threads} thread(s), "
          f"median of {args.repeats}\n")
    print("| batch | rows/s | ratio to one task | max abs diff vs each row alone |")
    print("|---|---:|---:|---:|")
    print(f"| all rows one task | {args.rows / t_same:.1f} | 1.00 | - |")
    print(f"| {args.tasks} tasks mixed, batched matmuls | {args.rows / t_mixed:.1f} | {t_same / t_mixed:.2f} | {diff:.1e} |")
    print(f"| {args.tasks} tasks mixed, loop per task | {args.rows / t_loop:.1f} | {t_same / t_loop:.2f} | - |")


if __name__ == "__main__":
    main()
