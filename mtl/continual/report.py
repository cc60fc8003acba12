"""Reports of a continual-learning run (markdown and heatmap) and a comparison of runs (the `compare` command).

Reads the ``results.json`` that a continual run writes. Every metric shown is recomputed from the stored scores with
`mtl.continual.metrics`, so a report and a comparison always agree with the matrices they print.

Format 2 stores, per stage, each task's headline metric as ``scores.score`` (R: accuracy for a classifier, entity
F1 for an entity tagger, word accuracy for a part-of-speech tagger), beside ``scores.acc`` and ``scores.f1`` whose
cells are null for a task without that metric; ``task_metrics`` names each task's kind, headline and what its
``score``, ``acc`` and ``f1`` are. Format 1 (written before: classification tasks only) still reads: its R is
``scores.acc``, every task's headline being accuracy.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from mtl.atomic import write_bytes_atomic, write_text_atomic
from mtl.continual.metrics import AccuracyMatrix, accuracy, all_metrics, weighted_accuracy
from mtl.errors import MTLConfigError
from mtl.figures import png_bytes, pyplot
from mtl.storage import read_json

FORMAT_VERSION = 2
FORMATS = (1, 2)  # format 1: classification tasks only, R = scores.acc (see the module docstring)
KEYS = ("format_version", "strategy", "order", "stages", "test_sizes", "scores", "metrics", "zero_forgetting", "seed",
        "config", "wall_time_s", "run_dir")
SCORE_KEYS = {1: ("acc", "f1"), 2: ("score", "acc", "f1")}
# a matrix's title where its tasks' metrics differ (else the one metric's name: "accuracy", "macro-F1", ...)
TITLES = {"score": "score (R: each task's headline metric)", "acc": "accuracy", "f1": "F1"}
HEADERS = {"score": "score", "acc": "accuracy", "f1": "F1"}
# what a format-1 run's tasks were: classifiers
CLASSIFIER = {"problem": "classification", "headline": "acc",
              "names": {"score": "accuracy", "acc": "accuracy", "f1": "macro-F1"}}
METRIC_NAMES = {"acc": "ACC", "acc_weighted": "ACC (test-size weighted)",
                "avg_incremental_acc": "average incremental ACC", "bwt": "BWT", "fwt": "FWT",
                "forgetting": "forgetting (first vs last)", "forgetting_max": "forgetting (max-based)"}
COLUMNS = (("acc", "ACC"), ("acc_weighted", "ACC (weighted)"), ("avg_incremental_acc", "avg incr. ACC"), ("bwt", "BWT"),
           ("fwt", "FWT"), ("forgetting", "forgetting"), ("forgetting_max", "forgetting (max)"),
           ("intransigence", "intransigence"), ("single_task_transfer", "single-task transfer"))
LEVELS = ("acc", "avg_incremental_acc")
DIFFERENCES = ("bwt", "fwt", "forgetting", "forgetting_max", "intransigence")
BETTER = {**dict.fromkeys(LEVELS + ("bwt", "fwt"), "higher is better"),
          **dict.fromkeys(("forgetting", "forgetting_max", "intransigence"), "lower is better")}
SIGNED = {"bwt", "fwt", "intransigence", "single_task_transfer"}
GEM_NOTE = ("both divide their T-1 terms by T-1; the GEM code divides both BWT and FWT by T, so its figures are "
            "(T-1)/T of these (with T = 4, an FWT of 0.08 here is 0.06 there)")
FORMULAS = (f"BWT and FWT are Lopez-Paz & Ranzato (2017)'s paper formulas: {GEM_NOTE}. Forgetting first vs last is "
            "Avalanche's; max-based is Chaudhry et al. (2018)'s.")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _vector_problem(value: Any, size: int, where: str, order: list[str],
                    absent: list[bool] | None = None) -> str | None:
    """What is wrong with one row of scores; ``absent[j]``: task j has no such metric, so its cell must be null."""
    absent = absent or [False] * size
    if isinstance(value, list) and len(value) == size and all(
            (v is None) if gone else _is_number(v) for v, gone in zip(value, absent)):
        # JSON readers take NaN and Infinity: a failed evaluation must not become a confident metric
        bad = next((j for j, v in enumerate(value) if v is not None and not math.isfinite(v)), None)
        if bad is None:
            return None
        return f"{where}[{bad}] (task {order[bad]}) is {value[bad]}, expected a finite score"
    if isinstance(value, list) and len(value) == size:
        j = next(j for j, (v, gone) in enumerate(zip(value, absent)) if not ((v is None) if gone else _is_number(v)))
        expected = "null (the task has no such metric)" if absent[j] else "a number"
        return f"{where}[{j}] (task {order[j]}) is {value[j]!r:.40}, expected {expected}"
    got = f"{len(value)} values" if isinstance(value, list) else f"a {type(value).__name__}"
    return f"{where} must hold {size} numbers, one per task in 'order' (got {got})"


def _task_metrics_problem(data: dict) -> str | None:
    """What is wrong with a format-2 results.json's ``task_metrics``, or None."""
    metrics = data.get("task_metrics")
    if not isinstance(metrics, dict) or set(metrics) != set(data["order"]):
        return "task_metrics must be a mapping with one entry per task in 'order'"
    for task, info in metrics.items():
        names = info.get("names") if isinstance(info, dict) else None
        if not (isinstance(info, dict) and isinstance(info.get("problem"), str)
                and info.get("headline") in ("acc", "f1")
                and isinstance(names, dict) and isinstance(names.get("score"), str)
                and set(names) <= {"score", "acc", "f1"} and info["headline"] in names
                and all(isinstance(n, str) for n in names.values())):
            return (f"task_metrics.{task} must hold 'problem', 'headline' (acc or f1) and 'names' (score, and acc and "
                    "f1 where the task has them)")
    return None


