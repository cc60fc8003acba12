"""Extractive QA and multiple choice on real data: mtl's adapter next to AdapterHub's own training of the same adapter
and head, over seeds.

Usage: python benchmarks/kind_accuracy.py --task {population_spans,social_iqa} [--seeds 0 1 2]
           [--systems mtl AdapterHub] [--epochs N] [--lr LR]

Needs ``python -m mtl.data.prepare <task>`` once. Per task (defaults from its config):
- population_spans (extractive QA): configs/qa.yaml, Pfeiffer r16 on MiniLM-L6, 384-token windows 128 apart, batch
  16 windows; scored by SQuAD F1 and exact match (mtl.kinds.answer_match, used by both systems).
- social_iqa (multiple choice): configs/multiple_choice.yaml, Pfeiffer r16 on MiniLM-L6, a cls-pooled two-layer head
  scoring each (situation, question + choice) sequence, batch 16 questions; scored by accuracy.
- mtl: ``train.py fit`` then ``train.py test`` with the config, best epoch by the validation headline, per seed.
- AdapterHub: benchmarks/peers/adapterhub_{qa,mc}_fit.py in the optional venv benchmarks/peers/.venv-adapterhub, on
  the rows mtl reads (written to checkpoints/bench-<kind>/rows.json from ``load_task_dataset``), with the spec's
  lengths, the same lr, epochs, batch size, warm-up and precision rule; skipped with a note when that venv is missing.
Each run's result is kept in checkpoints/bench-<kind>/results.json; the table shows every kept result and the fit
wall times (the whole process but its test).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from dataclasses import dataclass

from cli_runs import ROOT, fit_and_test, run_seeds

PEER = ROOT / "benchmarks" / "peers" / ".venv-adapterhub" / "bin" / "python"
SYSTEMS = ("mtl", "AdapterHub")


@dataclass
class Bench:
    """One task's comparison: its config, output folder, peer script, defaults and scores."""

    config: str
    folder: str
    peer: str
    epochs: int
    lr: float
    headline: str  # the metric the table leads with (test split)
    other: str | None  # a second metric shown as its median


BENCHES = {
    "population_spans": Bench("configs/qa.yaml", "bench-qa", "adapterhub_qa_fit.py", 3, 5e-3, "f1", "exact"),
    "social_iqa": Bench("configs/multiple_choice.yaml", "bench-mc", "adapterhub_mc_fit.py", 5, 1e-3, "acc", None),
}


def run_mtl(task: str, bench: Bench, seed: int, epochs: int, lr: float) -> tuple[dict[str, float], float]:
    """mtl's fit and test for one seed: test metrics and the fit's wall time."""
    metrics, wall = fit_and_test(bench.config, ROOT / "checkpoints" / bench.folder / f"mtl-{seed}",
                                 ["--seed_everything", str(seed), "--trainer.max_epochs", str(epochs),
                                  "--model.lr", str(lr), "--model.test_after_fit", "false"])
    return {k.rsplit("/", 1)[1]: v for k, v in metrics.items() if k.startswith(f"test/{task}/")}, wall


def write_rows(task: str, bench: Bench) -> list[str]:
    """Write the rows mtl reads for the task, for the peer script; return the peer's length arguments (the spec's)."""
    from mtl.data.sources import load_task_dataset
    from mtl.data.spec import load_task_spec

    spec = load_task_spec(task, ROOT / "tasks")
    data = load_task_dataset(spec)
    rows = {split: [{k: r[k] for k in spec.text_fields} | {"answers" if spec.problem == "extractive_qa" else "label":
                                                            r["label"]} for r in data[split]] for split in data}
    out = ROOT / "checkpoints" / bench.folder
    out.mkdir(parents=True, exist_ok=True)
    (out / "rows.json").write_text(json.dumps(rows))
    if spec.problem == "extractive_qa":
        return ["--max-length", str(spec.max_length), "--doc-stride", str(spec.doc_stride),
                "--max-answer-length", str(spec.max_answer_length)]
    return ["--max-length", str(spec.max_length)]


def run_adapterhub(task: str, bench: Bench, seed: int, epochs: int, lr: float) -> tuple[dict[str, float], float] | None:
    """AdapterHub's own training for one seed (None without its venv)."""
    if not PEER.exists():
        return None
    lengths = write_rows(task, bench)
    done = subprocess.run([str(PEER), f"benchmarks/peers/{bench.peer}", "--rows",
                           str(ROOT / "checkpoints" / bench.folder / "rows.json"), "--task", task, "--seed", str(seed),
                           "--epochs", str(epochs), "--lr", str(lr), *lengths], cwd=ROOT, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{bench.peer} failed:\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    metrics = {name: row[f"test_{name}"] for name in (bench.headline, bench.other) if name}
    return metrics, row["total_s"] - row["phases"].get("test", 0.0)


def main() -> None:
    """Run every seed of the chosen systems, keep each result in ``results.json``, print the table of all kept."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(BENCHES), required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--epochs", type=int, help="default: the task's (its config's max_epochs)")
    parser.add_argument("--lr", type=float, help="default: the task's (its config's)")
    args = parser.parse_args()
    task, bench = args.task, BENCHES[args.task]
    epochs, lr = args.epochs or bench.epochs, args.lr or bench.lr
    store = ROOT / "checkpoints" / bench.folder / "results.json"
    runners = {"mtl": lambda s: run_mtl(task, bench, s, epochs, lr),
               "AdapterHub": lambda s: run_adapterhub(task, bench, s, epochs, lr)}
    kept = run_seeds(store, args.seeds, args.systems, runners)
    print(f"\n{task}, MiniLM-L6 + Pfeiffer r16, lr {lr}, {epochs} epochs, batch 16 (from {store})\n")
    other = f" {bench.other} (median) |" if bench.other else ""
    print(f"| system | test {bench.headline} per seed | median (min-max) |{other} fit wall s (median) |")
    print("|---|---|---:|" + ("---:|" if bench.other else "") + "---:|")
    walls = {}
    for system in SYSTEMS:
        runs = [kept[system][s] for s in sorted(kept.get(system, {}), key=int)]
        if not runs:
            print(f"| {system} | not run | |{' |' if bench.other else ''} |")
            continue
        values = [r["metrics"][bench.headline] for r in runs]
        walls[system] = statistics.median(r["wall_s"] for r in runs)
        second = f" {statistics.median(r['metrics'][bench.other] for r in runs):.3f} |" if bench.other else ""
        print(f"| {system} | {' '.join(f'{v:.3f}' for v in values)} | {statistics.median(values):.3f} "
              f"({min(values):.3f}-{max(values):.3f}) |{second} {walls[system]:.0f} |")
    if len(walls) == 2:
        print(f"\nmtl's fit wall time / AdapterHub's (medians): {walls['mtl'] / walls['AdapterHub']:.2f}")


if __name__ == "__main__":
    main()
