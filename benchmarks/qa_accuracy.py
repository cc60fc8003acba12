"""Extractive QA on population_spans: mtl's adapter next to AdapterHub's own training of the same adapter and head, over
seeds.

Usage: python benchmarks/qa_accuracy.py [--seeds 0 1 2] [--systems mtl AdapterHub] [--epochs 3] [--lr 5e-3]

Needs ``python -m mtl.data.prepare population_spans`` once.
- mtl: ``train.py fit`` then ``train.py test`` with configs/qa.yaml (Pfeiffer r16 on MiniLM-L6, max_length 384,
  doc_stride 128, batch 16, best epoch by validation F1), per seed.
- AdapterHub: benchmarks/peers/adapterhub_qa_fit.py in the optional venv benchmarks/peers/.venv-adapterhub, on the
  rows mtl reads (written here to checkpoints/bench-qa/rows.json from ``load_task_dataset``), with the spec's windows
  and longest answer, the same lr, epochs, batch size, warm-up and precision rule; skipped with a note when that
  venv is missing.
Test exact match and F1 are SQuAD's (mtl.kinds.answer_match, used by both). Each run's result is kept in
checkpoints/bench-qa/results.json; the table shows every kept result and the fit wall times (the whole process but
its test).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess

from cli_runs import ROOT, fit_and_test, run_seeds

OUT = ROOT / "checkpoints" / "bench-qa"
PEER = ROOT / "benchmarks" / "peers" / ".venv-adapterhub" / "bin" / "python"
TASK = "population_spans"
SYSTEMS = ("mtl", "AdapterHub")


def run_mtl(seed: int, epochs: int, lr: float) -> tuple[dict[str, float], float]:
    """mtl's fit and test for one seed: test metrics and the fit's wall time."""
    metrics, wall = fit_and_test("configs/qa.yaml", OUT / f"mtl-{seed}",
                                 ["--seed_everything", str(seed), "--trainer.max_epochs", str(epochs),
                                  "--model.lr", str(lr), "--model.test_after_fit", "false"])
    return {k.rsplit("/", 1)[1]: v for k, v in metrics.items() if k.startswith(f"test/{TASK}/")}, wall


def write_rows() -> list[str]:
    """Write the rows mtl reads for the task, for the peer script; return the peer's window arguments (the spec's)."""
    from mtl.data.sources import load_task_dataset
    from mtl.data.spec import load_task_spec

    spec = load_task_spec(TASK, ROOT / "tasks")
    data = load_task_dataset(spec)
    rows = {split: [{"question": r["question"], "context": r["context"], "answers": r["label"]} for r in data[split]]
            for split in data}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "rows.json").write_text(json.dumps(rows))
    return ["--max-length", str(spec.max_length), "--doc-stride", str(spec.doc_stride),
            "--max-answer-length", str(spec.max_answer_length)]


def run_adapterhub(seed: int, epochs: int, lr: float) -> tuple[dict[str, float], float] | None:
    """AdapterHub's own training for one seed (None without its venv)."""
    if not PEER.exists():
        return None
    windows = write_rows()
    done = subprocess.run([str(PEER), "benchmarks/peers/adapterhub_qa_fit.py", "--rows", str(OUT / "rows.json"),
                           "--seed", str(seed), "--epochs", str(epochs), "--lr", str(lr), *windows], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"adapterhub_qa_fit.py failed:\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    return {"f1": row["test_f1"], "exact": row["test_exact"]}, row["total_s"] - row["phases"].get("test", 0.0)


def main() -> None:
    """Run every seed of the chosen systems, keep each result in ``OUT/results.json``, print the table of all kept."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=5e-3)
    args = parser.parse_args()
    store = OUT / "results.json"
    runners = {"mtl": lambda s: run_mtl(s, args.epochs, args.lr),
               "AdapterHub": lambda s: run_adapterhub(s, args.epochs, args.lr)}
    kept = run_seeds(store, args.seeds, args.systems, runners)
    print(f"\n{TASK}, MiniLM-L6 + Pfeiffer r16, lr {args.lr}, {args.epochs} epochs, batch 16 (from {store})\n")
    print("| system | test F1 per seed | median (min-max) | exact match (median) | fit wall s (median) |")
    print("|---|---|---:|---:|---:|")
    walls = {}
    for system in SYSTEMS:
        runs = [kept[system][s] for s in sorted(kept.get(system, {}), key=int)]
        if not runs:
            print(f"| {system} | not run | | | |")
            continue
        f1s = [r["metrics"]["f1"] for r in runs]
        walls[system] = statistics.median(r["wall_s"] for r in runs)
        print(f"| {system} | {' '.join(f'{v:.3f}' for v in f1s)} | {statistics.median(f1s):.3f} ({min(f1s):.3f}-"
              f"{max(f1s):.3f}) | {statistics.median(r['metrics']['exact'] for r in runs):.3f} | "
              f"{walls[system]:.0f} |")
    if len(walls) == 2:
        print(f"\nmtl's fit wall time / AdapterHub's (medians): {walls['mtl'] / walls['AdapterHub']:.2f}")


if __name__ == "__main__":
    main()
