"""A whole ``fit`` as the user waits for it: mtl's ``train.py fit`` (and its test of the best checkpoint) against
AdapterHub's own training loop, on the same texts and the same budget, each run in a fresh process.

    .venv/bin/python benchmarks/fit_wall.py [--tasks bbc_news tweet_sentiment language_id] [--rounds 3]
        [--variant NAME="MTL ARGS" ...] [--peer-variant NAME="PEER ARGS" ...] [--mtl-args "ARGS"]
        [--mtl-separate-test] [--sizes TASK=TRAIN/VAL/TEST ...] [--epochs 3] [--threads 2]
        [--work-dir DIR] [--out fit_wall.json] [--smoke]

1. Data. For every task, ONE fixed split is materialised from mtl's own pipeline (``load_task_dataset`` on the task
   YAML: its source, de-duplication and seeded stratified split), subsampled per split to fixed sizes with mtl's own
   seeded stratified subsample (``stratified_order``, seed = the spec's split seed + 1, as the spec's
   ``max_*_examples`` caps use), and written to ``WORK/data/TASK/{train,validation,test}.csv`` (``text,label``, label
   by name) with a task YAML ``TASK.yaml`` whose source is ``type: files`` pointing at them (same labels, max_length,
   metrics), and ``meta.json`` for the peer. mtl reads these back exactly (checked before any run), and the peer reads
   the same CSVs, so both systems see identical texts. Sizes (train / validation / test): bbc_news 1000 / 212 / 212
   (exactly the quickstart's data: its 1,000-example cap and the whole 212-example splits), tweet_sentiment
   1500 / 500 / 1000, language_id 2000 / 500 / 585 (its whole test split). BBC News is the quickstart (2 min 42 s in
   fp32 on 2 cores, 128,000 training tokens per epoch); the other two are sized to keep one fit near 1-2 minutes: per
   epoch the peer's shuffled batches run about 85,000 (tweets) and 64,000 (language ID) tokens with their padding,
   mtl's length-grouped batches about 50,000 and 29,000. ``--smoke``: 64 / 32 / 32, 1 epoch, 1 round.
2. Runs. Per task, ``--rounds`` rounds; each round runs every system once, each in a fresh process, in an order
   rotated by one every round:
   - mtl, once per ``--variant``: ``python benchmarks/fit_phases.py fit --config configs/quickstart.yaml`` with the
     task, its tasks_dir, batch 32, ``--epochs``, lr 1e-3, warm-up 0.1, seed = the round number (the peer too, so
     the rounds give the seed spread), a fresh run folder and a fresh tokenisation cache (``--mtl-warm-cache`` shares one per task and variant instead), plus the variant's
     arguments and ``--mtl-args``. ``benchmarks/fit_phases.py`` is ``train.py`` plus phase timestamps (a Lightning
     callback and wrapped data / checkpoint / export calls; mtl's files are not touched). If the fit's metrics hold
     no test scores (a ``train.py fit`` that does not test its best checkpoint itself), a second process runs
     ``test --ckpt_path <best.ckpt>`` with the same arguments, and the row's time is the sum of both;
     ``--mtl-separate-test`` forces that two-process way (passing ``--model.test_after_fit false`` to fit where mtl
     has that option).
   - AdapterHub, once per ``--peer-variant``: ``benchmarks/peers/adapterhub_fit.py`` in
     ``benchmarks/peers/.venv-adapterhub`` (skipped, with a line, when that venv is missing).
   Each process's wall time is taken from outside (``time.perf_counter`` around ``subprocess.run``); the launch time
   (``time.time()``) is passed in ``FIT_WALL_LAUNCH`` so the in-process phase stamps count from it. ``OMP_NUM_THREADS``
   / ``MKL_NUM_THREADS`` are set to ``--threads`` for both systems (0: left as they are) and the peer calls
   ``torch.set_num_threads`` with it.
3. Output. Per task a table: system / variant, rounds, median wall s, ratio to the median of the first peer variant,
   test accuracy and macro-F1 (medians; a range when the rounds differ), and the median phase split: start-up
   (launch to training, less data: interpreter, imports, configuration, backbone, Trainer), data (reading, splitting,
   tokenising), train, validation (mtl's sanity check included), test, export (mtl: checkpoint writes and the
   adapter export; AdapterHub: keeping the best epoch's tensors and ``save_adapter``) and other (the rest of the wall
   time: printing, loading the checkpoint for test, process exit). Raw rows go to ``--out`` (JSON), logs of every
   process to ``WORK/logs``.

Default variants: ``default`` (no extra arguments: what a user gets, e.g. bf16 autocast on a CPU with AVX512-BF16),
``fp32`` (``--trainer.precision 32-true``: the peer's precision) and ``peer-like`` (fp32, backbone dropout on, plain
shuffled batches: the peer's arithmetic choices, so the rest is the frameworks' own cost). Default peer variant:
``default`` (backbone dropout on, as AdapterHub users run it); ``--peer-variant default= --peer-variant
nodrop=--no-backbone-dropout`` adds mtl's default dropout setting (a given --variant / --peer-variant list replaces
that side's defaults).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PEER_PYTHON = ROOT / "benchmarks" / "peers" / ".venv-adapterhub" / "bin" / "python"
PEER_SCRIPT = ROOT / "benchmarks" / "peers" / "adapterhub_fit.py"
WRAPPER = ROOT / "benchmarks" / "fit_phases.py"
CONFIG = "configs/quickstart.yaml"
TASKS = ["bbc_news", "tweet_sentiment", "language_id"]
SPLITS = ("train", "validation", "test")
SIZES = {"bbc_news": (1000, 212, 212), "tweet_sentiment": (1500, 500, 1000), "language_id": (2000, 500, 585)}
SMOKE_SIZES = (64, 32, 32)
VARIANTS = {
    "default": "",
    "fp32": "--trainer.precision 32-true",
    "peer-like": "--trainer.precision 32-true --model.backbone_dropout true --data.group_by_length false",
}
PEER_VARIANTS = {"default": ""}
PHASES = ("startup", "data", "train", "validation", "test", "export", "other")
MTL, PEER = "mtl", "adapterhub"


# ---- 1. one fixed split per task -------------------------------------------------------------------------------------
def subsample(labels: list[Any], n: int, seed: int) -> list[int]:
    """Rows kept when a split of these labels is cut to ``n``: mtl's seeded stratified subsample (sorted), or every
    row when the split has no more than ``n``."""
    from mtl.data.sources import stratified_order

    if len(labels) <= n:
        return list(range(len(labels)))
    return sorted(stratified_order(labels, seed)[:n])


def materialise(task: str, sizes: tuple[int, int, int], out_dir: Path, tasks_dir: Path = ROOT / "tasks") -> dict:
    """Write ``task``'s fixed split into ``out_dir`` (CSVs, ``TASK.yaml`` with a files source, ``meta.json``) and
    return the meta. The same task, sizes and data give byte-identical files; a split smaller than its size is
    refused (one line)."""
    import yaml

    from mtl.data.sources import load_task_dataset
    from mtl.data.spec import load_task_spec

    spec = load_task_spec(task, tasks_dir)
    if spec.problem != "classification" or len(spec.text_fields) != 1:
        raise SystemExit(f"{spec.spec_file}: fit_wall needs a single-text classification task")
    data = load_task_dataset(spec, limit=False)  # mtl's read, dedup and seeded stratified split, before any cap
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, n in zip(SPLITS, sizes):
        rows = data[split]
        if len(rows) < n:
            raise SystemExit(f"{task}: the {split} split has {len(rows)} examples, fewer than the {n} asked for "
                             "(--sizes)")
        labels = rows["label"]
        keep = subsample(labels, n, spec.split.seed + 1)
        texts = rows[spec.text_fields[0]]
        pairs = [(texts[i], spec.labels[labels[i]]) for i in keep]
        with (out_dir / f"{split}.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, quoting=csv.QUOTE_ALL, lineterminator="\n")
            writer.writerow(["text", "label"])
            writer.writerows(pairs)
        written[split] = len(pairs)
    task_yaml = {
        "source": {"type": "files", "train": "train.csv", "validation": "validation.csv", "test": "test.csv"},
        "text_fields": ["text"], "label_field": "label", "labels": list(spec.labels), "problem": spec.problem,
        "metrics": list(spec.metrics), "max_length": spec.max_length,
        "notes": f"fit_wall.py: a fixed split of {spec.spec_file} ({written['train']} / {written['validation']} / "
                 f"{written['test']}, mtl's seeded stratified subsample of each split)",
    }
    (out_dir / f"{task}.yaml").write_text(yaml.safe_dump(task_yaml, sort_keys=False, allow_unicode=True),
                                          encoding="utf-8")
    meta = {"task": task, "labels": list(spec.labels), "max_length": spec.max_length, "sizes": written,
            "source": str(spec.spec_file)}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return meta


def read_csv_split(path: Path) -> tuple[list[str], list[str]]:
    """(texts, label names) of a materialised CSV, read the way the peer reads it."""
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [r["label"] for r in rows]


def check_readback(task: str, out_dir: Path) -> None:
    """mtl's reader on the materialised task YAML must give exactly the CSVs' texts and labels (the peer's view)."""
    from mtl.data.sources import load_task_dataset
    from mtl.data.spec import load_task_spec

    spec = load_task_spec(out_dir / f"{task}.yaml")
    data = load_task_dataset(spec)
    for split in SPLITS:
        texts, labels = read_csv_split(out_dir / f"{split}.csv")
        mtl_labels = [spec.labels[i] for i in data[split]["label"]]
        if data[split]["text"] != texts or mtl_labels != labels:
            raise SystemExit(f"{out_dir / split}.csv: mtl reads other texts or labels than the CSV holds")


# ---- 2. runs ---------------------------------------------------------------------------------------------------------
def parse_variants(given: list[str] | None, defaults: dict[str, str], flag: str) -> dict[str, str]:
    """``NAME=ARGS`` strings -> {name: args}, in order (``defaults`` when none are given)."""
    if not given:
        return dict(defaults)
    out = {}
    for item in given:
        name, sep, args = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name) or name in out:
            raise SystemExit(f"{flag} {item!r}: expected NAME=ARGS with a new name of letters, digits, _ . + -")
        out[name] = args
    return out


