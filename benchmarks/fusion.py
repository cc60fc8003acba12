"""AdapterFusion speed on MiniLM-L6: fast vs naive path, fusion training, AdapterHub, fused + per-adapter outputs.

Usage: python benchmarks/fusion.py [--steps 8] [--batch 32] [--seq 128] [--threads 2] [--peer-rounds 3] [--no-peers]

Pfeiffer adapters with AdapterHub's init (``init="bert"``: non-zero random up-projections, so nothing is skipped)
and dynamic fusions (value matrices nudged off their near-identity init), random ids in [1000, 30000), mask all ones.
In one process, interleaved timings (medians of ``--steps`` after a warm-up):

1. eval forward of a fusion over N = 2, 4, 8 adapters, fast and naive path, each ÷ one single-adapter forward;
2. one training step of the fusion over 8 frozen adapters (fusion layers + head train; cross-entropy + value
   regularisation, AdamW) vs one single-adapter training step;
3. AdapterHub side by side (benchmarks/peers/adapterhub_fusion.py ``bench``), when benchmarks/peers/.venv-adapterhub
   exists: each row ``--peer-rounds`` times, mtl and AdapterHub alternating, each in a fresh process; medians;
4. fused and per-adapter outputs in one forward (``tasks=["fz", "task0", ..., "task3"]``) vs separate forwards,
   with a count of each adapter's up-projection runs.

Before timing it checks that the fast and naive paths agree (max |diff| of logits <= 1e-4) and that the one-pass
outputs equal the separate forwards' (<= 1e-5).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from mtl.adapters.bottleneck import BottleneckAdapter
from mtl.adapters.config import AdapterConfig
from mtl.model import MTLModel
from multitask_inference import median_times

PEERS = Path(__file__).resolve().parent / "peers"
NS = (2, 4, 8)
LABELS = 3  # as the AdapterHub script's head
INFER_ROWS = {"infer single": 0, **{f"infer fuse N={n}": n for n in NS}}
TRAIN_ROWS = {"train fuse N=8": 8, "train single": 0}
ROWS = [*INFER_ROWS, *TRAIN_ROWS]


def log(msg: str) -> None:
    """Progress to stderr, so stdout holds only the tables."""
    print(msg, file=sys.stderr, flush=True)


def inputs(batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids in [1000, 30000) and an all-ones attention mask."""
    ids = torch.randint(1000, 30000, (batch, seq))
    return ids, torch.ones_like(ids)


def fusion_model(adapters: int, fusions: dict[str, int]) -> MTLModel:
    """MiniLM with Pfeiffer adapters task0.. and dynamic fusions (name -> over the first n adapters), in eval mode."""
    model = MTLModel("minilm-l6")
    for i in range(adapters):
        model.add_task(f"task{i}", LABELS, AdapterConfig(type="pfeiffer", init="bert"))
    for name, n in fusions.items():
        model.add_fusion(name, [f"task{i}" for i in range(n)], LABELS, config="dynamic")
    with torch.no_grad():  # value matrices off their ~identity init, so they take part in the checks
        for slot in model.iter_slots():
            for fusion in slot.fusions.values():
                fusion.value.weight.add_(torch.randn_like(fusion.value.weight) * 0.02)
    ups = [a.up.weight.abs().max().item() for s in model.iter_slots() for a in s.adapters.values()]
    assert ups and min(ups) > 0, "expected non-zero up-projections"
    return model.eval()


def train_step(model: MTLModel, task: str, batch: int, seq: int) -> tuple[Callable[[], None], int]:
    """A training step of ``task`` alone (its own parts trainable), and its trainable parameter count."""
    model.set_trainable([task])
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    ids, mask = inputs(batch, seq)
    labels = torch.randint(0, LABELS, (batch,))

    def step() -> None:
        """Forward, cross-entropy + value regularisation, backward, optimizer step."""
        loss = F.cross_entropy(model(ids, mask, tasks=task)[task], labels) + model.value_regularization()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, sum(p.numel() for p in params)