def _problem(data: Any) -> str | None:
    """What is wrong with the content of a results.json, or None."""
    if not isinstance(data, dict):
        return f"top level is a {type(data).__name__}, expected a mapping"
    missing = [key for key in KEYS if key not in data]
    if missing:
        return f"missing key(s) {', '.join(missing)}; expected a results.json written by a continual run"
    if data["format_version"] not in FORMATS:
        return f"format_version is {data['format_version']!r}, expected {' or '.join(map(str, FORMATS))}"
    order, stages, sizes = data["order"], data["stages"], data["test_sizes"]
    if not isinstance(data["strategy"], str):
        return "strategy must be a string"
    if not (isinstance(order, list) and order and all(isinstance(t, str) for t in order)
            and len(set(order)) == len(order)):
        return "order must be a non-empty list of distinct task names"
    if not (isinstance(stages, list) and stages and all(isinstance(s, list) and s and all(
            isinstance(t, str) and t in order for t in s) for s in stages)):
        return "stages must be a non-empty list of non-empty lists of tasks named in 'order'"
    if not (isinstance(sizes, list) and len(sizes) == len(order)
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes)):
        return f"test_sizes must hold {len(order)} positive integers, one per task in 'order'"
    problem = _task_metrics_problem(data) if data["format_version"] >= 2 else None
    if problem:
        return problem
    for key in SCORE_KEYS[data["format_version"]]:
        entry = data["scores"].get(key) if isinstance(data["scores"], dict) else None
        if not isinstance(entry, dict) or not isinstance(entry.get("after"), list) or "before" not in entry:
            return f"scores.{key} must be a mapping with 'before' and 'after'"
        if len(entry["after"]) != len(stages):
            return f"scores.{key}.after has {len(entry['after'])} rows, expected {len(stages)} (one per stage)"
        absent = [key not in info["names"] for info in task_metrics(data).values()]
        vectors = [(f"scores.{key}.before", entry["before"])]
        vectors += [(f"scores.{key}.after[{i}]", row) for i, row in enumerate(entry["after"])]
        problem = next(filter(None, (_vector_problem(v, len(order), where, order, absent) for where, v in vectors)),
                       None)
        if problem:
            return problem
    if not isinstance(data["metrics"], dict):
        return "metrics must be a mapping"
    zero = data["zero_forgetting"]
    if zero is not None and not (isinstance(zero, dict) and isinstance(zero.get("verified"), bool)
                                 and isinstance(zero.get("tasks"), dict)
                                 and all(isinstance(v, dict) for v in zero["tasks"].values())):
        return "zero_forgetting must be null or a mapping with 'verified' (true or false) and 'tasks'"
    wall = data["wall_time_s"]
    if not (isinstance(wall, dict) and _is_number(wall.get("total")) and isinstance(wall.get("stages"), list)
            and len(wall["stages"]) == len(stages) and all(_is_number(s) for s in wall["stages"])):
        return f"wall_time_s must be a mapping with 'total' and 'stages' ({len(stages)} numbers, one per stage)"
    if data["run_dir"] is not None and not isinstance(data["run_dir"], str):
        return "run_dir must be a string"
    return None


