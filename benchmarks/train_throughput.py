"""Training throughput and peak memory: full fine-tuning vs Pfeiffer / Houlsby / parallel adapters.

Usage: python benchmarks/train_throughput.py [--steps 10] [--batch 32] [--seq 128] [--threads 2]

Each variant runs in its own process (peak RSS is per process), on MiniLM-L6 with random token ids
(throughput depends on shapes only). Prints a markdown table with ratios against full fine-tuning
measured in the same run; the step time is the median over the measured steps.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = {
    # name: (adapter preset or None for full fine-tuning, backbone dropout, bf16 autocast)
    "full fine-tuning": (None, True, False),
    "pfeiffer": ("pfeiffer", False, False),
    "houlsby": ("houlsby", False, False),
    "parallel": ("parallel", False, False),
    "pfeiffer + backbone dropout": ("pfeiffer", True, False),
    "pfeiffer + bf16 autocast": ("pfeiffer", False, True),
}


def run_one(name: str, steps: int, batch: int, seq: int, threads: int) -> dict:
    """Train ``steps`` steps of one variant in this process; return timings and peak RSS."""
    import torch

    from mtl.adapters.config import AdapterConfig
    from mtl.model import MTLModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    preset, dropout, bf16 = VARIANTS[name]
    model = MTLModel("minilm-l6", backbone_dropout=dropout)
    if preset is None:
        model.add_task("t", 5, AdapterConfig(leave_out=list(range(model.num_layers))))
        for p in model.backbone.parameters():
            p.requires_grad_(True)
    else:
        model.add_task("t", 5, preset)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(1000, 30000, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    labels = torch.randint(0, 5, (batch,))
    times = []
    for step in range(steps + 2):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(ids, mask, tasks="t")["t"]
        loss = model.heads["t"].loss(logits.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= 2:  # two warm-up steps
            times.append(time.perf_counter() - start)
    step_time = statistics.median(times)
    return {"name": name, "trainable": sum(p.numel() for p in params), "step_s": step_time,
            "samples_s": batch / step_time, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    """Run every variant in a subprocess and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.steps, args.batch, args.seq, args.threads)))
        return
    results = []
    for name in VARIANTS:
        cmd = [sys.executable, __file__, "--one", name, "--steps", str(args.steps), "--batch", str(args.batch),
               "--seq", str(args.seq), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(f"  {name}: {results[-1]['samples_s']:.1f} samples/s", file=sys.stderr)
    base = results[0]
    print(f"\nMiniLM-L6, batch {args.batch}, seq {args.seq}, {args.threads} threads, median of {args.steps} steps\n")
    print("| variant | trainable params | samples/s | vs full FT | peak RSS (MB) | vs full FT |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['name']} | {r['trainable']:,} | {r['samples_s']:.1f} | {r['samples_s'] / base['samples_s']:.2f}x "
              f"| {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x |")


if __name__ == "__main__":
    main()