def inference_times(args: argparse.Namespace) -> tuple[float, dict[int, tuple[float, float]]]:
    """Single-adapter forward time, and (fast, naive) fusion forward times per N, interleaved in one process."""
    model = fusion_model(max(NS), {f"fz{n}": n for n in NS})
    ids, mask = inputs(args.batch, args.seq)

    def call(task: str, fast: bool = True) -> Callable[[], torch.Tensor]:
        """One forward of ``task`` on the chosen fusion path."""
        def run() -> torch.Tensor:
            model.fast_fusion = fast
            return model(ids, mask, tasks=task)[task]
        return run

    with torch.inference_mode():
        single = call("task0")()
        for n in NS:
            fast, naive = call(f"fz{n}", True)(), call(f"fz{n}", False)()
            diff = (fast - naive).abs().max().item()
            assert diff <= 1e-4, f"N={n}: fast and naive fusion logits differ by {diff:.2e}"
            assert (fast - single).abs().max().item() > 1e-4, f"N={n}: fusion output equals the single adapter's"
            log(f"  check N={n}: fast vs naive max |diff| {diff:.1e}")
        times = median_times([call("task0")] + [call(f"fz{n}", fast) for n in NS for fast in (True, False)],
                             args.steps)
    return times[0], {n: (times[1 + 2 * i], times[2 + 2 * i]) for i, n in enumerate(NS)}


def training_times(args: argparse.Namespace) -> tuple[float, float, int, int]:
    """(fusion N=8 step, single-adapter step) median seconds, interleaved, and their trainable parameter counts."""
    fused = fusion_model(8, {"fz": 8})
    fused_step, fused_params = train_step(fused, "fz", args.batch, args.seq)
    assert not any(p.requires_grad for s in fused.iter_slots() for p in s.adapters.parameters()), "adapters train"
    single_step, single_params = train_step(fusion_model(1, {}), "task0", args.batch, args.seq)
    fused_s, single_s = median_times([fused_step, single_step], args.steps)
    return fused_s, single_s, fused_params, single_params


def mtl_row(row: str, args: argparse.Namespace) -> float:
    """mtl's figure for one side-by-side row: inference rows/s or training samples/s."""
    n = INFER_ROWS.get(row, TRAIN_ROWS.get(row))
    task = "fz" if n else "task0"
    model = fusion_model(max(n, 1), {"fz": n} if n else {})
    if row in TRAIN_ROWS:
        step, _ = train_step(model, task, args.batch, args.seq)
        step()  # a second warm-up call, as the AdapterHub script makes two
        (seconds,) = median_times([step], args.steps)
        return args.batch / seconds
    ids, mask = inputs(args.batch, args.seq)
    with torch.inference_mode():
        model(ids, mask, tasks=task)
        (seconds,) = median_times([lambda: model(ids, mask, tasks=task)], args.steps)
    return args.batch / seconds


