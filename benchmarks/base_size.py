"""Base-size backbones on 2 CPU threads: mtl's training and multi-task ratios, and AdapterHub side by side.

Usage: python benchmarks/base_size.py [--shapes bert-base deberta-v3-base modernbert-base] [--steps 5] [--batch 8]
       [--seq 128] [--threads 2] [--infer-batch 4] [--repeats 3] [--peer-rounds 3] [--no-peers] [--seed 0]
       [--out FILE] [--estimate] [--smoke]

For each shape of benchmarks/backbones/ (random weights, nothing downloaded), every measurement in a fresh process:

1. training, ``train_throughput.py --one VARIANT`` (the per-variant process train_throughput.py itself starts for
   ``--variants "full fine-tuning" pfeiffer "pfeiffer + AdapterDrop k=L/2"``; its JSON row is read here): full
   fine-tuning, then Pfeiffer ``--peer-rounds`` times alternating with AdapterHub's ``train pfeiffer k=0`` row
   (``peers/adapterhub_bench.py --backbone-config`` in the AdapterHub venv, when benchmarks/peers/.venv-adapterhub
   exists; one ``--check-only`` process first runs its zero-adapter sanity check), then AdapterDrop k = L/2.
   Pfeiffer's figure is the median of its rounds; its forward / backward split and peak RSS come from the round with
   the median samples/s. Ratios: Pfeiffer vs full fine-tuning (samples/s, peak RSS); AdapterDrop vs Pfeiffer beside
   its limit L(f+b) / (Lf + (L-k)b) (train_throughput.adapterdrop_limit); mtl vs AdapterHub (medians).
2. ``multitask_inference.py --tasks 8`` (leave-out 0 and L/2): one 8-task forward vs 8 separate forwards, each
   beside its limit N L / ((k+1) + N (L-k-1)); parsed from its summary lines.

Prints an estimate of the whole run first (a 1-layer copy of each shape's forward timed on this machine now, times
L and the cost model below, plus each venv's start-up time; about 20 s), one markdown table per shape, then a
summary table across shapes; ``--out`` writes every raw row as JSON (rewritten after each shape). ``--estimate``
prints the estimate and exits. ``--smoke`` runs the same plumbing on the shapes shrunk to 2 layers, hidden 64
(benchmarks/backbones.shrink), 1 step, batch 2, seq 16, 1 repeat, 1 peer round (unless given).

Defaults: median of 5 steps after 2 warm-up, training batch 8, seq 128, inference batch 4, 3 repeats, 3 peer rounds:
about 18 minutes for the three base shapes on an idle 2-core machine (a BERT-base layer's forward at batch 8, seq
128 took 0.10 s there: 1.2 s for the model; the MiniLM-L6 tables in RESULTS.md use batch 32). The run time grows
about linearly with ``--batch`` (``--batch 16``: about 28 minutes) and ``--infer-batch``. The 2 threads need 2 idle
cores: with another process busy on one of them every timing here came out 2-3x slower, tiny ones 100x (OpenMP
threads wait for each other), so the run checks them (a matmul on 1 thread vs 2, before and after each shape; BUSY
in the output means the timings are off), and ``--estimate`` just before shows what to expect.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from train_throughput import ADAPTERDROP, adapterdrop_limit

HERE = Path(__file__).resolve().parent
TRAIN = HERE / "train_throughput.py"
MULTITASK = HERE / "multitask_inference.py"
PEER_SCRIPT = HERE / "peers" / "adapterhub_bench.py"
PEER_PYTHON = HERE / "peers" / ".venv-adapterhub" / "bin" / "python"
PEER_ROW = "train pfeiffer k=0"
FULL, PFEIFFER = "full fine-tuning", "pfeiffer"
DEFAULT_SHAPES = ["bert-base", "deberta-v3-base", "modernbert-base"]
TASKS = 8
# the words line multitask_inference.py prints per leave-out k for the largest N
MULTITASK_LINE = re.compile(r"^(\d+) tasks, k=(\d+) of L=(\d+): one forward ([\d.]+)x of \d+ separate forwards "
                            r"\(([\d.]+) vs ([\d.]+) rows/s\), limit ([\d.]+)x")
PEAK_RSS_LINE = re.compile(r"^peak RSS: (\d+) MB")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- measurements (subprocesses) ----------------------------------------------------------------------------------


def run_process(cmd: list[str]) -> tuple[str | None, str]:
    """(stdout, '') or (None, the error's last lines)."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-6:]
        return None, f"exit {done.returncode}: " + " | ".join(tail)
    return done.stdout, ""


def timed_process(cmd: list[str]) -> tuple[str | None, float, dict | None]:
    """(stdout, wall s, None), or (None, wall s, the failure's row {"error", "cmd", "wall_s"}, logged)."""
    start = time.perf_counter()
    out, err = run_process(cmd)
    wall = time.perf_counter() - start
    if out is None:
        log(f"    FAILED: {err}")
        return None, wall, {"error": err, "cmd": cmd, "wall_s": wall}
    return out, wall, None


def json_row(cmd: list[str]) -> dict:
    """The last stdout line of ``cmd`` as JSON, or {"error": ...}; the process's wall time as ``wall_s``."""
    out, wall, failed = timed_process(cmd)
    if failed:
        return failed
    try:
        return {**json.loads(out.strip().splitlines()[-1]), "wall_s": wall}
    except (ValueError, IndexError):
        return {"error": f"no JSON row on stdout: {out.strip()[-300:]}", "cmd": cmd, "wall_s": wall}


def mtl_train(variant: str, spec: str, args: argparse.Namespace) -> dict:
    row = json_row([sys.executable, str(TRAIN), "--one", variant, "--backbone-config", spec, "--steps",
                    str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq), "--threads",
                    str(args.threads), "--seed", str(args.seed)])
    if "error" not in row:
        log(f"    mtl {variant}: {row['samples_s']:.2f} samples/s, peak RSS {row['peak_rss_mb']:.0f} MB "
            f"({row['wall_s']:.0f} s)")
    return row