def parse_sizes(given: list[str] | None, tasks: list[str], smoke: bool) -> dict[str, tuple[int, int, int]]:
    sizes = {t: SMOKE_SIZES if smoke else SIZES.get(t) for t in tasks}
    for item in given or []:
        match = re.fullmatch(r"([A-Za-z0-9_-]+)=(\d+)/(\d+)/(\d+)", item)
        if not match:
            raise SystemExit(f"--sizes {item!r}: expected TASK=TRAIN/VAL/TEST, e.g. tweet_sentiment=2000/500/1000")
        sizes[match[1]] = (int(match[2]), int(match[3]), int(match[4]))
    missing = [t for t in tasks if sizes.get(t) is None]
    if missing:
        raise SystemExit(f"--sizes: no sizes for {missing}, expected TASK=TRAIN/VAL/TEST for each")
    return sizes


def child_env(launch: float, threads: int, phases_file: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "FIT_WALL_LAUNCH": repr(launch), "HF_HUB_OFFLINE": "1"}
    if threads > 0:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    if phases_file is not None:
        env["FIT_PHASES_OUT"] = str(phases_file)
    return env


def timed_run(cmd: list[str], log: Path, threads: int, phases_file: Path | None = None) -> tuple[int, float, float]:
    """Run ``cmd`` from the repository root, stdout + stderr into ``log``; (return code, wall s, launch time)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w", encoding="utf-8") as out:
        out.write("$ " + shlex.join(cmd) + "\n")
        out.flush()
        launch = time.time()
        env = child_env(launch, threads, phases_file)
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        wall = time.perf_counter() - start
    return done.returncode, wall, launch


def logged_test_scores(run_dir: Path, task: str) -> dict[str, float]:
    """The last ``test/TASK/acc`` and ``test/TASK/f1`` in the run's Lightning CSV logs (empty: none logged)."""
    scores: dict[str, float] = {}
    for path in sorted((run_dir / "lightning" / "logs").glob("version_*/metrics.csv"),
                       key=lambda p: int(p.parent.name.split("_")[1])):
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                for metric in ("acc", "f1"):
                    value = row.get(f"test/{task}/{metric}")
                    if value:
                        scores[metric] = float(value)
    return scores


