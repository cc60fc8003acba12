"""Which attention kernel should the frozen backbone run: PyTorch's SDPA or the plain matmul-softmax-matmul ("eager")?

Usage: python benchmarks/attention.py [--steps 5] [--threads 2] [--layers 2]
       [--shapes minilm-l6 bert-base modernbert-base] [--precisions bf16 fp32] [--modes train predict]
       [--lengths 128]

For each backbone, mode (a Pfeiffer train step: forward, backward, AdamW; or an inference forward) and precision
(bf16 autocast or fp32), the two implementations run alternately in one process on the same batch (the last quarter
of a quarter of the rows padded), and the table gives the median step of each and the ratio SDPA / eager
(above 1: eager is faster). ``minilm-l6`` is the pretrained quickstart backbone at 32 rows x 128 tokens; the base
shapes (``benchmarks/backbones/``) are random weights cut to ``--layers`` layers at 8 x 128 (the per-layer ratio is
what matters). ``--lengths``: padded lengths to measure, the rows scaled to keep the tokens per batch (minilm: 4,096). DeBERTa-v2/v3 has only the eager kernel in transformers, so it has no row.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def build(shape: str, layers: int, impl: str):
    """An MTLModel with one Pfeiffer task on ``shape``'s backbone, running attention ``impl``."""
    from mtl.model import MTLModel

    torch.manual_seed(0)
    if shape == "minilm-l6":
        model = MTLModel("minilm-l6")
    else:
        from backbones import build_backbone
        model = MTLModel(build_backbone(shape, num_hidden_layers=layers))
    model.add_task("t", 5, "pfeiffer")
    model.backbone.set_attn_implementation(impl)
    return model


def batch(model, rows: int, seq: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ids, a mask with a quarter of the rows padded over their last quarter, labels."""
    from backbones import random_ids

    g = torch.Generator().manual_seed(0)
    ids = random_ids(model.backbone.config, rows, seq, generator=g)
    mask = torch.ones(rows, seq, dtype=torch.long)
    mask[: rows // 4, seq * 3 // 4:] = 0
    return ids, mask, torch.randint(0, 5, (rows,), generator=g)


def one_step(forward, opt, mode: str, bf16: bool, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> None:
    """A train step (forward under autocast, float32 loss, backward, ``opt``) or an inference forward of task 't'."""
    if mode == "train":
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = forward(ids, mask, tasks="t")["t"]
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    else:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            forward(ids, mask, tasks="t")


def step_fn(model, mode: str, bf16: bool, data):
    """One step of ``mode`` on ``data``, as a closure to time."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step() -> None:
        model.train(mode == "train")
        one_step(model, opt, mode, bf16, *data)
    return step


def measure(shape: str, layers: int, mode: str, precision: str, steps: int, length: int = 128) -> dict[str, float]:
    """Median seconds per step for sdpa and eager, alternated step by step after one warm-up each."""
    rows = max(1, (32 if shape == "minilm-l6" else 8) * 128 // length)
    steps_of = {}
    for impl in ("sdpa", "eager"):
        model = build(shape, layers, impl)
        steps_of[impl] = step_fn(model, mode, precision == "bf16", batch(model, rows, length))
        steps_of[impl]()
    times: dict[str, list[float]] = {impl: [] for impl in steps_of}
    for _ in range(steps):
        for impl, step in steps_of.items():
            start = time.perf_counter()
            step()
            times[impl].append(time.perf_counter() - start)
    return {impl: statistics.median(t) for impl, t in times.items()}


def main() -> None:
    """Every shape x mode x precision; print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2, help="layers kept of the base shapes")
    parser.add_argument("--shapes", nargs="+", default=["minilm-l6", "bert-base", "modernbert-base"])
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    parser.add_argument("--modes", nargs="+", default=["train", "predict"], choices=["train", "predict"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[128], help="padded tokens per row")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.steps} alternating steps\n")
    print("| backbone | mode | precision | SDPA | eager | SDPA / eager |")
    print("|---|---|---|---:|---:|---:|")
    for shape in args.shapes:
        for length in args.lengths:
            rows = max(1, (32 if shape == "minilm-l6" else 8) * 128 // length)
            what = "pretrained, 6 layers" if shape == "minilm-l6" else f"random, {args.layers} layers"
            for mode in args.modes:
                for precision in args.precisions:
                    t = measure(shape, args.layers, mode, precision, args.steps, length)
                    print(f"| {shape} ({what}, {rows} x {length}) | {mode} | {precision} | {t['sdpa'] * 1e3:.0f} ms | "
                          f"{t['eager'] * 1e3:.0f} ms | {t['sdpa'] / t['eager']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