def read_results(path: str | Path) -> dict:
    """Read and check a continual run's results.json, given its run folder or the file itself."""
    file = Path(path)
    file = file / "results.json" if file.is_dir() else file
    data = read_json(file, "a continual run folder holding results.json, or the file")
    problem = _problem(data)
    if problem:
        raise MTLConfigError(f"{file}: {problem}")
    return data


def task_metrics(results: dict) -> dict[str, dict[str, Any]]:
    """Per task of the order: its ``problem``, ``headline`` and ``names`` (what its score, acc and f1 are)."""
    stored = results.get("task_metrics") or {}
    return {task: stored.get(task, CLASSIFIER) for task in results["order"]}


def _key(results: dict, metric: str) -> str:
    """Where ``metric``'s scores are stored: a format-1 run's score (R) is its accuracy."""
    return "acc" if metric == "score" and "score" not in results["scores"] else metric


def scores(results: dict, metric: str = "score") -> dict[str, Any]:
    """``before`` and ``after`` of ``metric`` (``score``: R, each task's headline; ``acc``; ``f1``)."""
    return results["scores"][_key(results, metric)]


def _has_null(entry: dict[str, Any]) -> bool:
    return any(v is None for row in [entry["before"], *entry["after"]] for v in row)


def _matrices(results: dict) -> list[tuple[str, str, list[str], str]]:
    """The score matrices a report shows: (metric, title, column labels, metrics-table header). A matrix no task has
    is left out, and so is ``score`` where it is another matrix (every task's headline the same metric); columns
    name their task's metric where the tasks' metrics differ."""
    order, info = results["order"], task_metrics(results)
    headlines = {i["headline"] for i in info.values()}
    shown = []
    for metric in ("score", "acc", "f1"):
        if metric == "score" and len(headlines) == 1:
            continue
        names = [i["names"].get(metric) for i in info.values()]
        if all(n is None for n in names):
            continue
        if len(set(names)) == 1:  # one metric for every task: the title says it
            title = header = names[0]
            columns = list(order)
        else:
            title, header = TITLES[metric], HEADERS[metric]
            columns = [f"{task} ({name or 'none'})" for task, name in zip(order, names)]
        if metric != "score" and headlines == {metric}:  # every task's headline: this matrix is R
            title += " (R)"
        shown.append((metric, title, columns, header))
    return shown


def headline_line(results: dict) -> str:
    """Which metric R holds for each task, in words."""
    names = [i["names"]["score"] for i in task_metrics(results).values()]
    if len(set(names)) == 1:
        return f"R holds each task's headline metric: {names[0]} for every task."
    return "R holds each task's headline metric: " + ", ".join(
        f"{task}: {name}" for task, name in zip(results["order"], names)) + "."


def _sequential(results: dict) -> bool:
    # a one-task joint run has the same shape as a one-task sequence; its strategy tells them apart
    return results["strategy"] != "joint" and [list(s) for s in results["stages"]] == [[t] for t in results["order"]]


