"""Reports of a continual-learning run (markdown and heatmap) and a comparison of runs (the `compare` command).

Reads the ``results.json`` that a continual run writes (format 1). Every metric shown is recomputed from the stored
scores with `mtl.continual.metrics`, so a report and a comparison always agree with the matrices they print.
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

FORMAT_VERSION = 1
KEYS = ("format_version", "strategy", "order", "stages", "test_sizes", "scores", "metrics", "zero_forgetting", "seed",
        "config", "wall_time_s", "run_dir")
SCORES = (("acc", "accuracy"), ("f1", "macro-F1"))
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


def _vector_problem(value: Any, size: int, where: str, order: list[str]) -> str | None:
    if isinstance(value, list) and len(value) == size and all(_is_number(v) for v in value):
        # JSON readers take NaN and Infinity: a failed evaluation must not become a confident metric
        bad = next((j for j, v in enumerate(value) if not math.isfinite(v)), None)
        if bad is None:
            return None
        return f"{where}[{bad}] (task {order[bad]}) is {value[bad]}, expected a finite score"
    got = (f"{len(value)} values" if len(value) != size else "a value that is not a number") \
        if isinstance(value, list) else f"a {type(value).__name__}"
    return f"{where} must hold {size} numbers, one per task in 'order' (got {got})"


def _problem(data: Any) -> str | None:
    """What is wrong with the content of a results.json, or None."""
    if not isinstance(data, dict):
        return f"top level is a {type(data).__name__}, expected a mapping"
    missing = [key for key in KEYS if key not in data]
    if missing:
        return f"missing key(s) {', '.join(missing)}; expected a results.json written by a continual run"
    if data["format_version"] != FORMAT_VERSION:
        return f"format_version is {data['format_version']!r}, expected {FORMAT_VERSION}"
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
    for key, _ in SCORES:
        entry = data["scores"].get(key) if isinstance(data["scores"], dict) else None
        if not isinstance(entry, dict) or not isinstance(entry.get("after"), list) or "before" not in entry:
            return f"scores.{key} must be a mapping with 'before' and 'after'"
        if len(entry["after"]) != len(stages):
            return f"scores.{key}.after has {len(entry['after'])} rows, expected {len(stages)} (one per stage)"
        vectors = [(f"scores.{key}.before", entry["before"])]
        vectors += [(f"scores.{key}.after[{i}]", row) for i, row in enumerate(entry["after"])]
        problem = next(filter(None, (_vector_problem(v, len(order), where, order) for where, v in vectors)), None)
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


def _sequential(results: dict) -> bool:
    # a one-task joint run has the same shape as a one-task sequence; its strategy tells them apart
    return results["strategy"] != "joint" and [list(s) for s in results["stages"]] == [[t] for t in results["order"]]


def accuracy_matrix(results: dict, metric: str = "acc") -> AccuracyMatrix | None:
    """R, b and test sizes of a sequential run (one task per stage, in order); None for any other run."""
    if not _sequential(results):
        return None
    scores = results["scores"][metric]
    return AccuracyMatrix(tuple(results["order"]), tuple(tuple(row) for row in scores["after"]),
                          tuple(scores["before"]), tuple(results["test_sizes"]),
                          source=f"{_run_name(results)}: scores.{metric}")


def _run_name(results: dict) -> str:
    return results["run_dir"] or f"{results['strategy']} run ({' → '.join(results['order'])})"


def run_metrics(results: dict, metric: str = "acc", joint: list[float] | None = None,
                single: list[float] | None = None) -> dict[str, Any]:
    """Every metric of a run on ``metric`` scores: all of `all_metrics` for a sequential run, ACC for a joint one."""
    r = accuracy_matrix(results, metric)
    if r is not None:
        return all_metrics(r, joint, single)
    # accuracy and weighted_accuracy read only the final row: repeated T times it is the T x T matrix they expect
    final = tuple(results["scores"][metric]["after"][-1])
    r = AccuracyMatrix(tuple(results["order"]), (final,) * len(final), test_sizes=tuple(results["test_sizes"]),
                       source=f"{_run_name(results)}: scores.{metric}.after[-1] (the final row, as every row of R)")
    return {"acc": accuracy(r), "acc_weighted": weighted_accuracy(r)}


def _stage_labels(results: dict) -> list[str]:
    everything = sorted(results["order"])
    return ["after joint (all tasks)" if len(stage) > 1 and sorted(stage) == everything
            else "after " + " + ".join(stage) for stage in results["stages"]]


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
    order, labels = results["order"], _stage_labels(results)
    lines = [f"# Continual run: {results['strategy']} ({' → '.join(order)})", "",
             f"Seed {results['seed']}, run folder `{results['run_dir']}`. Row `after X` holds every task's test score "
             "after training X; `before` is the score of the fresh adapters and heads.", ""]
    for key, title in SCORES:
        scores = results["scores"][key]
        rows = [["before", *map("{:.3f}".format, scores["before"])]]
        rows += [[label, *map("{:.3f}".format, row)] for label, row in zip(labels, scores["after"])]
        lines += [f"## {title[0].upper()}{title[1:]}", "", _table(["stage", *order], rows), ""]
    metrics = {key: run_metrics(results, key) for key, _ in SCORES}
    rows = [[name, _fmt(key, metrics["acc"].get(key)), _fmt(key, metrics["f1"].get(key))]
            for key, name in METRIC_NAMES.items()]
    lines += ["## Metrics", "", _table(["metric", "accuracy", "macro-F1"], rows), "", FORMULAS, ""]
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
    after, routes, alone = results["scores"]["acc"]["after"], results.get("routes") or {}, results["single_task"]
    rows = []
    for j, task in enumerate(results["order"]):
        if task in alone:
            own = alone[task]["acc"]
            rows.append([task, routes.get(task, task), f"{after[j][j]:.3f}", f"{own:.3f}", _fmt("bwt", after[j][j] - own)])
        else:
            rows.append([task, routes.get(task, task), f"{after[j][j]:.3f}", f"{after[j][j]:.3f}", "– (nothing to fuse)"])
    return ["## Single-task transfer", "",
            "R[j][j], the task's accuracy right after its stage through its route, against its own adapter alone "
            "(the same adapter, tested before the fusion trained).", "",
            _table(["task", "answered by", "R[j][j]", "own adapter alone", "transfer"], rows), ""]


def _heatmap_png(results: dict) -> bytes:
    plt = pyplot()
    order, labels = results["order"], ["before", *_stage_labels(results)]
    decimals = 3 if len(order) <= 5 else 2  # 3 decimals do not fit the narrower cells of a long sequence
    fig, axes = plt.subplots(1, 2, figsize=(3.5 + 2.0 * len(order), 1.5 + 0.4 * len(labels)), layout="constrained")
    for ax, (key, title) in zip(axes, SCORES):
        data = [results["scores"][key]["before"], *results["scores"][key]["after"]]
        image = ax.imshow(data, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(order)), order, rotation=30, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        for i, row in enumerate(data):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.{decimals}f}", ha="center", va="center", fontsize=8,
                        color="white" if v < 0.6 else "black")
        ax.set_title(f"{title}: {results['strategy']}")
    fig.colorbar(image, ax=list(axes))
    return png_bytes(fig)


def save_heatmap(results: dict, path: str | Path) -> None:
    """One PNG, accuracy and macro-F1 side by side: rows before and after each stage, columns the tasks."""
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
                final = dict(zip(runs[ref]["order"], runs[ref]["scores"]["acc"]["after"][-1]))
                joint, row["reference_joint"] = [final[task] for task in order], names[ref]
            ref = next((i for i, other in enumerate(runs) if other["strategy"] == "per_task" and _sequential(other)
                        and set(other["order"]) == tasks), None)
            if ref is not None:  # per_task trains each task from a fresh adapter: R[k][k] is "trained on it alone"
                after = runs[ref]["scores"]["acc"]["after"]
                diagonal = {task: after[k][k] for k, task in enumerate(runs[ref]["order"])}
                single, row["reference_single"] = [diagonal[task] for task in order], names[ref]
        row.update({k: v for k, v in run_metrics(results, "acc", joint, single).items() if k in row})
        rows.append(row)
    return rows


def _reference_note(rows: list[dict], key: str, what: str, none: str) -> str:
    users: dict[str | None, list[str]] = {}
    for row in rows:
        if row["sequential"]:
            users.setdefault(row[key], []).append(f"`{row['name']}`")
    parts = [f"{none} for {', '.join(names)}" if ref is None else f"run `{ref}` for {', '.join(names)}"
             for ref, names in users.items()]
    return f"- {what}: {'; '.join(parts) or 'no sequential run'}."


def comparison_markdown(rows: list[dict]) -> str:
    """A markdown table of runs and their metrics (on accuracy), with footnotes on references and formulas."""
    header = ["run", "strategy", "order", *(title for _, title in COLUMNS), "stored", "wall time"]
    body = [[row["name"], row["strategy"], row["order"], *(_fmt(key, row[key]) for key, _ in COLUMNS),
             _size(row.get("stored_bytes")), duration(row["wall_time_s"])] for row in rows]
    return "\n".join([
        _table(header, body, left=3), "",
        "All metrics are on test accuracy. A joint run trains every task at once: only its ACC is defined.", "",
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
    titles = dict(COLUMNS)
    panels = [(title, ylabel, [key for key in keys if any(row[key] is not None for row in rows)])
              for title, ylabel, keys in (("accuracy", "test accuracy", LEVELS),
                                          ("transfer and forgetting", "difference in test accuracy", DIFFERENCES))]
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
        if keys[0] in LEVELS:
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
