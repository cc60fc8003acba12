"""AdapterDrop and the frozen-prefix cache: measured savings against what arithmetic allows.

Usage: python benchmarks/adapterdrop.py [--steps 8] [--batch 32] [--seq 128] [--threads 2] [--no-peers]
                                      [--peer-rounds 3] [--peer-rows ROW ...] [--only-peers]

On MiniLM-L6 (L = 6), in one process with interleaved timings (medians):
1. one frozen layer's forward time f and its backward time b (input gradients only, weights frozen);
2. training samples/s with no adapter in the first k layers, k = 0..L-1, vs k = 0, beside the limit
   L(f+b) / (L f + (L-k) b);
3. the same with the frozen-prefix cache (second epoch onward: states after layer k read from the cache),
   beside the limit L / (L-k);
4. multi-task inference, N = 2, 4, 8 tasks, k = 0 and L/2: one forward vs N separate forwards, beside the
   limit N L / ((k+1) + N (L-k-1)) (rows are replicated inside layer k+1, after its feed-forward block);
5. AdapterHub side by side, when benchmarks/peers/.venv-adapterhub exists (see benchmarks/peers/README.md):
   each row is measured ``--peer-rounds`` times, mtl and AdapterHub alternating, each in a fresh process (so
   neither side carries the state of a process that has run other shapes), and the table gives
   the median of the rounds for each.
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
from mtl.kinds import kind_of
from mtl.model import MTLModel
from mtl.prefix_cache import PrefixCache
from multitask_inference import median_times, multitask_limit

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
    fns = []
    for k in ks:
        model = MTLModel("minilm-l6")
        model.add_task("t", 5, AdapterConfig(type="pfeiffer", drop_first=k))
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        cache = PrefixCache(k, "bench", {("t", "train"): batch}, 384) if cached else None
        inputs = {"input_ids": ids, "attention_mask": mask, "index": torch.arange(batch)}
        if cache is not None:  # fill it once, as the first epoch would
            cache.forward(model, ("t", "train"), inputs, "t")

        def step(model=model, opt=opt, cache=cache):
            if cache is None:
                logits = model(ids, mask, tasks="t")["t"]
            else:
                logits = cache.forward(model, ("t", "train"), inputs, "t")
            loss = kind_of(model.heads["t"].problem).loss(logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        fns.append(step)
    return dict(zip(ks, median_times(fns, steps)))


def multitask_model(n: int, k: int) -> tuple[MTLModel, list[str]]:
    """MiniLM with N Pfeiffer adapters (no adapter in the first k layers) and 4-class heads, in eval mode."""
    model = MTLModel("minilm-l6").eval()
    names = [f"task{i}" for i in range(n)]
    for name in names:
        model.add_task(name, 4, AdapterConfig(type="pfeiffer", drop_first=k))
    return model, names


def inference(ns: list[int], ks: list[int], batch: int, seq: int, repeats: int) -> dict[tuple[int, int], tuple]:
    """(separate rows/s, one-forward rows/s) per (k, N)."""
    ids = torch.randint(1000, 30000, (batch, seq))
    mask = torch.ones_like(ids)
    out = {}
    for k in ks:
        for n in ns:
            model, names = multitask_model(n, k)
            with torch.inference_mode():
                sep, one = median_times([lambda: [model(ids, mask, tasks=t) for t in names],
                                         lambda: model(ids, mask, tasks=names)], repeats)
            out[(k, n)] = (batch / sep, batch / one)
            print(f"  inference k={k} N={n}: {batch / sep:.1f} vs {batch / one:.1f} rows/s", file=sys.stderr, flush=True)
    return out


PEER_ROWS = {"train pfeiffer k=0": ("train", 1, 0), "train pfeiffer k=3": ("train", 1, 3),
             **{f"infer parallel N={n} k={k}": ("infer", n, k) for k in (0, 3) for n in (2, 4, 8)}}


def mtl_row(row: str, args: argparse.Namespace) -> float:
    """mtl's figure for one side-by-side row: training samples/s or multi-task inference rows/s."""
    kind, n, k = PEER_ROWS[row]
    if kind == "train":
        return args.batch / training_steps([k], args.batch, args.seq, args.steps, cached=False)[k]
    ids = torch.randint(1000, 30000, (args.batch, args.seq))
    mask = torch.ones_like(ids)
    model, names = multitask_model(n, k)
    with torch.inference_mode():
        model(ids, mask, tasks=names)  # a second warm-up call, as the AdapterHub script makes two
        (seconds,) = median_times([lambda: model(ids, mask, tasks=names)], args.steps)
    return args.batch / seconds