def accuracy_matrix(results: dict, metric: str = "score") -> AccuracyMatrix | None:
    """R (``score``: each task's headline metric; or ``acc`` / ``f1``), b and test sizes of a sequential run (one task
    per stage, in order); None for any other run."""
    if not _sequential(results):
        return None
    entry = scores(results, metric)
    return AccuracyMatrix(tuple(results["order"]), tuple(tuple(row) for row in entry["after"]),
                          tuple(entry["before"]), tuple(results["test_sizes"]),
                          source=f"{_run_name(results)}: scores.{_key(results, metric)}")


def _run_name(results: dict) -> str:
    return results["run_dir"] or f"{results['strategy']} run ({' → '.join(results['order'])})"


def run_metrics(results: dict, metric: str = "score", joint: list[float] | None = None,
                single: list[float] | None = None) -> dict[str, Any]:
    """Every metric of a run on ``metric`` scores (``score``: R): all of `all_metrics` for a sequential run, ACC for a
    joint one. A matrix with a task lacking the metric (null cells) is refused: see `_matrices`."""
    if _has_null(scores(results, metric)):
        raise ValueError(f"scores.{metric} has tasks without {metric}: no metric of the matrix is defined")
    r = accuracy_matrix(results, metric)
    if r is not None:
        return all_metrics(r, joint, single)
    # accuracy and weighted_accuracy read only the final row: repeated T times it is the T x T matrix they expect
    final = tuple(scores(results, metric)["after"][-1])
    r = AccuracyMatrix(tuple(results["order"]), (final,) * len(final), test_sizes=tuple(results["test_sizes"]),
                       source=f"{_run_name(results)}: scores.{_key(results, metric)}.after[-1] (the final row, as "
                              "every row of R)")
    return {"acc": accuracy(r), "acc_weighted": weighted_accuracy(r)}


def _stage_labels(results: dict) -> list[str]:
    everything = sorted(results["order"])
    return ["after joint (all tasks)" if len(stage) > 1 and sorted(stage) == everything
            else "after " + " + ".join(stage) for stage in results["stages"]]


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _fmt(key: str, value: float | None) -> str:
    if value is None:
        return "–"
    # + 0.0 turns the -0.0 that rounding a tiny negative value gives into 0.0, so it prints as +0.000
    return f"{round(value, 3) + 0.0:+.3f}" if key in SIGNED else f"{value:.3f}"


def duration(seconds: float | None) -> str:
    """``41.0 s``, ``2 min 05 s``, ``1 h 02 min 05 s`` (``–`` for None)."""
    if not _is_number(seconds):
        return "–"
    if round(seconds, 1) < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min {secs:02d} s" if hours else f"{minutes} min {secs:02d} s"


def _size(size: int | None) -> str:
    """``1.23 MB`` style (``–`` for None)."""
    if size is None:
        return "–"
    return f"{size / 2**20:.2f} MB" if size >= 2**20 else f"{size / 2**10:.1f} KB"


def _table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    lines = [header, [":---"] * left + ["---:"] * (len(header) - left), *rows]
    return "\n".join("| " + " | ".join(str(cell).replace("|", "\\|") for cell in line) + " |" for line in lines)


def _zero_forgetting_line(zero: dict, order: list[str]) -> str:
    if zero["verified"]:
        return ("Zero forgetting: verified (the SHA-256 of every earlier task's tensors and its logits on a probe "
                "batch are unchanged after the last task).")
    changed = sorted((t for t, v in zero["tasks"].items() if not v.get("unchanged", False)),
                     key=lambda t: (order.index(t) if t in order else len(order), t))
    return (f"Zero forgetting: FAILED for {', '.join(changed) or '(no task named)'} (tensors' SHA-256 or probe-batch "
            "logits changed after later tasks).")


