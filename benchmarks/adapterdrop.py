"""AdapterDrop and the frozen-prefix cache: measured savings against what arithmetic allows.

Usage: python benchmarks/adapterdrop.py [--steps 8] [--batch 32] [--seq 128] [--threads 2] [--no-peers]

On MiniLM-L6 (L = 6), in one process with interleaved timings (medians):
1. one frozen layer's forward time f and its backward time b (input gradients only, weights frozen);
2. training samples/s with no adapter in the first k layers, k = 0..L-1, vs k = 0, beside the limit
   L(f+b) / (L f + (L-k) b);
3. the same with the frozen-prefix cache (second epoch onward: states after layer k read from the cache),
   beside the limit L / (L-k);
4. multi-task inference, N = 2, 4, 8 tasks, k = 0 and L/2: one forward vs N separate forwards;
5. AdapterHub side by side, when benchmarks/peers/.venv-adapterhub exists (see benchmarks/peers/README.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from mtl.adapters.config import AdapterConfig
from mtl.backbone import load_backbone
from mtl.model import MTLModel
from mtl.prefix_cache import PrefixCache
from multitask_inference import median_times

PEERS = Path(__file__).resolve().parent / "peers"


def layer_costs(batch: int, seq: int, repeats: int) -> tuple[float, float, float]:
    """(f, f without autograd recording, b) of one frozen MiniLM layer, in seconds."""
    layer = load_backbone("minilm-l6").encoder.layer[2].eval()
    x = torch.randn(batch, seq, 384)
    grad = torch.randn(batch, seq, 384)

    def forward():
        return layer(x.requires_grad_(True), None)

    def forward_no_grad():
        with torch.no_grad():
            layer(x.detach(), None)

    outs = []

    def backward():
        outs[-1].backward(grad)

    times = {"f": [], "f0": [], "b": []}
    for _ in range(repeats + 1):
        start = time.perf_counter()
        outs.append(forward())
        times["f"].append(time.perf_counter() - start)
        start = time.perf_counter()
        backward()
        times["b"].append(time.perf_counter() - start)
        start = time.perf_counter()
        forward_no_grad()
        times["f0"].append(time.perf_counter() - start)
        outs.clear()
    return tuple(statistics.median(times[k][1:]) for k in ("f", "f0", "b"))


def training_steps(ks: list[int], batch: int, seq: int, steps: int, cached: bool) -> dict[int, float]:
    """Median training step time per k (fixed dropping), optionally reading layers 1..k from a prefix cache."""
    ids = torch.randint(1000, 30000, (batch, seq))
    mask, labels = torch.ones_like(ids), torch.randint(0, 5, (batch,))
    rows = list(range(batch))
    fns = []
    for k in ks:
        model = MTLModel("minilm-l6")
        model.add_task("t", 5, AdapterConfig(type="pfeiffer", drop_first=k))
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        cache = PrefixCache(k, "bench", {("t", "train"): batch}, 384) if cached else None
        if cache is not None:  # fill it once, as the first epoch would
            cache.fetch(("t", "train"), rows, mask, lambda sel, m=model, k=k: m.prefix_states(ids, mask, None, k))

        def step(model=model, opt=opt, cache=cache, k=k):
            if cache is None:
                logits = model(ids, mask, tasks="t")["t"]
            else:
                prefix = cache.fetch(("t", "train"), rows, mask, None)
                logits = model(ids, mask, tasks="t", prefix=prefix, prefix_layers=k)["t"]
            loss = model.heads["t"].loss(logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        fns.append(step)
    return dict(zip(ks, median_times(fns, steps)))


def inference(ns: list[int], ks: list[int], batch: int, seq: int, repeats: int) -> dict[tuple[int, int], tuple]:
    """(separate rows/s, one-forward rows/s) per (k, N)."""
    ids = torch.randint(1000, 30000, (batch, seq))
    mask = torch.ones_like(ids)
    model = MTLModel("minilm-l6").eval()
    out = {}
    for k in ks:
        for n in ns:
            for task in list(model.tasks):
                model.remove_task(task)
            names = [f"task{i}" for i in range(n)]
            for name in names:
                model.add_task(name, 4, AdapterConfig(type="pfeiffer", drop_first=k))
            with torch.inference_mode():
                sep, one = median_times([lambda: [model(ids, mask, tasks=t) for t in names],
                                         lambda: model(ids, mask, tasks=names)], repeats)
            out[(k, n)] = (batch / sep, batch / one)
            print(f"  inference k={k} N={n}: {batch / sep:.1f} vs {batch / one:.1f} rows/s", file=sys.stderr, flush=True)
    return out


def adapterhub(args: argparse.Namespace) -> dict[str, float] | None:
    """AdapterHub's figures for the same shapes, or None when its environment is absent."""
    python = PEERS / ".venv-adapterhub" / "bin" / "python"
    if not python.exists():
        print("AdapterHub comparison skipped: run benchmarks/peers/setup_adapterhub.sh first", file=sys.stderr)
        return None
    cmd = [str(python), str(PEERS / "adapterhub_bench.py"), "--steps", str(args.steps), "--batch", str(args.batch),
           "--seq", str(args.seq), "--threads", str(args.threads), "--no-check"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return {row["row"]: row["value"] for row in map(json.loads, done.stdout.strip().splitlines())}


def main() -> None:
    """Run every part and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-peers", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    L = 6
    f, f0, b = layer_costs(args.batch, args.seq, args.steps)
    print(f"  f = {f * 1e3:.0f} ms, f (no autograd) = {f0 * 1e3:.0f} ms, b = {b * 1e3:.0f} ms", file=sys.stderr)
    plain = training_steps(list(range(L)), args.batch, args.seq, args.steps, cached=False)
    cached = training_steps(list(range(1, L)), args.batch, args.seq, args.steps, cached=True)
    infer = inference([2, 4, 8], [0, L // 2], args.batch, args.seq, args.steps)
    peers = None if args.no_peers else adapterhub(args)

    print(f"\nMiniLM-L6 (L = {L}), Pfeiffer, batch {args.batch}, seq {args.seq}, {args.threads} threads, "
          f"median of {args.steps}\n")
    print(f"One frozen layer: f = {f * 1e3:.0f} ms forward (recording autograd; {f0 * 1e3:.0f} ms without), "
          f"b = {b * 1e3:.0f} ms backward = {b / f:.2f} f.\n")
    print("| k (adapter-free first layers) | samples/s | vs k=0 | limit L(f+b)/(Lf+(L-k)b) | of limit "
          "| with prefix cache | vs k=0 | limit L/(L-k) | of limit |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = plain[0]
    for k in range(L):
        limit = L * (f + b) / (L * f + (L - k) * b)
        row = f"| {k} | {args.batch / plain[k]:.1f} | {base / plain[k]:.2f}x | {limit:.2f}x | {base / plain[k] / limit:.0%} "
        if k in cached:
            climit = L / (L - k)
            row += f"| {args.batch / cached[k]:.1f} | {base / cached[k]:.2f}x | {climit:.2f}x | {base / cached[k] / climit:.0%} |"
        else:
            row += "| - | - | - | - |"
        print(row)
    print("\n| k | tasks N | N separate forwards (rows/s) | one multi-task forward (rows/s) | speed-up |")
    print("|---:|---:|---:|---:|---:|")
    for (k, n), (sep, one) in infer.items():
        print(f"| {k} | {n} | {sep:.1f} | {one:.1f} | {one / sep:.2f}x |")
    if peers:
        print("\n| row | mtl | AdapterHub 1.3.0 | mtl / AdapterHub |\n|---|---:|---:|---:|")
        ours = {"train pfeiffer k=0": args.batch / plain[0], "train pfeiffer k=3": args.batch / plain[3]}
        for (k, n), (_, one) in infer.items():
            ours[f"infer parallel N={n} k={k}"] = one
        for name, value in ours.items():
            if name in peers:
                print(f"| {name} | {value:.1f} | {peers[name]:.1f} | {value / peers[name]:.2f} |")


if __name__ == "__main__":
    main()
