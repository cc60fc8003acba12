"""Accuracy and end-to-end fit time vs AdapterDrop depth k on BBC News (quickstart settings).

Usage: python benchmarks/adapterdrop_accuracy.py

Each row runs ``train.py fit`` (configs/quickstart.yaml: Pfeiffer, 1,000 training articles, 3 epochs) and
``train.py test`` on the best checkpoint: fixed dropping at k = 0, 3, 5; k = 3 with the frozen-prefix cache
(float32 and bfloat16 storage); robust dropping, evaluated with k = 0 and k = 3. Outputs go to
checkpoints/bench-adapterdrop/.
"""

from __future__ import annotations

import sys

from cli_runs import ROOT, best_fit_metric, fit_and_test

OUT = ROOT / "checkpoints" / "bench-adapterdrop"
VARIANTS = [
    # name, fit arguments, test arguments
    ("k=0 (no dropping)", ["--model.adapter.drop_first", "0"], []),
    ("k=3 fixed", ["--model.adapter.drop_first", "3"], []),
    ("k=5 fixed", ["--model.adapter.drop_first", "5"], []),
    ("k=3 fixed + prefix cache (float32)", ["--model.adapter.drop_first", "3", "--model.cache_frozen_prefix", "true"],
     []),
    ("k=3 fixed + prefix cache (bfloat16)", ["--model.adapter.drop_first", "3", "--model.cache_frozen_prefix", "true",
                                             "--model.cache_dtype", "bfloat16"], []),
    ("robust, evaluated at k=0", ["--model.adapter.robust_drop", "true"], []),
    ("robust, evaluated at k=3", ["--model.adapter.robust_drop", "true"], ["--model.adapter.drop_first", "3"]),
]


def main() -> None:
    """Run every variant and print the table."""
    rows, fits = [], {}
    for name, fit_args, test_args in VARIANTS:
        key = tuple(fit_args)
        folder = OUT / f"run{len(fits) if key not in fits else fits[key][0]}"
        if key in fits:  # same training, other evaluation depth: test only
            metrics, wall = fit_and_test("configs/quickstart.yaml", folder, fit_args, test_args, test_only=True)
            wall = fits[key][1]
        else:
            metrics, wall = fit_and_test("configs/quickstart.yaml", folder, fit_args, test_args)
            fits[key] = (len(fits), wall)
        # validation ran inside the fit, at the fit's depth: a test-only row at another depth has none of its own
        val = None if test_args else best_fit_metric(folder, "val/bbc_news/acc")
        rows.append((name, val, metrics["test/bbc_news/acc"],
                     metrics["test/bbc_news/f1"], wall))
        print(f"  {name}: test acc {rows[-1][2]:.3f}, fit {wall:.0f} s", file=sys.stderr, flush=True)
    base = rows[0][4]
    print("\nBBC News, MiniLM-L6 + Pfeiffer, 1,000 train articles, 3 epochs, 2 threads; validation (212, best "
          "epoch) and test (212) splits\n")
    print("| variant | best val acc | test acc | test macro-F1 | fit wall time | vs k=0 |\n|---|---:|---:|---:|---:|---:|")
    for name, val, acc, f1, wall in rows:
        print(f"| {name} | {'-' if val is None else f'{val:.3f}'} | {acc:.3f} | {f1:.3f} | {wall:.0f} s | {base / wall:.2f}x |")


if __name__ == "__main__":
    main()