def markdown_report(results: dict) -> str:
    """A markdown report of one run: score matrices, metrics, wall time, and the zero-forgetting check."""
    order, labels, shown = results["order"], _stage_labels(results), _matrices(results)
    lines = [f"# Continual run: {results['strategy']} ({' → '.join(order)})", "",
             f"Seed {results['seed']}, run folder `{results['run_dir']}`. Row `after X` holds every task's test score "
             f"after training X; `before` is the score of the fresh adapters and heads. {headline_line(results)} "
             "The metrics below read R first.", ""]
    for key, title, columns, _ in shown:
        entry = scores(results, key)
        rows = [["before", *map(_cell, entry["before"])]]
        rows += [[label, *map(_cell, row)] for label, row in zip(labels, entry["after"])]
        lines += [f"## {title[0].upper()}{title[1:]}", "", _table(["stage", *columns], rows), ""]
    metrics = {key: {} if _has_null(scores(results, key)) else run_metrics(results, key) for key, *_ in shown}
    rows = [[name, *(_fmt(key, metrics[m].get(key)) for m, *_ in shown)] for key, name in METRIC_NAMES.items()]
    lines += ["## Metrics", "", _table(["metric", *(header for *_, header in shown)], rows), "", FORMULAS, ""]
    if any(not metrics[m] for m, *_ in shown):
        lines += ["A matrix with a task that has no such metric (– in its cells) has no metrics of its own.", ""]
    wall = results["wall_time_s"]
    rows = [["before", duration(wall.get("before"))],
            *([label, duration(seconds)] for label, seconds in zip(labels, wall["stages"])),
            ["total", duration(wall["total"])]]
    lines += ["## Wall time", "", _table(["stage", "wall time"], rows), ""]
    for kind, routing in (results.get("routing") or {}).items():
        lines += [f"## Routing without a task id: {kind} router", "",
                  "Every seen task's test texts in one mixed stream; the router picks the task, whose head answers.", ""]
        rows = [[task, str(r["rows"]), *(_fmt("acc", r[k]) for k in ("routing_accuracy", "routed_accuracy",
                                                                        "task_given_accuracy"))]
                for task, r in [*routing["per_task"].items(), ("all", routing["overall"])]]
        lines += [_table(["task", "rows", "routing accuracy", "routed accuracy", "task-given accuracy"], rows), ""]
        if any(i["problem"] == "token_classification" for i in task_metrics(results).values()):
            lines += ["A tagger's rows are windows of its sentences; a row counts as right when every word it labels "
                      "gets its true tag.", ""]
    if results.get("single_task"):
        lines += _transfer_section(results)
    stored = results.get("stored_bytes")
    if stored:
        rows = [[what.replace("_", " "), f"{size:,}"] for what, size in stored.items()]
        lines += ["## What the method stores", "", _table(["item", "bytes"], [*rows, ["total", f"{sum(stored.values()):,}"]]),
                  ""]
    if results["zero_forgetting"] is not None:
        lines += [_zero_forgetting_line(results["zero_forgetting"], order), ""]
    return "\n".join(lines)


def _transfer_section(results: dict) -> list[str]:
    """Per task: R[j][j] (through its fusion), its own adapter alone (the stage's first fit), and the difference."""
    after, routes, alone = scores(results)["after"], results.get("routes") or {}, results["single_task"]
    rows = []
    for j, task in enumerate(results["order"]):
        if task in alone:
            own = alone[task].get("score", alone[task].get("acc"))  # format 1 kept accuracy only
            rows.append([task, routes.get(task, task), f"{after[j][j]:.3f}", f"{own:.3f}", _fmt("bwt", after[j][j] - own)])
        else:
            rows.append([task, routes.get(task, task), f"{after[j][j]:.3f}", f"{after[j][j]:.3f}", "– (nothing to fuse)"])
    return ["## Single-task transfer", "",
            "R[j][j], the task's score right after its stage through its route, against its own adapter alone "
            "(the same adapter, tested before the fusion trained).", "",
            _table(["task", "answered by", "R[j][j]", "own adapter alone", "transfer"], rows), ""]