def row_in_fresh_process(command: list[str], args: argparse.Namespace) -> float:
    """One side-by-side row measured by ``command`` in a new process, which prints a JSON line with the value."""
    cmd = [*command, "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq),
           "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["value"]


def side_by_side(args: argparse.Namespace) -> dict[str, tuple[float, float]] | None:
    """Median over rounds of (mtl, AdapterHub) per row, the two alternating; None when AdapterHub is absent."""
    python = PEERS / ".venv-adapterhub" / "bin" / "python"
    if not python.exists():
        print("AdapterHub comparison skipped: run benchmarks/peers/setup_adapterhub.sh first", file=sys.stderr)
        return None
    out = {}
    for row in args.peer_rows:
        ours, theirs = [], []
        for _ in range(args.peer_rounds):
            ours.append(row_in_fresh_process([sys.executable, str(Path(__file__).resolve()), "--peer-row", row], args))
            theirs.append(row_in_fresh_process([str(python), str(PEERS / "adapterhub_bench.py"), "--no-check",
                                                "--rows", row], args))
        out[row] = (statistics.median(ours), statistics.median(theirs))
        print(f"  {row}: mtl {ours} AdapterHub {theirs}", file=sys.stderr, flush=True)
    return out


def mtl_tables(args: argparse.Namespace, L: int) -> None:
    """Measure and print parts 1-4: layer costs, training vs k (with and without the cache), multi-task inference."""
    f, f0, b = layer_costs(args.batch, args.seq, args.steps)
    print(f"  f = {f * 1e3:.0f} ms, f (no autograd) = {f0 * 1e3:.0f} ms, b = {b * 1e3:.0f} ms", file=sys.stderr)
    plain = training_steps(list(range(L)), args.batch, args.seq, args.steps, cached=False)
    cached = training_steps(list(range(1, L)), args.batch, args.seq, args.steps, cached=True)
    infer = inference([2, 4, 8], [0, L // 2], args.batch, args.seq, args.steps)
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
    print("\n| k | tasks N | N separate forwards (rows/s) | one multi-task forward (rows/s) | speed-up "
          "| limit NL/((k+1)+N(L-k-1)) | of limit |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for (k, n), (sep, one) in infer.items():
        limit = multitask_limit(n, k, L)
        print(f"| {k} | {n} | {sep:.1f} | {one:.1f} | {one / sep:.2f}x | {limit:.2f}x | {one / sep / limit:.0%} |")


def main() -> None:
    """Run every part and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--peer-rounds", type=int, default=3, help="alternating mtl/AdapterHub rounds per row")
    parser.add_argument("--peer-rows", nargs="+", choices=PEER_ROWS, default=list(PEER_ROWS), metavar="ROW",
                        help="side-by-side rows to measure (default: all)")
    parser.add_argument("--only-peers", action="store_true", help="skip the mtl-only tables")
    parser.add_argument("--peer-row", choices=PEER_ROWS, help="measure only this side-by-side row, print it as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.peer_row:
        print(json.dumps({"row": args.peer_row, "value": round(mtl_row(args.peer_row, args), 2)}))
        return
    L = 6
    if not args.only_peers:
        mtl_tables(args, L)
    peers = None if args.no_peers else side_by_side(args)
    if peers:
        print(f"\nmtl vs AdapterHub, median of {args.peer_rounds} alternating rounds per row:\n")
        print("| row | mtl | AdapterHub 1.3.0 | mtl / AdapterHub |\n|---|---:|---:|---:|")
        for name, (ours, theirs) in peers.items():
            print(f"| {name} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f} |")


if __name__ == "__main__":
    main()
