"""Training throughput and peak memory: full fine-tuning vs Pfeiffer / Houlsby / parallel adapters and AdapterDrop.

Usage: python benchmarks/train_throughput.py [--steps 10] [--batch 32] [--seq 128] [--threads 2]
       [--backbone-config NAME|FILE] [--seed 0] [--variants NAME ...] [--in-process]

Each variant runs in its own process (peak RSS is per process), on MiniLM-L6 with random token ids
(throughput depends on shapes only). ``--backbone-config`` runs the same variants on a randomly initialised
backbone of another family and shape instead: a short name from benchmarks/backbones/ (``bert-base``,
``deberta-v3-base``, ``modernbert-base``) or a JSON file of Hugging Face config fields with ``model_type``
(weights drawn under ``--seed``, nothing downloaded; see benchmarks/backbones/__init__.py).

Prints the backbone and its shape, then a markdown table with ratios against full fine-tuning measured in the
same run (the step time is the median over the measured steps, after 2 warm-up steps), then the ratios in words:
Pfeiffer vs full fine-tuning (samples/s and peak RSS), and AdapterDrop (Pfeiffer without adapters in the first
k = L/2 layers) vs Pfeiffer at k = 0 beside its limit L(f+b) / (Lf + (L-k)b), where f and b are one layer's
forward and backward time, taken here as 1/L of the Pfeiffer k = 0 run's forward (with the loss) and backward
(with the optimizer step) medians (layers assumed alike; the first k layers also run without autograd
recording there, so a ratio a little above the limit is possible). ``--in-process`` runs every variant in this
process (quick checks; peak RSS is then the process's running maximum, not each variant's own). Each variant
runs the attention kernel a fit would pick for its precision (``model.attention: auto``: eager under bf16 autocast).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

ADAPTERDROP = "pfeiffer + AdapterDrop k=L/2"
VARIANTS = {
    # name: (adapter preset or None for full fine-tuning, backbone dropout, bf16 autocast, AdapterDrop k = L/2)
    "full fine-tuning": (None, True, False, False),
    "pfeiffer": ("pfeiffer", False, False, False),
    "houlsby": ("houlsby", False, False, False),
    "parallel": ("parallel", False, False, False),
    "pfeiffer + backbone dropout": ("pfeiffer", True, False, False),
    "pfeiffer + bf16 autocast": ("pfeiffer", False, True, False),
    ADAPTERDROP: ("pfeiffer", False, False, True),
}


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(name: str, steps: int, batch: int, seq: int, threads: int, backbone_config: str | None = None,
            seed: int = 0) -> dict:
    """Train ``steps`` steps of one variant in this process; return timings and peak RSS."""
    import torch

    import backbones
    from mtl.adapters.config import AdapterConfig
    from mtl.kinds import kind_of
    from mtl.model import MTLModel
    from mtl.precision import attention_kernel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    preset, dropout, bf16, drop = VARIANTS[name]
    backbone = backbones.load(backbone_config, seed)
    described = backbones.describe(backbone)
    model = MTLModel(backbone, backbone_dropout=dropout)
    layers = model.num_layers
    k = layers // 2 if drop else 0
    if preset is None:  # a head on the bare backbone: mtl wants an adapter in some layer, so take it out again
        model.add_task("t", 5, "pfeiffer")
        for slot in model.iter_slots():
            if "t" in slot.adapters:
                del slot.adapters["t"]
        for p in model.backbone.parameters():
            p.requires_grad_(True)
    else:
        model.add_task("t", 5, AdapterConfig(type=preset, drop_first=k))
    # the attention kernel a fit picks for this precision (model.attention: auto)
    model.backbone.set_attn_implementation(
        attention_kernel("auto", "bf16-mixed" if bf16 else "32-true", "cpu", model.loaded_kernel))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = backbones.random_ids(backbone.config, batch, seq)
    mask = torch.ones(batch, seq, dtype=torch.long)
    labels = torch.randint(0, 5, (batch,))
    times, forwards, backwards = [], [], []
    for step in range(steps + 2):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(ids, mask, tasks="t")["t"]
        loss = kind_of(model.heads["t"].problem).loss(logits.float(), labels)
        middle = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        end = time.perf_counter()
        if step >= 2:  # two warm-up steps
            times.append(end - start)
            forwards.append(middle - start)
            backwards.append(end - middle)
    step_time = statistics.median(times)
    return {"name": name, "trainable": sum(p.numel() for p in params), "step_s": step_time,
            "forward_s": statistics.median(forwards), "backward_s": statistics.median(backwards),
            "samples_s": batch / step_time, "peak_rss_mb": peak_rss_mb(), "layers": layers, "k": k,
            "backbone": described}


def adapterdrop_limit(layers: int, k: int, forward_s: float, backward_s: float) -> float:
    """L(f+b) / (Lf + (L-k)b) with f = forward/L, b = backward/L: no backward below the first adapter."""
    return (forward_s + backward_s) / (forward_s + backward_s * (layers - k) / layers)


def print_tables(results: list[dict], args: argparse.Namespace) -> None:
    """The table (ratios against the first variant, normally full fine-tuning) and the ratios in words."""
    by_name = {r["name"]: r for r in results}
    base = results[0]
    rss_note = " (in-process: peak RSS is the running maximum of one process)" if args.in_process else ""
    print(f"\nBackbone: {base['backbone']}")
    print(f"batch {args.batch}, seq {args.seq}, {args.threads} threads, median of {args.steps} steps{rss_note}\n")
    print(f"| variant | trainable params | samples/s | vs {base['name']} | peak RSS (MB) | vs {base['name']} |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['name']} | {r['trainable']:,} | {r['samples_s']:.1f} | {r['samples_s'] / base['samples_s']:.2f}x "
              f"| {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x |")
    full, pfeiffer, drop = (by_name.get(n) for n in ("full fine-tuning", "pfeiffer", ADAPTERDROP))
    print()
    if full and pfeiffer:
        print(f"Pfeiffer vs full fine-tuning: {pfeiffer['samples_s'] / full['samples_s']:.2f}x samples/s "
              f"({pfeiffer['samples_s']:.1f} vs {full['samples_s']:.1f}), "
              f"{pfeiffer['peak_rss_mb'] / full['peak_rss_mb']:.2f}x peak RSS")
    if pfeiffer and drop:
        layers, k = drop["layers"], drop["k"]
        limit = adapterdrop_limit(layers, k, pfeiffer["forward_s"], pfeiffer["backward_s"])
        ratio = drop["samples_s"] / pfeiffer["samples_s"]
        print(f"AdapterDrop k={k} of L={layers} vs Pfeiffer k=0: {ratio:.2f}x samples/s, limit L(f+b)/(Lf+(L-k)b) = "
              f"{limit:.2f}x (f, b from Pfeiffer k=0: forward {pfeiffer['forward_s'] * 1e3:.0f} ms, backward + step "
              f"{pfeiffer['backward_s'] * 1e3:.0f} ms per step), {ratio / limit:.0%} of the limit")


def main(argv: list[str] | None = None) -> None:
    """Run every variant (each in a subprocess unless --in-process) and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backbone-config", metavar="NAME|FILE",
                        help="a random backbone of this shape instead of the pretrained MiniLM-L6 "
                             "(a name from benchmarks/backbones/ or a JSON file)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random backbone's weights")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), metavar="NAME",
                        help=f"variants to run, the first is the table's baseline (default: all: {list(VARIANTS)})")
    parser.add_argument("--in-process", action="store_true",
                        help="run the variants in this process (peak RSS then is not per variant)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import backbones

    if args.backbone_config is not None:
        try:  # a bad name or file is one line before any work
            backbones.build_config(backbones.load_shape(args.backbone_config)[0])
        except backbones.ShapeError as err:
            parser.error(str(err))
    common = (args.steps, args.batch, args.seq, args.threads, args.backbone_config, args.seed)
    if args.one:
        print(json.dumps(run_one(args.one, *common)))
        return
    results = []
    for name in args.variants:
        if args.in_process:
            results.append(run_one(name, *common))
        else:
            cmd = [sys.executable, __file__, "--one", name, "--steps", str(args.steps), "--batch", str(args.batch),
                   "--seq", str(args.seq), "--threads", str(args.threads), "--seed", str(args.seed)]
            if args.backbone_config is not None:
                cmd += ["--backbone-config", args.backbone_config]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                sys.stderr.write(done.stderr[-4000:])
                raise SystemExit(f"variant '{name}' failed (exit {done.returncode}): {' '.join(cmd)}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"  {name}: {results[-1]['samples_s']:.1f} samples/s", file=sys.stderr)
    print_tables(results, args)


if __name__ == "__main__":
    main()