def _heatmap_figure(results: dict) -> Any:
    plt = pyplot()
    import matplotlib  # after pyplot(), which picks the Agg backend
    order, labels, shown = results["order"], ["before", *_stage_labels(results)], _matrices(results)
    decimals = 3 if len(order) <= 5 else 2  # 3 decimals do not fit the narrower cells of a long sequence
    fig, axes = plt.subplots(1, len(shown), squeeze=False, layout="constrained",
                             figsize=((1.75 + 1.0 * len(order)) * len(shown), 1.5 + 0.4 * len(labels)))
    for ax, (key, title, columns, _) in zip(axes[0], shown):
        entry = scores(results, key)
        data = [entry["before"], *entry["after"]]
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")  # a task without this metric
        image = ax.imshow([[math.nan if v is None else v for v in row] for row in data], cmap=cmap, vmin=0.0,
                          vmax=1.0, aspect="auto")
        # a column that names its metric breaks the line before it: "task\n(entity F1)"
        ax.set_xticks(range(len(order)), [c.replace(" (", "\n(", 1) if c != t else c for c, t in zip(columns, order)],
                      rotation=30, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        for i, row in enumerate(data):
            for j, v in enumerate(row):
                ax.text(j, i, "–" if v is None else f"{v:.{decimals}f}", ha="center", va="center", fontsize=8,
                        color="white" if v is not None and v < 0.6 else "black")
        ax.set_title(f"{title}: {results['strategy']}")
    fig.colorbar(image, ax=list(axes[0]))
    return fig


def _heatmap_png(results: dict) -> bytes:
    return png_bytes(_heatmap_figure(results))


def save_heatmap(results: dict, path: str | Path) -> None:
    """One PNG, the score matrices side by side (R, each task's headline, first where it is a matrix of its own; then
    accuracy and F1): rows before and after each stage, columns the tasks, each naming its metric where they
    differ."""
    write_bytes_atomic(path, _heatmap_png(results))


def write_report(results: dict, folder: str | Path) -> list[Path]:
    """Write results.md and heatmap.png into ``folder`` (each atomically) and return their paths."""
    folder = Path(folder)
    markdown, png = markdown_report(results), _heatmap_png(results)  # both built before either is written
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "results.md", markdown)
    write_bytes_atomic(folder / "heatmap.png", png)
    return [folder / "results.md", folder / "heatmap.png"]


def _default_names(runs: list[dict]) -> list[str]:
    names, seen = [], {}
    for results in runs:
        name = Path(results["run_dir"] or "").name or f"{results['strategy']} ({' → '.join(results['order'])})"
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name} ({seen[name]})")  # e.g. two seeds' runs/*/per_task
    return names


def comparison(runs: list[dict], names: list[str] | None = None) -> list[dict]:
    """One row of accuracy metrics per run; a* and single-task scores come from the first joint and the first per_task
    run over the same tasks."""
    names = _default_names(runs) if names is None else list(names)
    if len(names) != len(runs):
        raise ValueError(f"{len(names)} names for {len(runs)} runs")
    rows = []
    for results, name in zip(runs, names):
        order, tasks = results["order"], set(results["order"])
        row = {"name": name, "strategy": results["strategy"], "order": " → ".join(order),
               "sequential": _sequential(results), **dict.fromkeys(k for k, _ in COLUMNS),
               "wall_time_s": results["wall_time_s"]["total"], "reference_joint": None, "reference_single": None,
               "stored_bytes": sum(results["stored_bytes"].values()) if results.get("stored_bytes") else None}
        joint = single = None
        if row["sequential"]:
            ref = next((i for i, other in enumerate(runs) if other["strategy"] == "joint"
                        and set(other["order"]) == tasks), None)
            if ref is not None:  # a* is stored in the joint run's task order: take it by task name
                final = dict(zip(runs[ref]["order"], scores(runs[ref])["after"][-1]))
                joint, row["reference_joint"] = [final[task] for task in order], names[ref]
            ref = next((i for i, other in enumerate(runs) if other["strategy"] == "per_task" and _sequential(other)
                        and set(other["order"]) == tasks), None)
            if ref is not None:  # per_task trains each task from a fresh adapter: R[k][k] is "trained on it alone"
                after = scores(runs[ref])["after"]
                diagonal = {task: after[k][k] for k, task in enumerate(runs[ref]["order"])}
                single, row["reference_single"] = [diagonal[task] for task in order], names[ref]
        row.update({k: v for k, v in run_metrics(results, "score", joint, single).items() if k in row})
        row["measure"] = _measure(results)
        rows.append(row)
    return rows


