"""Padding with and without grouping training batches by length, on the real task data (a count, not a timing).

For each task, the training batches of a few epochs are drawn with mtl's `TaskBatchSampler`, exactly as
``TaskDataModule.train_dataloader`` draws them, and padded the way the collator pads (to the batch's longest example).
The padding fraction is pad tokens / all tokens in those batches. Token lengths come from the data module's tokenised
cache (``token_lengths``). Columns:

- random: batches without grouping (``data.group_by_length: false``);
- grouped, G batches per megabatch: with grouping, ``data.group_batches: G`` (50, the default, in bold);
- whole pass: one megabatch per pass over the task (the whole pass sorted);
- tokens: all tokens the encoder runs per epoch, grouped (default) / random;
- eval: validation batches of ``--eval-batch-size`` in the split's row order / longest first (what the validation and
  test loaders now do).

The last row is ``configs/multitask.yaml``'s training set: the three tasks together (1,000 training examples each,
proportional sampling), one task per batch.

    python benchmarks/padding.py
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from mtl.data.module import TaskDataModule
from mtl.data.sampling import GROUP_BATCHES, TaskBatchSampler, padding_fraction, sorted_by_length

TASKS = ["bbc_news", "tweet_sentiment", "language_id"]
GROUPS = [4, 16, GROUP_BATCHES]


def epochs_of_batches(sizes: list[int], batch_size: int, epochs: int, lengths: list[list[int]] | None,
                      group_batches: int = GROUP_BATCHES) -> list[list[int]]:
    """Every training batch of ``epochs`` epochs (global indices over the tasks concatenated), seed 0."""
    sampler = TaskBatchSampler(sizes, batch_size, seed=0, lengths=lengths, group_batches=group_batches)
    batches = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        batches += list(sampler)
    return batches


def tokens(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> int:
    """All tokens (real and pad) when each batch is padded to its longest example."""
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


def row(label: str, sizes: list[int], lengths: list[list[int]], val: list[int] | None, args: argparse.Namespace) -> str:
    """One table row: padding fractions for random and grouped batches (and the validation loader)."""
    flat = [n for task_lengths in lengths for n in task_lengths]
    random_batches = epochs_of_batches(sizes, args.batch_size, args.epochs, None)
    cells = [f"{padding_fraction(random_batches, flat):.1%}"]
    grouped = {}
    for group in [*GROUPS, max(sizes)]:  # max(sizes) batches per megabatch: every pass is one megabatch
        grouped[group] = epochs_of_batches(sizes, args.batch_size, args.epochs, lengths, group)
        fraction = f"{padding_fraction(grouped[group], flat):.1%}"
        cells.append(f"**{fraction}**" if group == GROUP_BATCHES else fraction)
    cells.append(f"{tokens(grouped[GROUP_BATCHES], flat) / tokens(random_batches, flat):.2f}")
    if val is None:
        cells.append("—")
    else:
        step = args.eval_batch_size
        in_order = [list(range(s, min(s + step, len(val)))) for s in range(0, len(val), step)]
        longest = sorted_by_length(range(len(val)), val)
        by_length = [longest[s:s + step] for s in range(0, len(longest), step)]
        cells.append(f"{padding_fraction(in_order, val):.1%} / {padding_fraction(by_length, val):.1%}")
    batches_per_pass = -(-sum(sizes) // args.batch_size)
    mean = sum(flat) / len(flat)
    return f"| {label} | {sum(sizes):,} | {batches_per_pass} | {mean:.1f} | " + " | ".join(cells) + " |"


def main() -> None:
    """Print the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--multitask-cap", type=int, default=1000, help="max_train_examples of the multitask row")
    args = parser.parse_args()

    head = ["task", "train rows", "batches/pass", "mean tokens", "random", *[f"grouped, G={g}" for g in GROUPS],
            "whole pass", "tokens grouped/random", "eval: row order / longest first"]
    print(f"batch {args.batch_size}, {args.epochs} epochs, seed 0; eval batch {args.eval_batch_size}")
    print("| " + " | ".join(head) + " |")
    print("|---|" + "---:|" * (len(head) - 1))
    for task in args.tasks:
        data = TaskDataModule([task], batch_size=args.batch_size)
        train, val = data.token_lengths(task, "train"), data.token_lengths(task, "validation")
        spec = data.specs[task]
        print(row(f"{task} (max_length {spec.max_length})", [len(train)], [train], val, args), flush=True)
    data = TaskDataModule(args.tasks, batch_size=args.batch_size, max_train_examples=args.multitask_cap)
    lengths = [data.token_lengths(task, "train") for task in args.tasks]
    print(row(f"multitask ({args.multitask_cap:,} per task)", [len(x) for x in lengths], lengths, None, args))


if __name__ == "__main__":
    main()
