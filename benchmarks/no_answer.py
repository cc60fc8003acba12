"""Unanswerable questions: what answering "no answer" with the threshold chosen on validation is worth, over seeds.

Usage: python benchmarks/no_answer.py [--seeds 0 1 2] [--epochs N] [--rescore: score the kept fits again]

Needs ``python -m mtl.data.prepare conll2003_entity_qa`` once (tasks/conll2003_entity_qa.yaml: entity questions
about Reuters sentences, derived from CoNLL-2003; about 70% have no answer). Per seed: ``train.py fit --config
configs/entity_qa.yaml`` (the best epoch by validation F1, whose validation chose the threshold), then the exported
adapter answers the test split three ways, each scored with SQuAD's F1 (`mtl.kinds.answer_match`):
- "chosen": as the task says (no_answer: true, the threshold its validation chose): what test, predict and serve do;
- "threshold 0": "no answer" wherever [CLS]'s null score beats the best span at all (a common fixed default);
- "span only": the same model with ``no_answer`` off: always its best span (how a SQuAD 1.1 reader answers).
Columns: F1 over all questions, F1 over the answerable ones (HasAns), the share of unanswerable ones answered "no
answer" (NoAns). Results are kept in checkpoints/bench-entity-qa/results.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from typing import Any

from cli_runs import ROOT, fit_and_test

TASK = "conll2003_entity_qa"
STORE = ROOT / "checkpoints" / "bench-entity-qa" / "results.json"
WAYS = ("chosen", "threshold 0", "span only")


def answered(run_dir: Any) -> dict[str, dict[str, float]]:
    """`scores` of the exported task's answers to the test split, each of `WAYS` (one model, one data module)."""
    import lightning as L

    from mtl.data.module import TaskDataModule
    from mtl.data.sources import load_task_dataset
    from mtl.data.spec import load_task_spec
    from mtl.kinds.answer_match import THRESHOLD_KEY
    from mtl.lit import AdapterTrainer
    from mtl.precision import auto_precision

    test = load_task_dataset(load_task_spec(TASK, ROOT / "tasks"))["test"]
    out = {}
    with tempfile.TemporaryDirectory() as scratch:
        module = AdapterTrainer([], eval_tasks=[TASK], load_from=str(run_dir), run_dir=scratch, export=False,
                                tasks_dir=str(ROOT / "tasks"))
        data = TaskDataModule([], eval_tasks=[TASK], predict_split="test", tasks_dir=str(ROOT / "tasks"))
        # the precision train.py picks, so that "chosen" answers as train.py test scored
        trainer = L.Trainer(precision=auto_precision()[0], logger=False, enable_progress_bar=False,
                            enable_model_summary=False)
        spec = module.model.records[TASK].spec  # the answers read it: each way changes it after the one before
        for way in WAYS:
            if way == "threshold 0":
                spec[THRESHOLD_KEY] = 0.0
            elif way == "span only":
                spec["no_answer"] = False
            rows = [row for batch in trainer.predict(module, datamodule=data) for row in batch]
            out[way] = scores(rows, [[a["text"] for a in test[row["index"]]["label"]] for row in rows])
    return out


def scores(rows: list[dict[str, Any]], golds: list[list[str]]) -> dict[str, float]:
    """F1 over all questions, over the answerable ones, and the unanswerable ones' share answered "no answer"."""
    from mtl.kinds.answer_match import f1_score

    f1 = [f1_score(r["label"], g) for r, g in zip(rows, golds)]
    has = [v for v, g in zip(f1, golds) if g]
    empty = [r["label"] == "" for r, g in zip(rows, golds) if not g]
    return {"f1": sum(f1) / len(f1), "has_f1": sum(has) / len(has), "no_acc": sum(empty) / len(empty)}


def main() -> None:
    """Fit and score every seed, keep the results, print the table of all kept."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rescore", action="store_true", help="score the kept fits again without fitting")
    args = parser.parse_args()
    kept = json.loads(STORE.read_text()) if STORE.exists() else {}
    for seed in args.seeds:
        run_dir = STORE.parent / f"mtl-{seed}"
        if args.rescore:
            wall, test_f1 = kept[str(seed)]["wall_s"], kept[str(seed)]["test_f1"]
        else:
            metrics, wall = fit_and_test("configs/entity_qa.yaml", run_dir,
                                         ["--seed_everything", str(seed), "--trainer.max_epochs", str(args.epochs),
                                          "--model.test_after_fit", "false"])
            test_f1 = metrics[f"test/{TASK}/f1"]
        spec = json.loads((run_dir / "adapters" / TASK / "adapter_config.json").read_text())["task_spec"]
        result = {"wall_s": wall, "threshold": spec["no_answer_threshold"], "test_f1": test_f1,
                  **answered(run_dir)}
        kept[str(seed)] = result
        STORE.parent.mkdir(parents=True, exist_ok=True)
        STORE.write_text(json.dumps(kept, indent=1))
        print(f"  seed {seed}: {result}", file=sys.stderr, flush=True)
    runs = [kept[s] for s in sorted(kept, key=int)]
    print(f"\n{TASK}, MiniLM-L6 + Pfeiffer r16, {args.epochs} epochs, test split (seeds {sorted(kept, key=int)}; "
          f"from {STORE})\n")
    print("| answered | F1 per seed | F1 median | HasAns F1 median | NoAns answered empty, median |")
    print("|---|---|---:|---:|---:|")
    for way in WAYS:
        values = [r[way]["f1"] for r in runs]
        print(f"| {way} | {' '.join(f'{v:.3f}' for v in values)} | {statistics.median(values):.3f} | "
              f"{statistics.median(r[way]['has_f1'] for r in runs):.3f} | "
              f"{statistics.median(r[way]['no_acc'] for r in runs):.3f} |")
    thresholds = " ".join(f"{r['threshold']:.2f}" for r in runs)
    tested = " ".join(f"{r['test_f1']:.3f}" for r in runs)
    print(f"\nthresholds chosen on validation: {thresholds}; train.py test F1 (chosen): {tested}; fit wall s median "
          f"{statistics.median(r['wall_s'] for r in runs):.0f}")


if __name__ == "__main__":
    main()