def _measure(results: dict) -> str:
    """What a run's R holds, in a few words: "accuracy" where every task's headline is accuracy."""
    names = {i["names"]["score"] for i in task_metrics(results).values()}
    return names.pop() if len(names) == 1 else "headline score"


def _measures(rows: list[dict]) -> str:
    names = {row.get("measure", "accuracy") for row in rows}
    return names.pop() if len(names) == 1 else "headline score"


def _reference_note(rows: list[dict], key: str, what: str, none: str) -> str:
    users: dict[str | None, list[str]] = {}
    for row in rows:
        if row["sequential"]:
            users.setdefault(row[key], []).append(f"`{row['name']}`")
    parts = [f"{none} for {', '.join(names)}" if ref is None else f"run `{ref}` for {', '.join(names)}"
             for ref, names in users.items()]
    return f"- {what}: {'; '.join(parts) or 'no sequential run'}."


def comparison_markdown(rows: list[dict]) -> str:
    """A markdown table of runs and their metrics (on R: each task's headline score), with footnotes on references
    and formulas."""
    header = ["run", "strategy", "order", *(title for _, title in COLUMNS), "stored", "wall time"]
    body = [[row["name"], row["strategy"], row["order"], *(_fmt(key, row[key]) for key, _ in COLUMNS),
             _size(row.get("stored_bytes")), duration(row["wall_time_s"])] for row in rows]
    return "\n".join([
        _table(header, body, left=3), "",
        ("All metrics are on test accuracy." if _measures(rows) == "accuracy" else
         f"All metrics are on R, each task's headline test score ({_measures(rows)}: accuracy for a classifier, entity "
         "F1 for an entity tagger).") + " A joint run trains every task at once: only its ACC is defined.", "",
        _reference_note(rows, "reference_joint", "Intransigence (Chaudhry et al. 2018), a* = final accuracy of joint "
                        "run over the same tasks", "no joint run over the same tasks"),
        _reference_note(rows, "reference_single", "Single-task transfer, score of an adapter trained on each task "
                        "alone = R[k][k] of per_task run over the same tasks", "no per_task run over the same tasks"),
        "- Forgetting: first vs last, R[j][j] - R[T-1][j] (Avalanche); forgetting (max): max over l < T-1 of "
        "R[l][j] - R[T-1][j] (Chaudhry et al. 2018); both averaged over j < T-1.",
        f"- BWT and FWT: Lopez-Paz & Ranzato (2017)'s paper formulas; {GEM_NOTE}.",
        ""])


