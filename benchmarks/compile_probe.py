"""Does `torch.compile` pay for a fit or a predict? Compile time against the per-step saving, quickstart shapes.

Usage: python benchmarks/compile_probe.py [--steps 30] [--batch 32] [--threads 2] [--modes train predict]
       [--precision bf16 fp32] [--warm-cache]

One Pfeiffer task on the pretrained MiniLM-L6 (as the quickstart), batches of 32 whose padded length varies the
way dynamic padding makes it vary (lengths drawn from BBC-like 128-token truncation and short-text lengths), eager
against ``torch.compile(model)`` (inductor, default mode, dynamic shapes), in one process, per precision (bf16
autocast or fp32) with the attention kernel a fit would pick for it (``model.attention: auto``). For each mode it prints
the first call's extra time (compilation, including recompiles for new lengths), the median step after it, and
the break-even point: how many steps the compiled model needs to win back its compile time, beside the quickstart's
~96 steps (3 epochs of 1,000 examples) and a 30-epoch run's ~960. Inductor keeps compiled kernels in an on-disk
cache that makes a second run compile faster; the probe turns it off (``TORCHINDUCTOR_FORCE_DISABLE_CACHES``) so
that the compile time is a first run's, unless ``--warm-cache``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if "--warm-cache" not in sys.argv:  # read when torch is imported
    os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"

import torch  # noqa: E402

LENGTHS = [128, 128, 96, 128, 64, 128, 112, 128]  # padded batch lengths cycle through these


def _batches(steps: int, batch: int, vocab: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for step in range(steps):
        seq = LENGTHS[step % len(LENGTHS)]
        ids = torch.randint(1000, vocab, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        for row in range(batch):  # ragged rows inside the batch, as dynamic padding leaves them
            mask[row, seq - int(torch.randint(0, seq // 2, (1,), generator=g)):] = 0
        out.append((ids, mask, torch.randint(0, 5, (batch,), generator=g)))
    return out


def run(mode: str, compiled: bool, steps: int, batch: int, precision: str = "fp32") -> list[float]:
    """Per-step wall times of ``steps`` train or predict steps, eager or compiled (first step includes compile)."""
    from attention import one_step  # benchmarks/attention.py: the same step, timed there for the kernels
    from mtl.model import MTLModel
    from mtl.precision import attention_kernel

    torch.manual_seed(0)
    model = MTLModel("minilm-l6")
    model.add_task("t", 5, "pfeiffer")
    model.backbone.set_attn_implementation(attention_kernel("auto", precision, "cpu", model.loaded_kernel))
    bf16 = precision == "bf16"
    forward = torch.compile(model, dynamic=True) if compiled else model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    model.train(mode == "train")
    times = []
    for ids, mask, labels in _batches(steps, batch, model.backbone.config.vocab_size):
        start = time.perf_counter()
        one_step(forward, opt, mode, bf16, ids, mask, labels)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    """Eager and compiled, per mode; print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["train", "predict"], choices=["train", "predict"])
    parser.add_argument("--precision", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    parser.add_argument("--warm-cache", action="store_true", help="keep inductor's on-disk cache (a repeated run)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"MiniLM-L6 + Pfeiffer, batch {args.batch}, padded lengths cycling {LENGTHS}, {args.threads} threads, "
          f"{args.steps} steps per run\n")
    # each new padded length may recompile: the first cycle of lengths counts as compile time
    print(f"| mode | precision | eager step (median) | compiled step (median, after the first {len(LENGTHS)} steps) "
          "| speed-up | extra time of the first steps | break-even steps |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for mode, precision in [(m, p) for m in args.modes for p in args.precision]:
        eager = run(mode, False, args.steps, args.batch, precision)
        comp = run(mode, True, args.steps, args.batch, precision)
        eager_step = statistics.median(eager[2:])
        comp_step = statistics.median(comp[len(LENGTHS):])
        extra = sum(comp[:len(LENGTHS)]) - eager_step * len(LENGTHS)
        gain = eager_step - comp_step
        even = f"{extra / gain:.0f}" if gain > 0 else "never"
        print(f"| {mode} | {precision} | {eager_step * 1e3:.0f} ms | {comp_step * 1e3:.0f} ms "
              f"| {eager_step / comp_step:.2f}x | {extra:.1f} s | {even} |", flush=True)


if __name__ == "__main__":
    main()