def peer_cmd(spec: str, args: argparse.Namespace) -> list[str]:
    return [str(PEER_PYTHON), str(PEER_SCRIPT), "--backbone-config", spec, "--steps", str(args.steps), "--batch",
            str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads), "--seed", str(args.seed)]


def peer_train(spec: str, args: argparse.Namespace) -> dict:
    row = json_row([*peer_cmd(spec, args), "--no-check", "--rows", PEER_ROW])
    if "error" not in row:
        log(f"    AdapterHub {PEER_ROW}: {row['value']:.2f} samples/s ({row['wall_s']:.0f} s)")
    return row


def parse_multitask(stdout: str) -> dict:
    """The N-task vs N-separate summary lines and the peak RSS of multitask_inference.py's output."""
    lines = []
    rss = None
    for line in stdout.splitlines():
        m = MULTITASK_LINE.match(line.strip())
        if m:
            n, k, layers = (int(g) for g in m.groups()[:3])
            ratio, one, sep, limit = (float(g) for g in m.groups()[3:])
            lines.append({"n": n, "k": k, "layers": layers, "ratio": ratio, "one_rows_s": one, "sep_rows_s": sep,
                          "limit": limit, "line": line.strip()})
        m = PEAK_RSS_LINE.match(line.strip())
        if m:
            rss = float(m.group(1))
    if not lines:
        return {"error": "no 'N tasks, k=..: one forward' line in multitask_inference.py's output"}
    return {"lines": lines, "peak_rss_mb": rss}


def multitask(spec: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(MULTITASK), "--backbone-config", spec, "--tasks", str(TASKS), "--batch",
           str(args.infer_batch), "--seq", str(args.seq), "--repeats", str(args.repeats), "--threads",
           str(args.threads), "--seed", str(args.seed)]
    out, wall, failed = timed_process(cmd)
    if failed:
        return failed
    parsed = parse_multitask(out)
    for line in parsed.get("lines", []):
        log(f"    mtl {line['line']}")
    return {**parsed, "wall_s": wall, "stdout": out}


def measure_shape(name: str, spec: str, args: argparse.Namespace, peers: bool) -> dict:
    """Every measurement of one shape, each in a fresh process."""
    start = time.perf_counter()
    result: dict = {"shape": name, "spec": spec, "pfeiffer": [], "peer": None}
    log(f"  {name}: {FULL}")
    result["full"] = mtl_train(FULL, spec, args)
    if peers:
        check = json_row([*peer_cmd(spec, args), "--check-only"])
        log(f"    AdapterHub {check.get('line', check.get('error'))}")
        result["peer"] = {"check": check, "rounds": []}
    for r in range(args.peer_rounds if peers else 1):
        log(f"  {name}: Pfeiffer round {r + 1}")
        result["pfeiffer"].append(mtl_train(PFEIFFER, spec, args))
        if peers:
            result["peer"]["rounds"].append(peer_train(spec, args))
    log(f"  {name}: {ADAPTERDROP}")
    result["adapterdrop"] = mtl_train(ADAPTERDROP, spec, args)
    log(f"  {name}: {TASKS}-task forward vs {TASKS} separate forwards")
    result["multitask"] = multitask(spec, args)
    result["wall_s"] = time.perf_counter() - start
    return result