def _comparison_figure(rows: list[dict]) -> Any:
    """Levels (scores in [0, 1]) and differences (signed, a few hundredths) in separate panels, each bar labelled:
    on one shared axis a forgetting of 0.04 next to an ACC of 0.88 is a sliver nobody can read."""
    plt = pyplot()
    titles, measure = dict(COLUMNS), _measures(rows)
    panels = [(title, ylabel, [key for key in keys if any(row[key] is not None for row in rows)])
              for title, ylabel, keys in ((measure, f"test {measure}", LEVELS),
                                          ("transfer and forgetting", f"difference in test {measure}", DIFFERENCES))]
    panels = [panel for panel in panels if panel[2]]  # a panel no run defines (only joint runs: no BWT) is left out
    width, groups = 0.8 / len(rows), [len(keys) for _, _, keys in panels]
    # at least 1.5 inches a metric, for its tick label "(higher is better)"; 3.5 more for the y labels and legend
    fig, axes = plt.subplots(1, len(panels), squeeze=False, layout="constrained", width_ratios=groups,
                             figsize=(3.5 + sum(groups) * max(1.5, 0.35 + 0.3 * len(rows)), 5.0))
    for ax, (title, ylabel, keys) in zip(axes[0], panels):
        for n, row in enumerate(rows):
            points = [(i + (n - (len(rows) - 1) / 2) * width, key, row[key]) for i, key in enumerate(keys)
                      if row[key] is not None]
            bars = ax.bar([x for x, _, _ in points], [v for _, _, v in points], width, label=row["name"],
                          color=f"C{n % 10}")
            # the table's own formatting, so the plot and comparison.md show the same digits (BWT +0.000, not 0)
            ax.bar_label(bars, [_fmt(key, v) for _, key, v in points], padding=2, fontsize=8,
                         rotation=90 if len(rows) > 2 else 0)
        ax.set_xticks(range(len(keys)), [f"{titles[key]}\n({BETTER[key]})" for key in keys])
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        if keys[0] in LEVELS:  # the levels panel
            ax.set_ylim(0.0, 1.2 if len(rows) > 2 else 1.1)  # room above a bar at 1.0 for its label
            ax.set_yticks([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])  # no tick above the largest possible score
        else:
            ax.axhline(0.0, color="black", linewidth=0.8)
            ax.margins(y=0.3 if len(rows) > 2 else 0.15)  # room beyond the longest bar for its label
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside right upper", title="run", fontsize=9)
    fig.suptitle("continual runs compared")
    if any(row[key] is None for _, _, keys in panels for key in keys for row in rows):
        fig.supxlabel("no bar: the metric is not defined for that run (a joint run has ACC only; intransigence needs "
                      "a joint run over the same tasks)", fontsize=8)
    return fig


def _comparison_png(rows: list[dict]) -> bytes:
    return png_bytes(_comparison_figure(rows))


def save_comparison_plot(rows: list[dict], path: str | Path) -> None:
    """One PNG: levels and differences in two panels, one group per metric and one labelled bar per run."""
    write_bytes_atomic(path, _comparison_png(rows))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print the usage and exit; mtl reports one line
        raise MTLConfigError(f"compare: {' '.join(message.split())}")


def compare_main(argv: list[str]) -> None:
    """The `compare` command: a markdown table of runs on stdout; with --output also comparison.md and .png there."""
    parser = _Parser(prog="mtl compare", description="Compare continual-learning runs.", exit_on_error=False,
                     allow_abbrev=False)
    parser.add_argument("runs", nargs="*", metavar="RUN", help="a continual run folder, or its results.json")
    parser.add_argument("--output", metavar="DIR", help="write comparison.md and comparison.png into DIR")
    parser.add_argument("--names", nargs="+", metavar="NAME", help="one name per RUN (default: run folder names)")
    try:
        args = parser.parse_args(argv)
    except argparse.ArgumentError as err:
        raise MTLConfigError(f"compare: {' '.join(str(err).split())}") from None
    if not args.runs:
        raise MTLConfigError("compare: no RUN given; expected one or more continual run folders (or results.json "
                             "files)" + (", before --names" if args.names else ""))
    if args.names is not None and (len(args.names) != len(args.runs) or len(set(args.names)) != len(args.names)):
        raise MTLConfigError(f"compare: --names gives {len(args.names)} names ({', '.join(args.names)}) for "
                             f"{len(args.runs)} runs; expected one distinct name per RUN")
    output = Path(args.output) if args.output is not None else None
    if output is not None and output.exists() and not output.is_dir():
        raise MTLConfigError(f"{output}: --output exists and is not a folder")
    files: list[Path] = []
    runs = []
    for run in args.runs:  # every run is read and checked before anything is written
        file = (Path(run) / "results.json" if Path(run).is_dir() else Path(run)).resolve()
        if file in files:
            raise MTLConfigError(f"{run}: given twice (the same results.json as RUN {files.index(file) + 1})")
        runs.append(read_results(run))
        files.append(file)
    rows = comparison(runs, args.names)
    markdown = comparison_markdown(rows)
    if output is not None:
        png = _comparison_png(rows)
        output.mkdir(parents=True, exist_ok=True)
        write_text_atomic(output / "comparison.md", markdown)
        write_bytes_atomic(output / "comparison.png", png)
    print(markdown)