def summary_test_scores(output: str, task: str) -> dict[str, float]:
    """Test scores from fit's summary line (``... test (best checkpoint, 5 s): TASK acc 0.981 f1 0.982; ...``), for a
    fit that tests without logging them; empty when there is none."""
    match = re.search(rf"test \([^)]*\): (?:[^;]*?, )?{re.escape(task)} acc ([0-9.]+) f1 ([0-9.]+)", output)
    return {"acc": float(match[1]), "f1": float(match[2])} if match else {}


def log_tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def mtl_has_test_after_fit() -> bool:
    """Whether this mtl's AdapterTrainer has the ``test_after_fit`` option (fit then tests its best checkpoint)."""
    import inspect

    from mtl.lit import AdapterTrainer

    return "test_after_fit" in inspect.signature(AdapterTrainer.__init__).parameters


def run_mtl(task: str, data_dir: Path, variant: str, args_text: str, run_dir: Path, log_dir: Path, opts: Any,
            cache_dir: Path, seed: int = 0) -> dict[str, Any]:
    """One mtl fit (+ its test) in fresh processes: a row with wall time, phases and test scores."""
    from fit_phases import phases

    common = ["--config", CONFIG, "--data.tasks", f"[{task}]", "--data.tasks_dir", str(data_dir),
              "--model.run_dir", str(run_dir), "--data.cache_dir", str(cache_dir),
              "--data.batch_size", str(opts.batch), "--trainer.max_epochs", str(opts.epochs), "--model.lr", "0.001",
              "--model.warmup_ratio", "0.1", "--seed_everything", str(seed), "--trainer.callbacks+=fit_phases.PhaseTimer",
              *shlex.split(args_text), *shlex.split(opts.mtl_args or "")]
    fit_cmd = [sys.executable, str(WRAPPER), "fit", *common]
    if opts.mtl_separate_test and opts.test_after_fit_option:
        fit_cmd += ["--model.test_after_fit", "false"]
    row: dict[str, Any] = {"task": task, "system": MTL, "variant": variant, "args": args_text,
                           "command": shlex.join(fit_cmd), "processes": 1}
    fit_phases = log_dir / f"{run_dir.name}.fit-phases.json"
    rc, wall, launch = timed_run(fit_cmd, log_dir / f"{run_dir.name}.fit.log", opts.threads, fit_phases)
    row["returncode"], row["wall_s"] = rc, wall
    if rc != 0:
        row["error"] = f"fit exited {rc}; log {log_dir / f'{run_dir.name}.fit.log'}"
        return row
    record = json.loads(fit_phases.read_text())
    split = phases(record, launch, wall)
    output = (log_dir / f"{run_dir.name}.fit.log").read_text(errors="replace")
    precision = re.search(r"^precision: (\S+)", output, re.M)
    row["precision"] = precision[1] if precision else None
    scores = logged_test_scores(run_dir, task) or summary_test_scores(output, task)
    row["tested_in_fit"] = bool(scores) or any(name == "test_start" for name, _ in record.get("events", []))
    if not row["tested_in_fit"]:
        best = record.get("best_model_path") or ""
        if not best or not Path(best).is_file():
            row["error"] = f"fit kept no best checkpoint to test ({best!r})"
            return row
        test_cmd = [sys.executable, str(WRAPPER), "test", *common, "--ckpt_path", best]
        test_phases = log_dir / f"{run_dir.name}.test-phases.json"
        rc, test_wall, test_launch = timed_run(test_cmd, log_dir / f"{run_dir.name}.test.log", opts.threads,
                                               test_phases)
        row["test_command"], row["processes"] = shlex.join(test_cmd), 2
        row["returncode"], row["wall_s"] = rc, wall + test_wall
        if rc != 0:
            row["error"] = f"test exited {rc}; log {log_dir / f'{run_dir.name}.test.log'}"
            return row
        more = phases(json.loads(test_phases.read_text()), test_launch, test_wall)
        split = {k: split[k] + more[k] for k in split}
        scores = logged_test_scores(run_dir, task)
    row["phases"] = split
    if not scores:
        row["error"] = f"no test/{task}/acc and f1 in the run's metrics.csv or the output; logs in {log_dir}"
    row["test_acc"], row["test_f1"] = scores.get("acc"), scores.get("f1")
    return row


