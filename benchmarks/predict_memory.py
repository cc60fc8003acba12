"""Peak memory and speed of ``train.py predict`` on a 10k- and a 200k-line .txt: streaming keeps memory flat.

Usage: python benchmarks/predict_memory.py [--lines 10000 200000] [--backbone tiny|minilm-l6] [--baseline REV]

Each run is a fresh ``python train.py predict`` subprocess (two tasks with random adapters, every line answered for
both, output .jsonl). Peak RSS is that process's own ``ru_maxrss`` (``os.wait4``). ``tiny`` is a 2-layer, hidden-32
random BERT with the MiniLM tokenizer, so 200k lines finish in well under a minute on 2 cores (MiniLM-L6 itself would
take many minutes); the model is not what is measured, the input and output handling are. A 1-line run gives the
start-up time, subtracted for the steady texts/s. ``--baseline REV`` also runs the code of git revision REV
(extracted with ``git archive`` into a temporary folder) for a before / after table. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBJECTS = ["the council", "our team", "a local farmer", "the new museum", "her brother", "the airline", "students",
            "the central bank", "a small startup", "the orchestra", "fans", "the mayor", "scientists", "the club"]
VERBS = ["announced", "criticised", "opened", "delayed", "celebrated", "rejected", "reported", "launched",
         "questioned", "won", "lost", "cancelled", "praised", "reviewed"]
OBJECTS = ["a plan for the river park", "the final match", "record profits", "a late-night concert", "the new budget",
           "plans to cut fares", "a study on sleep", "the winter festival", "its first electric bus",
           "the league title", "an exhibition of old maps", "the school closures", "a deal with the union"]
TAILS = ["on Monday", "after a long debate", "despite the rain", "for the third year", "to mixed reviews",
         "in a short statement", "earlier than expected", "last night", "this week", ""]


def write_texts(path: Path, lines: int, seed: int = 0) -> None:
    """Short news-like sentences, one per line."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for i in range(lines):
            words = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(TAILS)]
            f.write(" ".join(w for w in words if w).capitalize() + f" ({i}).\n")


def build_run(folder: Path, backbone: str) -> str:
    """An exported run with two tasks (random adapters and heads); returns the backbone to pass to train.py."""
    import torch
    from transformers import BertConfig, BertModel

    from mtl import model_files
    from mtl.backbone import load_tokenizer
    from mtl.model import MTLModel

    if backbone == "tiny":
        torch.manual_seed(0)
        config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=128)
        BertModel(config, add_pooling_layer=False).save_pretrained(folder / "backbone")
        load_tokenizer("minilm-l6").save_pretrained(folder / "backbone")
        backbone = str(folder / "backbone")
    model = MTLModel(backbone)
    model.add_task("topic", 4, labels=["business", "politics", "sport", "culture"])
    model.add_task("tone", 2, labels=["negative", "positive"])
    with torch.no_grad():
        for task in model.tasks:
            for p in model.task_parameters(task).values():
                p.normal_(0, 0.2)
    for task in model.tasks:
        model_files.save_task(model, task, folder / "run" / "adapters")
    return backbone


def predict(code: Path, backbone: str, run: Path, texts: Path, out: Path) -> tuple[float, float, int]:
    """One ``train.py predict`` process: (wall seconds, peak RSS MiB, predictions written)."""
    args = [sys.executable, str(code / "train.py"), "predict", "--model.backbone", backbone, "--model.load_from",
            str(run), "--model.run_dir", str(run), "--data.tasks", "[]", "--data.predict_file", str(texts),
            "--data.cache_dir", str(run.parent / "cache"), "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.default_root_dir", str(run.parent), "--trainer.callbacks+=mtl.predict.PredictionWriter",
            f"--trainer.callbacks.output={out}", "--trainer.callbacks.overwrite=true"]
    log = out.with_suffix(".log")
    # the script's folder comes first on sys.path, so a baseline tree imports its own mtl, not the installed one
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "2"}
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(args, cwd=code, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak, not the max over every child so far
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"train.py predict failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    with out.open("rb") as f:
        rows = sum(1 for _ in f)
    return wall, usage.ru_maxrss / 1024, rows


def measure(code: Path, label: str, backbone: str, run: Path, folder: Path, lines: list[int]) -> list[str]:
    """Table rows for one code tree: start-up run, then every size."""
    imported = subprocess.run([sys.executable, "-c", "import mtl; print(mtl.__file__)"], cwd=code, check=True,
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(code)}).stdout
    assert Path(imported.strip()).is_relative_to(code), (imported, code)  # the tree measured is the tree named
    (folder / "one.txt").write_text("A single short line.\n")
    # start-up: the faster of two 1-line runs (the first one also warms the file cache)
    startup, base_rss = min(predict(code, backbone, run, folder / "one.txt", folder / "one.jsonl")[:2] for _ in "ab")
    rows, peaks = [f"| {label} | 1 (start-up) | {startup:.1f} | - | {base_rss:.0f} |"], {}
    for n in lines:
        wall, rss, written = predict(code, backbone, run, folder / f"{n}.txt", folder / f"out-{n}.jsonl")
        assert written == 2 * n, (written, n)
        peaks[n] = rss
        rate = f"{n / (wall - startup):,.0f}" if wall > startup + 1 else "-"  # within start-up noise: no rate
        rows.append(f"| {label} | {n:,} | {wall:.1f} | {rate} | {rss:.0f} |")
        (folder / f"out-{n}.jsonl").unlink()
    if len(lines) > 1:
        big, small = max(lines), min(lines)
        rows.append(f"| {label} | ratio {big // 1000}k / {small // 1000}k | | | {peaks[big] / peaks[small]:.2f} |")
    return rows


def main() -> None:
    """Build the run and the inputs, measure, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, nargs="+", default=[10_000, 200_000])
    parser.add_argument("--backbone", default="tiny", help="'tiny' (random, 2 layers) or a backbone name / folder")
    parser.add_argument("--baseline", help="also measure this git revision (e.g. HEAD~1) for comparison")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="predict-memory-") as tmp:
        folder = Path(tmp)
        backbone = build_run(folder, args.backbone)
        for n in args.lines:
            write_texts(folder / f"{n}.txt", n)
        trees = [(ROOT, "this tree")]
        if args.baseline:
            old = folder / "baseline"
            old.mkdir()
            archive = subprocess.run(["git", "archive", args.baseline], cwd=ROOT, check=True, capture_output=True)
            subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
            trees.append((old, f"`{args.baseline}`"))
        table = ["| code | lines | wall s | texts/s (after start-up) | peak RSS MiB |", "|---|---|---|---|---|"]
        for code, label in trees:
            table += measure(code, label, backbone, folder / "run", folder, args.lines)
    print(f"backbone: {args.backbone}; two tasks, every line answered for both; output .jsonl; eval_batch_size 64")
    print("\n".join(table))


if __name__ == "__main__":
    main()