# ---- derived figures and tables (pure: tests feed fake rows) ------------------------------------------------------


def ok(row) -> bool:
    return isinstance(row, dict) and "error" not in row


def derive(result: dict) -> dict:
    """The ratios of one shape's raw rows; a key is absent where its rows failed or were not run."""
    d: dict = {"shape": result["shape"]}
    full, drop = result.get("full"), result.get("adapterdrop")
    rounds = [r for r in result.get("pfeiffer", []) if ok(r)]
    pf = None
    if rounds:
        values = [r["samples_s"] for r in rounds]
        d["pf_samples_s"] = statistics.median(values)
        d["pf_rounds"] = values
        pf = next(r for r in rounds if r["samples_s"] == statistics.median_low(values))
        d.update(pf_rss_mb=pf["peak_rss_mb"], layers=pf["layers"], backbone=pf["backbone"],
                 pf_trainable=pf["trainable"])
    if ok(full):
        d.update(full_samples_s=full["samples_s"], full_rss_mb=full["peak_rss_mb"], full_trainable=full["trainable"])
        d.setdefault("backbone", full["backbone"])
        d.setdefault("layers", full["layers"])
    if pf and ok(full):
        d["pf_vs_full"] = d["pf_samples_s"] / full["samples_s"]
        d["rss_ratio"] = pf["peak_rss_mb"] / full["peak_rss_mb"]
    if pf and ok(drop):
        d["ad_k"], d["ad_samples_s"] = drop["k"], drop["samples_s"]
        d["ad_ratio"] = drop["samples_s"] / d["pf_samples_s"]
        d["ad_limit"] = adapterdrop_limit(drop["layers"], drop["k"], pf["forward_s"], pf["backward_s"])
        d["ad_of_limit"] = d["ad_ratio"] / d["ad_limit"]
    mt = result.get("multitask")
    if ok(mt) and mt.get("lines"):
        lines = sorted(mt["lines"], key=lambda line: line["k"])
        d["mt"] = {"low": lines[0], "high": lines[-1] if len(lines) > 1 else None}
    peer = result.get("peer")
    if peer:
        check = peer.get("check") or {}
        d["peer_check"] = check.get("status", "failed") if ok(check) else "failed"
        d["peer_note"] = check.get("note")
        theirs = [r for r in peer.get("rounds", []) if ok(r)]
        if theirs:
            d["peer_rounds"] = [r["value"] for r in theirs]
            d["peer_samples_s"] = statistics.median(d["peer_rounds"])
            d["peer_trainable"] = theirs[0].get("trainable")
            d["peer_backbone"] = theirs[0].get("backbone")
            d["peer_note"] = d["peer_note"] or theirs[0].get("note")
            if "pf_samples_s" in d:
                d["mtl_vs_peer"] = d["pf_samples_s"] / d["peer_samples_s"]
        errors = [r["error"] for r in [check, *peer.get("rounds", [])] if isinstance(r, dict) and "error" in r]
        if errors:
            d["peer_error"] = errors[0]
    d["errors"] = [f"{what}: {row['error']}" for what, row in
                   [(FULL, full), (ADAPTERDROP, drop), ("multitask_inference", mt),
                    *((PFEIFFER, r) for r in result.get("pfeiffer", []))] if isinstance(row, dict) and "error" in row]
    return d