def run_peer(task: str, data_dir: Path, variant: str, args_text: str, run_dir: Path, log_dir: Path,
             opts: Any, seed: int = 0) -> dict[str, Any]:
    """One AdapterHub fit in a fresh process: a row with wall time, phases and test scores."""
    cmd = [str(PEER_PYTHON), str(PEER_SCRIPT), "--data", str(data_dir), "--out-dir", str(run_dir / "adapter"),
           "--epochs", str(opts.epochs), "--batch", str(opts.batch), "--threads", str(opts.threads or 2),
           "--seed", str(seed), *shlex.split(args_text)]
    row: dict[str, Any] = {"task": task, "system": PEER, "variant": variant, "args": args_text,
                           "command": shlex.join(cmd), "processes": 1}
    log = log_dir / f"{run_dir.name}.log"
    rc, wall, _ = timed_run(cmd, log, opts.threads, None)
    row["returncode"], row["wall_s"] = rc, wall
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith('{"system"')]
    if rc != 0 or not lines:
        row["error"] = f"peer exited {rc}; log {log}"
        return row
    result = json.loads(lines[-1])
    split = dict(result["phases"])
    split["other"] = wall - sum(split.values())
    row.update(phases=split, test_acc=result["test_acc"], test_f1=result["test_f1"], best_epoch=result["best_epoch"],
               val_acc=result["val_acc"], in_process_total_s=result["total_s"])
    return row