def row_in_fresh_process(command: list[str], args: argparse.Namespace) -> float:
    """One side-by-side row measured by ``command`` in a new process, which prints a JSON line with the value."""
    cmd = [*command, "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq),
           "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["value"]


def side_by_side(args: argparse.Namespace) -> dict[str, tuple[float, float]] | None:
    """Median over rounds of (mtl, AdapterHub) per row, alternating fresh processes; None when AdapterHub is absent."""
    python = PEERS / ".venv-adapterhub" / "bin" / "python"
    if not python.exists():
        print("\nAdapterHub side by side skipped: no benchmarks/peers/.venv-adapterhub "
              "(run benchmarks/peers/setup_adapterhub.sh)")
        return None
    out = {}
    for row in ROWS:
        ours, theirs = [], []
        for _ in range(args.peer_rounds):
            ours.append(row_in_fresh_process([sys.executable, str(Path(__file__).resolve()), "--mtl-row", row], args))
            theirs.append(row_in_fresh_process([str(python), str(PEERS / "adapterhub_fusion.py"), "bench",
                                                "--rows", row], args))
        out[row] = (statistics.median(ours), statistics.median(theirs))
        log(f"  {row}: mtl {ours} AdapterHub {theirs}")
    return out


def count_ups(model: MTLModel, fn: Callable[[], dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], Counter]:
    """Run ``fn`` and count ``BottleneckAdapter.up_output`` calls per (layer, adapter name)."""
    where = {id(a): (s.layer_index, name) for s in model.iter_slots() for name, a in s.adapters.items()}
    counts: Counter = Counter()
    original = BottleneckAdapter.up_output

    def counting(self: BottleneckAdapter, z: torch.Tensor) -> torch.Tensor:
        """The original up_output, counted."""
        counts[where[id(self)]] += 1
        return original(self, z)

    BottleneckAdapter.up_output = counting
    try:
        return fn(), counts
    finally:
        BottleneckAdapter.up_output = original


def one_pass(args: argparse.Namespace) -> list[tuple[str, float, str, int]]:
    """(variant, median seconds, up-projection runs per adapter at the first adapter layer, runs in all layers)."""
    model = fusion_model(4, {"fz": 4})
    names = [f"task{i}" for i in range(4)]
    ids, mask = inputs(args.batch, args.seq)
    variants = {
        'one pass: tasks=["fz", "task0", ..., "task3"]': lambda: model(ids, mask, tasks=["fz", *names]),
        'separate: tasks="fz" + tasks=["task0", ..., "task3"]':
            lambda: {**model(ids, mask, tasks="fz"), **model(ids, mask, tasks=names)},
        "5 single-task forwards": lambda: {t: model(ids, mask, tasks=t)[t] for t in ["fz", *names]},
    }
    first = min(s.layer_index for s in model.iter_slots() if s.adapters)
    rows = []
    with torch.inference_mode():
        counted = {v: count_ups(model, fn) for v, fn in variants.items()}
        reference = counted["5 single-task forwards"][0]
        for variant, (out, counts) in counted.items():
            diff = max((out[t] - reference[t]).abs().max().item() for t in reference)
            assert diff <= 1e-5, f"{variant}: outputs differ from single-task forwards by {diff:.2e}"
            log(f"  check {variant}: max |diff| vs single-task forwards {diff:.1e}")
        times = median_times(list(variants.values()), args.steps)
    for (variant, (_, counts)), seconds in zip(counted.items(), times):
        at_first = sorted({counts[(first, name)] for name in names})
        rows.append((variant, seconds, "/".join(map(str, at_first)), sum(counts.values())))
    return rows


def main() -> None:
    """Run every part and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peer-rounds", type=int, default=3, help="alternating mtl/AdapterHub rounds per row")
    parser.add_argument("--no-peers", action="store_true", help="skip the AdapterHub side by side")
    parser.add_argument("--mtl-row", choices=ROWS, help=argparse.SUPPRESS)  # one side-by-side row, as JSON
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.mtl_row:
        print(json.dumps({"row": args.mtl_row, "value": round(mtl_row(args.mtl_row, args), 2)}))
        return
    began = time.perf_counter()
    log("1. inference: fusion N = 2, 4, 8 vs single adapter ...")
    single, infer = inference_times(args)
    log("2. training: fusion N = 8 vs single adapter ...")
    fused_s, single_s, fused_params, single_params = training_times(args)
    log("4. fused and per-adapter outputs in one pass ...")
    passes = one_pass(args)
    print(f"\nMiniLM-L6, Pfeiffer adapters, dynamic fusion, batch {args.batch}, seq {args.seq}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads ({os.cpu_count()} cores, {platform.machine()}); median of {args.steps}\n")
    print(f"Inference (eval, inference_mode), one forward; single adapter: {single * 1e3:.0f} ms "
          f"(goal: fast ÷ single <= 1.4x at N = 8)\n")
    print("| N | fast ms | naive ms | fast ÷ single | naive ÷ single |\n|---:|---:|---:|---:|---:|")
    for n, (fast, naive) in infer.items():
        print(f"| {n} | {fast * 1e3:.0f} | {naive * 1e3:.0f} | {fast / single:.2f}x | {naive / single:.2f}x |")
    print("\nTraining step (AdamW, cross-entropy + value regularisation, backbone frozen in eval mode)\n")
    print("| trains | trainable parameters | ms / step | samples/s | vs single |\n|---|---:|---:|---:|---:|")
    print(f"| single adapter + head | {single_params:,} | {single_s * 1e3:.0f} | {args.batch / single_s:.1f} | 1.00x |")
    print(f"| fusion N=8 + head (adapters frozen) | {fused_params:,} | {fused_s * 1e3:.0f} | "
          f"{args.batch / fused_s:.1f} | {single_s / fused_s:.2f}x |")
    peers = None
    if args.no_peers:
        print("\nAdapterHub side by side skipped (--no-peers)")
    else:
        log("3. AdapterHub side by side ...")
        peers = side_by_side(args)
    if peers:
        print(f"\nmtl vs AdapterHub 1.3.0, fresh process per measurement, median of {args.peer_rounds} alternating "
              f"rounds per row (rows/s for infer, samples/s for train; goal >= 2 at infer fuse N=8)\n")
        print("| row | mtl | AdapterHub | mtl ÷ AdapterHub |\n|---|---:|---:|---:|")
        for row, (ours, theirs) in peers.items():
            print(f"| {row} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}x |")
    separate = passes[1][1]
    print("\nFused and per-adapter outputs (fz over task0..task3, and task0..task3 themselves), eval\n")
    print("| variant | ms | time ÷ separate | up-projection runs per adapter, first adapter layer | up-projection runs, "
          "all layers |\n|---|---:|---:|---:|---:|")
    for variant, seconds, at_first, total in passes:
        print(f"| {variant} | {seconds * 1e3:.0f} | {seconds / separate:.2f}x | {at_first} | {total} |")
    log(f"total {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