def x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def num(value: float | None, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def mt_cell(line: dict | None) -> str:
    if not line:
        return "-"
    return f"{line['ratio']:.2f}x (limit {line['limit']:.2f}x, {line['ratio'] / line['limit']:.0%})"


def shape_table(result: dict, settings: dict) -> str:
    """The markdown table of one shape, with the backbone above it and notes below."""
    d = derive(result)
    rounds = settings.get("peer_rounds", 1)
    out = [f"### {d['shape']}", "", f"Backbone: {d.get('backbone', 'unknown (every mtl row failed)')}",
           f"Training batch {settings['batch']}, seq {settings['seq']}, {settings['threads']} threads, median of "
           f"{settings['steps']} steps after 2 warm-up, each row a fresh process; inference batch "
           f"{settings['infer_batch']}, median of {settings['repeats']} repeats.", "",
           "| measurement | value | against | ratio | limit | of limit |", "|---|---:|---:|---:|---:|---:|"]
    n_pf = len(d.get("pf_rounds", []))
    out.append(f"| Pfeiffer vs full fine-tuning, training samples/s (Pfeiffer: median of {n_pf}) "
               f"| {num(d.get('pf_samples_s'))} | {num(d.get('full_samples_s'))} | {x(d.get('pf_vs_full'))} | - | - |")
    out.append(f"| peak RSS (MB), Pfeiffer vs full fine-tuning | {num(d.get('pf_rss_mb'), '.0f')} "
               f"| {num(d.get('full_rss_mb'), '.0f')} | {x(d.get('rss_ratio'))} | - | - |")
    k = d.get("ad_k", "L/2")
    layers = d.get("layers", "L")
    out.append(f"| AdapterDrop k={k} of L={layers} vs Pfeiffer k=0, training samples/s | {num(d.get('ad_samples_s'))} "
               f"| {num(d.get('pf_samples_s'))} | {x(d.get('ad_ratio'))} | {x(d.get('ad_limit'))} "
               f"| {num(d.get('ad_of_limit'), '.0%') if 'ad_of_limit' in d else '-'} |")
    mt = d.get("mt") or {}
    for line in [mt.get("low"), mt.get("high")]:
        if line:
            out.append(f"| one {line['n']}-task forward vs {line['n']} separate forwards, k={line['k']} of "
                       f"L={line['layers']}, rows/s | {line['one_rows_s']:.2f} | {line['sep_rows_s']:.2f} "
                       f"| {line['ratio']:.2f}x | {line['limit']:.2f}x | {line['ratio'] / line['limit']:.0%} |")
    if "mt" not in d:
        out.append(f"| one {TASKS}-task forward vs {TASKS} separate forwards | - | - | - | - | - |")
    if "peer_check" in d:
        out.append(f"| mtl Pfeiffer vs AdapterHub `{PEER_ROW}`, training samples/s (medians of {rounds} alternating "
                   f"rounds) | {num(d.get('pf_samples_s'))} | {num(d.get('peer_samples_s'))} "
                   f"| {x(d.get('mtl_vs_peer'))} | - | - |")
    out.append("")
    trainable = [f"mtl Pfeiffer {d['pf_trainable']:,}" if "pf_trainable" in d else None,
                 f"full fine-tuning {d['full_trainable']:,}" if "full_trainable" in d else None,
                 f"AdapterHub {d['peer_trainable']:,}" if d.get("peer_trainable") else None]
    if any(trainable):
        out.append("Trainable parameters (with the 5-class head): " + ", ".join(t for t in trainable if t) + ".")
    if "pf_rounds" in d:
        out.append("Pfeiffer rounds (samples/s): mtl " + ", ".join(f"{v:.2f}" for v in d["pf_rounds"])
                   + ("; AdapterHub " + ", ".join(f"{v:.2f}" for v in d["peer_rounds"]) if "peer_rounds" in d
                      else "") + ".")
    if "peer_check" in d:
        out.append(f"AdapterHub: {d.get('peer_backbone') or 'no row ran'}; zero-adapter sanity check "
                   f"{d['peer_check']}.")
        if d.get("peer_note"):
            out.append(f"AdapterHub note: {d['peer_note']}.")
        if d.get("peer_error"):
            out.append(f"AdapterHub error: {d['peer_error']}")
    for error in d["errors"]:
        out.append(f"FAILED {error}")
    if "wall_s" in result:
        out.append(f"Wall time for this shape: {result['wall_s'] / 60:.1f} min.")
    if "cores_after" in result:
        out.append(f"After this shape, {result['cores_after']['line']}.")
    return "\n".join(out)


def summary_table(results: list[dict]) -> str:
    """One row per shape: the ratios the issue asks for, each measured in the same run."""
    out = ["| shape | Pfeiffer samples/s | vs full FT | peak RSS Pfeiffer / full (MB) "
           "| AdapterDrop k=L/2 vs Pfeiffer (of limit) | 8-task forward vs 8 separate, k=0 "
           "| 8-task forward vs 8 separate, k=L/2 | AdapterHub Pfeiffer samples/s | mtl / AdapterHub |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for result in results:
        d = derive(result)
        rss = "-"
        if "pf_rss_mb" in d and "full_rss_mb" in d:
            rss = f"{d['pf_rss_mb']:.0f} / {d['full_rss_mb']:.0f} ({d['rss_ratio']:.2f}x)"
        elif "pf_rss_mb" in d:
            rss = f"{d['pf_rss_mb']:.0f} / -"
        drop = "-"
        if "ad_ratio" in d:
            drop = f"k={d['ad_k']}: {d['ad_ratio']:.2f}x of limit {d['ad_limit']:.2f}x ({d['ad_of_limit']:.0%})"
        mt = d.get("mt") or {}
        peer = num(d.get("peer_samples_s"))
        if "peer_check" not in d:
            peer = "not run"
        elif d.get("peer_note"):
            peer += f" [{len(notes) + 1}]"
            notes.append(f"[{len(notes) + 1}] {d['shape']}: {d['peer_note']}.")
        if d.get("peer_check") not in (None, "OK"):
            notes.append(f"{d['shape']}: AdapterHub's zero-adapter sanity check {d['peer_check']}.")
        if d["errors"]:
            notes.append(f"{d['shape']}: {len(d['errors'])} mtl measurement(s) failed (see its table).")
        out.append(f"| {d['shape']} | {num(d.get('pf_samples_s'))} | {x(d.get('pf_vs_full'))} | {rss} | {drop} "
                   f"| {mt_cell(mt.get('low'))} | {mt_cell(mt.get('high'))} | {peer} | {x(d.get('mtl_vs_peer'))} |")
    return "\n".join(out + ([""] + notes if notes else []))


# ---- estimate --------------------------------------------------------------------------------------------------


def cores_check(threads: int) -> dict:
    """Median time of a 512x768 @ 768x768 matmul on 1 thread and on ``threads``: on idle cores the speed-up is near
    the thread count; with another process busy on one of them it drops below 1 (OpenMP threads wait for each other)
    and every timing of the run is off, by 2-3x or more."""
    import os

    import torch

    a, w = torch.randn(512, 768), torch.randn(768, 768)

    def median(n: int) -> float:
        torch.set_num_threads(n)
        times = []
        for _ in range(30):
            start = time.perf_counter()
            a @ w
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    one, many = median(1), median(threads)
    torch.set_num_threads(threads)
    speedup = one / many
    busy = threads > 1 and speedup < 0.7 * min(threads, os.cpu_count() or 1)
    load = os.getloadavg()[0]
    line = (f"cores check: {threads}-thread matmul {speedup:.2f}x of 1 thread (load average {load:.1f}) "
            + ("[BUSY: other processes share these cores, every timing is off]" if busy else "[ok]"))
    return {"speedup": speedup, "threads": threads, "load_avg_1min": load, "busy": busy, "line": line}


def startup_s(python: Path, code: str) -> float:
    start = time.perf_counter()
    subprocess.run([str(python), "-c", code], capture_output=True)
    return time.perf_counter() - start


# the estimate's cost model, in forwards F of the whole backbone at the same batch (F = L x a 1-layer copy's forward)
FULL_STEP, PFEIFFER_STEP, BACKWARD = 3.6, 2.2, 1.1  # and AdamW over every parameter in full fine-tuning:
ADAMW_S_PER_PARAM = 4e-9  # full FT (with backbone dropout) ran 1.78x slower than Pfeiffer on MiniLM (RESULTS.md)


def calibrate(spec: str, args: argparse.Namespace) -> dict:
    """A 1-layer copy of the shape: forward time at the training and the inference batch (min of 3 after a warm-up),
    build time and parameters, extrapolated to the full depth L."""
    import torch

    import backbones

    torch.set_num_threads(args.threads)
    fields = backbones.load_shape(spec)[0]
    layers = backbones.build_config(fields).num_hidden_layers
    backbones.build_backbone(backbones.shrink(fields))  # imports the family's modules outside the timings
    start = time.perf_counter()
    model = backbones.build_backbone(spec, num_hidden_layers=1)
    build = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    per_layer = sum(p.numel() for n, p in model.named_parameters() if re.search(r"(^|\.)layers?\.0\.", n))
    forward = {}
    for batch in sorted({args.batch, args.infer_batch}):
        ids = backbones.random_ids(model.config, batch, args.seq)
        with torch.inference_mode():
            times = []
            for _ in range(4):
                start = time.perf_counter()
                model(input_ids=ids, attention_mask=torch.ones_like(ids))
                times.append(time.perf_counter() - start)
        forward[batch] = min(times[1:])
    total = params + (layers - 1) * per_layer
    return {"layers": layers, "params": total, "build_s": build * total / max(params, 1),
            "forward_s": {b: layers * t for b, t in forward.items()}}


def estimate_shape(cal: dict, args: argparse.Namespace, peers: bool, start_mtl: float, start_peer: float) -> float:
    """Seconds for one shape: process start-ups, builds, every training step (2 warm-up + measured) and forward."""
    L, build = cal["layers"], cal["build_s"]
    F, Fi = cal["forward_s"][args.batch], cal["forward_s"][args.infer_batch]
    n_steps = args.steps + 2
    k = L // 2
    mtl_proc = start_mtl + build
    seconds = mtl_proc + n_steps * (FULL_STEP * F + ADAMW_S_PER_PARAM * cal["params"])
    rounds = args.peer_rounds if peers else 1
    seconds += rounds * (mtl_proc + n_steps * PFEIFFER_STEP * F)
    if peers:
        seconds += start_peer + 2 * build  # sanity check: the adapter model and the bare one
        seconds += rounds * (start_peer + build + n_steps * PFEIFFER_STEP * F)
    seconds += mtl_proc + n_steps * (BACKWARD + BACKWARD * (L - k) / L) * F  # AdapterDrop k = L/2
    per_round = sum(TASKS * Fi + Fi * ((kk + 1) + TASKS * (L - kk - 1)) / L for kk in {0, k})
    seconds += mtl_proc + (args.repeats + 2) * per_round  # check + warm-up + repeats, at k = 0 and L/2
    return seconds


def print_estimate(specs: list[tuple[str, str]], args: argparse.Namespace, peers: bool) -> dict:
    log("estimating: one layer per shape on this machine now, and the start-up of each venv ...")
    start_mtl = startup_s(Path(sys.executable), "import torch, transformers, mtl.model")
    start_peer = startup_s(PEER_PYTHON, "import torch, transformers, adapters") if peers else 0.0
    per_shape, calibration = {}, {}
    for name, spec in specs:
        cal = calibration[name] = calibrate(spec, args)
        per_shape[name] = estimate_shape(cal, args, peers, start_mtl, start_peer)
        log(f"  {name}: L={cal['layers']}; forward {cal['forward_s'][args.batch]:.2f} s at batch {args.batch}, "
            f"{cal['forward_s'][args.infer_batch]:.2f} s at batch {args.infer_batch}; build {cal['build_s']:.1f} s "
            f"-> about {per_shape[name] / 60:.1f} min")
    total = sum(per_shape.values())
    print(f"Estimated duration: {total / 60:.1f} min for {len(specs)} shape(s) ("
          + ", ".join(f"{n} {s / 60:.1f}" for n, s in per_shape.items())
          + f"; process start-up {start_mtl:.1f} s mtl" + (f", {start_peer:.1f} s AdapterHub" if peers else "")
          + "). Calibrated now by a 1-layer copy of each shape's forward: expect +-30%; on a shared machine the "
            "load alone can change it 2-3x (rerun --estimate just before).", flush=True)
    return {"total_s": total, "per_shape_s": per_shape, "calibration": calibration, "startup_mtl_s": start_mtl,
            "startup_peer_s": start_peer}


# ---- main ------------------------------------------------------------------------------------------------------


def smoke_specs(names: list[str], folder: Path) -> list[tuple[str, str]]:
    """Each shape shrunk (2 layers, hidden 64, ...) and written as a JSON file, for --smoke."""
    import backbones

    specs = []
    for name in names:
        fields, notes = backbones.load_shape(name)
        path = folder / f"{notes['name']}-tiny.json"
        shrunk = backbones.shrink(fields)
        path.write_text(json.dumps({"_source": f"{notes['name']} shrunk by backbones.shrink", **shrunk}))
        specs.append((path.stem, str(path)))
    return specs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, metavar="NAME|FILE",
                        help=f"shapes of benchmarks/backbones/ or JSON files (default: {' '.join(DEFAULT_SHAPES)})")
    parser.add_argument("--steps", type=int, help="measured training steps after 2 warm-up (default 5; smoke 1)")
    parser.add_argument("--batch", type=int, help="training batch (default 8; smoke 2)")
    parser.add_argument("--seq", type=int, help="sequence length (default 128; smoke 16)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--infer-batch", type=int, help="batch of the multi-task forwards (default 4; smoke 2)")
    parser.add_argument("--repeats", type=int,
                        help="interleaved repeats of the multi-task timings (default 3; smoke 1)")
    parser.add_argument("--peer-rounds", type=int, help="alternating mtl / AdapterHub Pfeiffer rounds (default 3; "
                        "smoke 1)")
    parser.add_argument("--no-peers", action="store_true", help="skip AdapterHub even if its venv exists")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random backbones' weights")
    parser.add_argument("--out", type=Path, help="write every raw row as JSON here")
    parser.add_argument("--estimate", action="store_true", help="print the estimated duration and exit")
    parser.add_argument("--smoke", action="store_true", help="tiny shrunk shapes, 1 step: checks the plumbing")
    args = parser.parse_args(argv)
    defaults = {"steps": 5, "batch": 8, "seq": 128, "infer_batch": 4, "repeats": 3, "peer_rounds": 3}
    if args.smoke:
        defaults = {"steps": 1, "batch": 2, "seq": 16, "infer_batch": 2, "repeats": 1, "peer_rounds": 1}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    sys.path.insert(0, str(HERE))
    import backbones

    for spec in args.shapes:
        try:
            backbones.build_config(backbones.load_shape(spec)[0])
        except backbones.ShapeError as err:
            parser.error(str(err))
    peers = not args.no_peers and PEER_PYTHON.exists()
    if not args.no_peers and not peers:
        log(f"AdapterHub side by side skipped: no {PEER_PYTHON} (run benchmarks/peers/setup_adapterhub.sh)")
    tmp = tempfile.TemporaryDirectory(prefix="base_size_")
    if args.smoke:
        specs = smoke_specs(args.shapes, Path(tmp.name))
    else:
        specs = [(backbones.load_shape(s)[1]["name"], s) for s in args.shapes]
    settings = {k: getattr(args, k) for k in ("steps", "batch", "seq", "threads", "infer_batch", "repeats",
                                              "peer_rounds", "seed", "smoke")}
    settings["peer_rounds"] = settings["peer_rounds"] if peers else 0
    print(f"Settings: {json.dumps(settings)}; AdapterHub side by side: {'yes' if peers else 'no'}", flush=True)
    cores = cores_check(args.threads)
    print(cores["line"], flush=True)
    estimate = print_estimate(specs, args, peers)
    if args.estimate:
        return
    raw = {"settings": settings, "estimate": estimate, "cores_before": cores, "shapes": []}
    start = time.perf_counter()
    for name, spec in specs:
        log(f"{name} ({len(raw['shapes']) + 1}/{len(specs)}; {(time.perf_counter() - start) / 60:.1f} min so far)")
        raw["shapes"].append(measure_shape(name, spec, args, peers))
        raw["shapes"][-1]["cores_after"] = cores_check(args.threads)
        print("\n" + shape_table(raw["shapes"][-1], settings), flush=True)
        if args.out:
            args.out.write_text(json.dumps(raw, indent=1))
    raw["wall_s"] = time.perf_counter() - start
    print(f"\n### Summary ({settings['threads']} threads; training batch {settings['batch']}, seq {settings['seq']}; "
          f"inference batch {settings['infer_batch']}; random weights)\n")
    print(summary_table(raw["shapes"]))
    checks = [f"before the run {cores['speedup']:.2f}x"] + [
        f"after {r['shape']} {r['cores_after']['speedup']:.2f}x" for r in raw["shapes"] if "cores_after" in r]
    busy = cores["busy"] or any(r.get("cores_after", {}).get("busy") for r in raw["shapes"])
    print(f"\n{args.threads}-thread matmul speed-up over 1 thread: " + ", ".join(checks)
          + (" - BUSY cores: other processes shared them, so these timings are off; rerun on idle cores."
             if busy else " (idle cores)."))
    print(f"\nTotal wall time: {raw['wall_s'] / 60:.1f} min (estimated {estimate['total_s'] / 60:.1f} min).")
    if args.out:
        args.out.write_text(json.dumps(raw, indent=1))
        print(f"raw rows: {args.out}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
