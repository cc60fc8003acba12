"""Named entities on CoNLL-2003: mtl's adapter next to AdapterHub's own training of the same adapter and head, and
next to a linear probe on the frozen backbone, over seeds.

Usage: python benchmarks/tagging_accuracy.py [--seeds 0 1 2] [--systems mtl AdapterHub "linear probe"] [--epochs 8]

- mtl: ``train.py fit`` then ``train.py test`` with configs/tagging.yaml (Pfeiffer, reduction 16, MiniLM-L6, the
  task spec's 3,000 / 1,000 / 1,000 sentence subsample, best epoch by validation entity F1), per seed.
- AdapterHub: benchmarks/peers/adapterhub_tagging_fit.py in the optional venv benchmarks/peers/.venv-adapterhub (see
  benchmarks/peers/README.md) with the same rows, lr, epochs, batch size, warm-up and precision rule (bf16 autocast
  where the CPU computes bf16 natively, its faster choice here); skipped with a note when that venv is missing.
- Linear probe: the frozen backbone's last hidden state at each word's first subword, one linear layer trained with
  AdamW on those vectors (computed once), best epoch by validation entity F1; no adapter.

Test entity F1 is conlleval's (micro over entities, mtl.kinds.entities), on whole sentences. Each run's result is kept
in checkpoints/bench-tagging/results.json (a rerun of a system and seed replaces it); the table shows every kept
result: each seed, the median and the spread, and the wall time of each fit: the whole process but its test (start, loading,
tokenising, training, validation, export) for both mtl (``train.py fit --model.test_after_fit false``) and
AdapterHub; the probe's includes computing its features. Outputs go to checkpoints/bench-tagging/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

from cli_runs import ROOT, fit_and_test, run_seeds

OUT = ROOT / "checkpoints" / "bench-tagging"
PEER = ROOT / "benchmarks" / "peers" / ".venv-adapterhub" / "bin" / "python"
TASK = "conll2003_ner"
SYSTEMS = ("mtl", "AdapterHub", "linear probe")


def run_mtl(seed: int, epochs: int, lr: float) -> tuple[dict[str, float], float]:
    """mtl's fit and test for one seed: test metrics and the fit's wall time."""
    metrics, wall = fit_and_test("configs/tagging.yaml", OUT / f"mtl-{seed}",
                                 ["--seed_everything", str(seed), "--trainer.max_epochs", str(epochs),
                                  "--model.lr", str(lr), "--model.test_after_fit", "false"])
    return {k.rsplit("/", 1)[1]: v for k, v in metrics.items() if k.startswith(f"test/{TASK}/")}, wall


def run_adapterhub(seed: int, epochs: int, lr: float) -> tuple[dict[str, float], float] | None:
    """AdapterHub's own training for one seed (None without its venv)."""
    if not PEER.exists():
        return None
    # its default precision rule is mtl's (bf16 autocast where the CPU computes bf16): 10 steps took 3.9 s against
    # 5.7 s in fp32 on these CPUs
    done = subprocess.run([str(PEER), "benchmarks/peers/adapterhub_tagging_fit.py", "--seed", str(seed),
                           "--epochs", str(epochs), "--lr", str(lr)], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"adapterhub_tagging_fit.py failed:\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    metrics = {k: row[f"test_{k}"] for k in ("f1", "precision", "recall", "acc")}
    return metrics, row["total_s"] - row["phases"].get("test", 0.0)  # the whole run but its test, as mtl's fit


def run_probe(seed: int, epochs: int, lr: float) -> tuple[dict[str, float], float]:
    """A linear layer on the frozen backbone's features of each word's first subword (computed once)."""
    import torch

    from mtl.data.module import TaskDataModule
    from mtl.kinds.base import IGNORE
    from mtl.kinds.tag_scores import TagScores
    from mtl.model import MTLModel

    torch.manual_seed(seed)
    start = time.perf_counter()
    data = TaskDataModule([TASK], tasks_dir=str(ROOT / "tasks"), batch_size=32, eval_batch_size=64)
    labels = data.specs[TASK].labels
    model = MTLModel("minilm-l6").eval()

    def features(split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        vectors, tags, examples, words = [], [], [], []
        for batch in data._eval_loaders(split)[0]:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                hidden = model.encode(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                                      [(None, slice(None))])
            keep = batch["labels"] != IGNORE
            vectors.append(hidden.float()[keep])
            tags.append(batch["labels"][keep])
            examples.append(batch["example"].unsqueeze(1).expand_as(keep)[keep])
            words.append(batch["word_ids"][keep])
        return torch.cat(vectors), torch.cat(tags), torch.cat(examples), torch.cat(words)

    splits = {split: features(split) for split in ("train", "validation", "test")}
    head = torch.nn.Linear(model.hidden_size, len(labels))
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr)
    x, y = splits["train"][:2]

    def f1(split: str) -> dict[str, float]:
        vectors, tags, examples, words = splits[split]
        with torch.no_grad():
            pred = head(vectors).argmax(-1)
        out = {}
        for name in ("f1", "precision", "recall", "acc"):
            metric = TagScores(name, labels)
            metric.update(pred.unsqueeze(1), tags.unsqueeze(1), examples, words.unsqueeze(1))
            out[name] = float(metric.compute())
        return out

    best, best_state = -1.0, None
    for _ in range(epochs):
        for rows in torch.randperm(len(x)).split(32 * 14):  # about 14 words per sentence: batches of ~32 sentences
            loss = torch.nn.functional.cross_entropy(head(x[rows]), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        score = f1("validation")["f1"]
        if score > best:
            best, best_state = score, {k: v.clone() for k, v in head.state_dict().items()}
    head.load_state_dict(best_state)
    return f1("test"), time.perf_counter() - start


def main() -> None:
    """Run every seed of the chosen systems, keep each result in ``OUT/results.json``, print the table of all kept."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--probe-epochs", type=int, default=30)
    parser.add_argument("--probe-lr", type=float, default=1e-2)
    args = parser.parse_args()
    store = OUT / "results.json"
    runners = {"mtl": lambda s: run_mtl(s, args.epochs, args.lr),
               "AdapterHub": lambda s: run_adapterhub(s, args.epochs, args.lr),
               "linear probe": lambda s: run_probe(s, args.probe_epochs, args.probe_lr)}
    kept = run_seeds(store, args.seeds, args.systems, runners)
    print(f"\nCoNLL-2003 NER, MiniLM-L6, 3,000 train sentences, test 1,000; adapters: Pfeiffer r16, lr {args.lr}, "
          f"{args.epochs} epochs, batch 32; probe: lr {args.probe_lr}, {args.probe_epochs} epochs (from {store})\n")
    print("| system | test entity F1 per seed | median (min-max) | precision | recall | word acc | fit wall s (median) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    walls = {}
    for system in SYSTEMS:
        runs = [kept[system][s] for s in sorted(kept.get(system, {}), key=int)]
        if not runs:
            print(f"| {system} | not run | | | | | |")
            continue
        f1s = [r["metrics"]["f1"] for r in runs]
        med = {k: statistics.median(r["metrics"][k] for r in runs) for k in ("precision", "recall", "acc")}
        walls[system] = statistics.median(r["wall_s"] for r in runs)
        print(f"| {system} | {' '.join(f'{v:.3f}' for v in f1s)} | {statistics.median(f1s):.3f} ({min(f1s):.3f}-"
              f"{max(f1s):.3f}) | {med['precision']:.3f} | {med['recall']:.3f} | {med['acc']:.3f} | "
              f"{walls[system]:.0f} |")
    if "mtl" in walls and "AdapterHub" in walls:
        print(f"\nmtl's fit wall time / AdapterHub's (medians): {walls['mtl'] / walls['AdapterHub']:.2f}")


if __name__ == "__main__":
    main()