# ---- 3. the table ----------------------------------------------------------------------------------------------------
def _spread(values: list[float], digits: int = 3) -> str:
    """The median, with the range when the rounds differ."""
    if not values:
        return "-"
    med = statistics.median(values)
    lo, hi = min(values), max(values)
    text = f"{med:.{digits}f}"
    return text if round(lo, digits) == round(hi, digits) else f"{text} ({lo:.{digits}f}-{hi:.{digits}f})"


def summarise(rows: list[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    """One entry per system / variant of ``task`` (first-seen order, the peer first): rounds, median wall, ratio to
    the first peer variant's median, test scores and median phases; failed rows are counted, not measured."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if row["task"] == task:
            groups.setdefault((row["system"], row["variant"]), []).append(row)
    keys = sorted(groups, key=lambda k: k[0] != PEER)  # stable: the peer's variants first, then mtl's in order
    out, reference = [], None
    for system, variant in keys:
        good = [r for r in groups[(system, variant)] if not r.get("error")]
        walls = [r["wall_s"] for r in good]
        entry = {"system": system, "variant": variant, "rounds": len(good),
                 "failed": len(groups[(system, variant)]) - len(good),
                 "median_wall_s": statistics.median(walls) if walls else None,
                 "acc": [r["test_acc"] for r in good if r.get("test_acc") is not None],
                 "f1": [r["test_f1"] for r in good if r.get("test_f1") is not None],
                 "phases": {p: statistics.median([r["phases"][p] for r in good]) if good else None for p in PHASES},
                 "processes": max((r.get("processes", 1) for r in good), default=1),
                 "precision": next((r.get("precision") for r in good if r.get("precision")), None)}
        if system == PEER and reference is None and entry["median_wall_s"]:
            reference = entry["median_wall_s"]
        out.append(entry)
    for entry in out:
        wall = entry["median_wall_s"]
        entry["ratio"] = wall / reference if wall is not None and reference else None
    return out


def format_table(task: str, summary: list[dict[str, Any]], sizes: tuple[int, int, int] | None = None) -> str:
    """A markdown table of `summarise`'s entries."""
    head = ["system / variant", "rounds", "median wall s", "x peer", "test acc", "macro-F1",
            *[f"{p} s" for p in PHASES]]
    lines = [f"### {task}" + (f" ({sizes[0]} / {sizes[1]} / {sizes[2]})" if sizes else ""), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in summary:
        name = f"{e['system']} / {e['variant']}"
        if e.get("precision"):
            name += f" [{e['precision']}]"
        if e.get("processes", 1) > 1:
            name += " (fit + test processes)"
        rounds = str(e["rounds"]) + (f" ({e['failed']} failed)" if e["failed"] else "")
        wall = f"{e['median_wall_s']:.1f}" if e["median_wall_s"] is not None else "-"
        ratio = f"{e['ratio']:.2f}" if e["ratio"] is not None else "-"
        phases = [f"{e['phases'][p]:.1f}" if e["phases"][p] is not None else "-" for p in PHASES]
        cells = [name, rounds, wall, ratio, _spread(e["acc"]), _spread(e["f1"]), *phases]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- main ------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    parser.add_argument("--rounds", type=int, default=None, help="rounds per task (default 3; --smoke: 1)")
    parser.add_argument("--variant", action="append", metavar='NAME="ARGS"',
                        help="an mtl variant: extra train.py arguments (repeatable; default: "
                             + ", ".join(f"{k}={v!r}" for k, v in VARIANTS.items()) + "; --smoke: default only)")
    parser.add_argument("--peer-variant", action="append", metavar='NAME="ARGS"',
                        help="an AdapterHub variant: extra adapterhub_fit.py arguments (repeatable; default: "
                             "default=''; the ratio column divides by the first)")
    parser.add_argument("--mtl-args", default="", help="extra train.py arguments for every mtl variant")
    parser.add_argument("--mtl-separate-test", action="store_true",
                        help="test the best checkpoint in a second process (train.py test --ckpt_path) even where fit "
                             "can test it itself")
    parser.add_argument("--mtl-warm-cache", action="store_true",
                        help="share mtl's tokenisation cache across the rounds of a task and variant (default: a "
                             "fresh cache every run, so mtl tokenises like the peer does)")
    parser.add_argument("--no-peer", action="store_true", help="mtl only")
    parser.add_argument("--sizes", action="append", metavar="TASK=TRAIN/VAL/TEST", help="override a task's sizes")
    parser.add_argument("--epochs", type=int, default=None, help="default 3; --smoke: 1")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="OMP/MKL threads of both systems (0: leave unset)")
    parser.add_argument("--work-dir", type=Path, default=None, help="data, logs and runs (default: a new temp dir)")
    parser.add_argument("--keep-runs", action="store_true", help="keep every run folder (checkpoints, exports)")
    parser.add_argument("--out", type=Path, default=None, help="raw rows, JSON (default: WORK/fit_wall.json)")
    parser.add_argument("--smoke", action="store_true", help="64 / 32 / 32 examples, 1 epoch, 1 round: plumbing only")
    opts = parser.parse_args(_glue(sys.argv[1:] if argv is None else list(argv)))
    opts.rounds = opts.rounds or (1 if opts.smoke else 3)
    opts.epochs = opts.epochs or (1 if opts.smoke else 3)
    variants = parse_variants(opts.variant, {"default": ""} if opts.smoke else VARIANTS, "--variant")
    peer_variants = parse_variants(opts.peer_variant, PEER_VARIANTS, "--peer-variant")
    sizes = parse_sizes(opts.sizes, opts.tasks, opts.smoke)
    if not opts.no_peer and not PEER_PYTHON.is_file():
        print(f"no AdapterHub venv at {PEER_PYTHON} (bash benchmarks/peers/setup_adapterhub.sh): mtl only",
              file=sys.stderr)
        opts.no_peer = True
    opts.test_after_fit_option = mtl_has_test_after_fit() if opts.mtl_separate_test else False
    work = opts.work_dir or Path(tempfile.mkdtemp(prefix="fit_wall-"))
    work = work.resolve()
    opts.out = (opts.out or work / "fit_wall.json").resolve()
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"fit_wall: tasks {opts.tasks}, {opts.rounds} round(s), {opts.epochs} epoch(s), batch {opts.batch}, "
          f"threads {opts.threads or 'unset'}; mtl variants {list(variants)}; peer variants "
          f"{[] if opts.no_peer else list(peer_variants)}; work dir {work}", flush=True)

    systems = [(PEER, v, a) for v, a in peer_variants.items() if not opts.no_peer]
    systems += [(MTL, v, a) for v, a in variants.items()]
    rows: list[dict[str, Any]] = []
    tables = []
    for task in opts.tasks:
        data_dir = work / "data" / task
        meta = materialise(task, sizes[task], data_dir)
        check_readback(task, data_dir)
        print(f"{task}: {meta['sizes']} -> {data_dir} (mtl reads back the same texts)", flush=True)
        for rnd in range(opts.rounds):
            order = systems[rnd % len(systems):] + systems[:rnd % len(systems)]
            for system, variant, args_text in order:
                name = f"{system}-{variant}-r{rnd}"
                run_dir = work / "runs" / task / name
                if run_dir.exists():
                    shutil.rmtree(run_dir)
                run_dir.mkdir(parents=True)
                log_dir = work / "logs" / task
                if system == PEER:
                    row = run_peer(task, data_dir, variant, args_text, run_dir, log_dir, opts, seed=rnd)
                else:
                    cache = (work / "cache" / task / variant) if opts.mtl_warm_cache else (run_dir / "cache")
                    row = run_mtl(task, data_dir, variant, args_text, run_dir, log_dir, opts, cache, seed=rnd)
                row["round"] = rnd
                rows.append(row)
                status = row.get("error") or (f"{row['wall_s']:.1f} s, test acc {row['test_acc']:.3f} "
                                              f"f1 {row['test_f1']:.3f}")
                print(f"  round {rnd} {system} / {variant}: {status}", flush=True)
                if row.get("error"):
                    logs = sorted(log_dir.glob(f"{name}*.log"))
                    if logs:
                        print(log_tail(logs[-1]), file=sys.stderr)
                if not opts.keep_runs:
                    shutil.rmtree(run_dir, ignore_errors=True)
                opts.out.write_text(json.dumps({"settings": settings(opts, variants, peer_variants, sizes, work),
                                                "rows": rows}, indent=1) + "\n")
        table = format_table(task, summarise(rows, task), sizes[task])
        tables.append(table)
        print("\n" + table + "\n", flush=True)
    if len(tables) > 1:
        print("\n\n".join(tables))
    print(f"\nraw rows: {opts.out}; logs: {work / 'logs'}")
    return 1 if any(r.get("error") for r in rows) else 0


def _glue(argv: list[str]) -> list[str]:
    """``--mtl-args VALUE`` -> ``--mtl-args=VALUE`` (likewise --variant, --peer-variant), so that a value that starts
    with ``--`` and has no space (``--mtl-args --data.group_by_length=false``) is not taken for an option."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in ("--mtl-args", "--variant", "--peer-variant") and i + 1 < len(argv):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def settings(opts: Any, variants: dict, peer_variants: dict, sizes: dict, work: Path) -> dict[str, Any]:
    return {"tasks": opts.tasks, "rounds": opts.rounds, "epochs": opts.epochs, "batch": opts.batch,
            "threads": opts.threads, "variants": variants, "peer_variants": {} if opts.no_peer else peer_variants,
            "mtl_args": opts.mtl_args, "mtl_separate_test": opts.mtl_separate_test,
            "mtl_warm_cache": opts.mtl_warm_cache, "sizes": {t: list(s) for t, s in sizes.items()},
            "work_dir": str(work), "smoke": opts.smoke}


if __name__ == "__main__":
    sys.exit(main())
