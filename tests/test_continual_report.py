"""Reports of continual runs and their comparison, on hand-made results.json contents (scores are multiples of 1/4)."""

from __future__ import annotations

import copy
import json
import os

import pytest

from mtl.continual.report import (accuracy_matrix, compare_main, comparison, comparison_markdown, markdown_report,
                                  read_results, run_metrics, save_comparison_plot, save_heatmap, write_report)
from mtl.continual.report import _comparison_figure
from mtl.errors import MTLConfigError
from mtl.figures import pyplot

PNG = b"\x89PNG"


def results(strategy, order, after, before, test_sizes, run_dir, stages=None, zero_forgetting=None, wall=None):
    """A results.json content; macro-F1 is half the accuracy, and the stored metrics are stale on purpose (the
    report must recompute them from the scores)."""
    stages = stages if stages is not None else [[task] for task in order]
    return {"format_version": 1, "strategy": strategy, "order": list(order), "stages": stages,
            "test_sizes": list(test_sizes),
            "scores": {"acc": {"before": list(before), "after": [list(row) for row in after]},
                       "f1": {"before": [v / 2 for v in before], "after": [[v / 2 for v in row] for row in after]}},
            "metrics": {"acc": {"acc": 99.0, "bwt": 99.0}, "f1": {"acc": 99.0}},
            "zero_forgetting": zero_forgetting, "seed": 0, "config": {"lr": 1e-3},
            "wall_time_s": wall or {"before": 3.2, "stages": [41.0 + i for i in range(len(stages))], "total": 125.0},
            "run_dir": run_dir}


# per_task adapts each task from a fresh adapter: no forgetting, and R[k][k] is the single-task score
PER_TASK = results("per_task", "abc", [[0.50, 0.25, 0.25], [0.50, 0.75, 0.25], [0.50, 0.75, 1.00]],
                   [0.25, 0.25, 0.25], [4, 2, 2], "checkpoints/continual/per_task")
# another order (c, a, b); R[1][0] > R[0][0] so that the two forgettings differ
SHARED = results("shared", "cab", [[0.75, 0.25, 0.50], [1.00, 0.75, 0.25], [0.25, 0.50, 1.00]],
                 [0.25, 0.25, 0.50], [2, 4, 2], "runs/shared")
# a third order (b, c, a): a* must be taken by task name
JOINT = results("joint", "bca", [[0.25, 1.00, 0.75]], [0.25, 0.25, 0.25], [2, 2, 4], "runs/joint",
                stages=[["b", "c", "a"]], wall={"before": 3.0, "stages": [60.0], "total": 63.0})


def save(folder, content):
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(content))
    return folder


def table_line(markdown, first_cell):
    return next(line for line in markdown.splitlines() if line.startswith(f"| {first_cell} |"))


def test_accuracy_matrix_of_sequential_runs_only():
    r = accuracy_matrix(SHARED, "f1")
    assert r.tasks == ("c", "a", "b") and r.after[1] == (0.5, 0.375, 0.125)
    assert r.before == (0.125, 0.125, 0.25) and r.test_sizes == (2, 4, 2)
    assert accuracy_matrix(JOINT) is None


def test_markdown_report_shows_both_matrices_and_recomputed_metrics():
    text = markdown_report(SHARED)
    assert text.startswith("# Continual run: shared (c → a → b)")
    assert "| stage | c | a | b |" in text
    assert text.count("| before | 0.250 | 0.250 | 0.500 |") == 1  # accuracy; macro-F1 below is halved
    assert "| before | 0.125 | 0.125 | 0.250 |" in text
    assert "| after a | 1.000 | 0.750 | 0.250 |" in text and "| after a | 0.500 | 0.375 | 0.125 |" in text
    assert text.index("## Accuracy") < text.index("## Macro-F1") < text.index("## Metrics")
    # BWT = ((0.25 - 0.75) + (0.50 - 0.75)) / 2, FWT = ((0.25 - 0.25) + (0.25 - 0.50)) / 2, not the stale 99
    assert table_line(text, "BWT").startswith("| BWT | -0.375 |")
    assert table_line(text, "FWT").startswith("| FWT | -0.125 |")
    assert table_line(text, "forgetting (first vs last)") == "| forgetting (first vs last) | 0.375 | 0.188 |"
    assert table_line(text, "forgetting (max-based)") == "| forgetting (max-based) | 0.500 | 0.250 |"
    assert table_line(text, "ACC (test-size weighted)").startswith("| ACC (test-size weighted) | 0.562 |")
    assert "99" not in text
    # the GEM code's other convention, for BWT and for FWT: here FWT is -0.125, there 2/3 of it
    assert "the GEM code divides both BWT and FWT by T" in text and "(T-1)/T" in text
    assert "| after c | 41.0 s |" in text and "| total | 2 min 05 s |" in text
    assert "Zero forgetting" not in text  # null: the strategy does not claim it


def test_markdown_report_zero_forgetting_line():
    verified = dict(PER_TASK, zero_forgetting={"verified": True, "tasks": {t: {"unchanged": True} for t in "ab"}})
    text = markdown_report(verified)
    assert "Zero forgetting: verified" in text and "SHA-256" in text and "FAILED" not in text
    failed = dict(PER_TASK, zero_forgetting={"verified": False, "tasks": {"b": {"unchanged": False},
                                                                          "a": {"unchanged": True}}})
    text = markdown_report(failed)
    assert "Zero forgetting: FAILED for b " in text and "verified" not in text


def test_markdown_report_of_one_task_and_joint_runs_uses_dashes():
    single = results("shared", "a", [[0.5]], [0.25], [3], "runs/one")
    text = markdown_report(single)
    assert table_line(text, "BWT") == "| BWT | – | – |" and table_line(text, "FWT") == "| FWT | – | – |"
    text = markdown_report(JOINT)
    assert "| after joint (all tasks) | 0.250 | 1.000 | 0.750 |" in text
    assert table_line(text, "ACC") == "| ACC | 0.667 | 0.333 |" and table_line(text, "BWT") == "| BWT | – | – |"
    assert "| total | 1 min 03 s |" in text


def comparison_runs():
    """PER_TASK, SHARED and JOINT, with decoys: a joint run over fewer tasks first, a second joint run over the same
    tasks after JOINT, and a sequential run over a task no joint run covers."""
    joint_ab = results("joint", "ab", [[0.0, 0.0]], [0.0, 0.0], [1, 1], "runs/joint_ab", stages=[["a", "b"]])
    joint2 = results("joint", "abc", [[1.0, 1.0, 1.0]], [0.0, 0.0, 0.0], [1, 1, 1], "runs/joint2",
                     stages=[["a", "b", "c"]])
    lonely = results("shared", "d", [[0.5]], [0.25], [3], "runs/lonely")
    return [joint_ab, PER_TASK, SHARED, JOINT, joint2, lonely]


def test_comparison_references_and_hand_computed_values():
    rows = {row["name"]: row for row in comparison(comparison_runs())}
    assert list(rows) == ["joint_ab", "per_task", "shared", "joint", "joint2", "lonely"]
    a_star = dict(zip("bca", [0.25, 1.00, 0.75]))  # JOINT's final row, by task name
    single = {"a": 0.50, "b": 0.75, "c": 1.00}  # PER_TASK's R[k][k], by task name
    diag = {"c": 0.75, "a": 0.75, "b": 1.00}  # SHARED's R[j][j]
    shared = rows["shared"]
    assert shared["intransigence"] == pytest.approx(sum(a_star[t] - diag[t] for t in "cab") / 3)
    assert shared["intransigence"] == pytest.approx(-1 / 6)
    assert shared["single_task_transfer"] == pytest.approx(sum(diag[t] - single[t] for t in "cab") / 3)
    assert shared["single_task_transfer"] == pytest.approx(1 / 12)
    assert (shared["reference_joint"], shared["reference_single"]) == ("joint", "per_task")
    assert shared["bwt"] == -0.375 and shared["forgetting_max"] == 0.5 and shared["acc"] == pytest.approx(7 / 12)
    assert shared["order"] == "c → a → b" and shared["wall_time_s"] == 125.0
    per_task = rows["per_task"]
    assert per_task["intransigence"] == pytest.approx((0.75 - 0.50 + 0.25 - 0.75 + 1.00 - 1.00) / 3)
    assert per_task["single_task_transfer"] == 0.0 and per_task["bwt"] == 0.0 and per_task["forgetting"] == 0.0
    joint = rows["joint"]
    assert joint["acc"] == pytest.approx(2 / 3) and joint["acc_weighted"] == (0.25 * 2 + 1.00 * 2 + 0.75 * 4) / 8
    assert joint["bwt"] is None and joint["fwt"] is None and joint["intransigence"] is None
    assert joint["reference_joint"] is None and joint["wall_time_s"] == 63.0
    lonely = rows["lonely"]
    assert lonely["intransigence"] is None and lonely["single_task_transfer"] is None and lonely["bwt"] is None
    assert comparison([SHARED, SHARED])[1]["name"] == "shared (2)"


def test_comparison_markdown_formatting_and_footnotes():
    text = comparison_markdown(comparison(comparison_runs()))
    shared = table_line(text, "shared").split(" | ")
    assert shared[1:3] == ["shared", "c → a → b"]
    assert shared[3:14] == ["0.583", "0.562", "0.736", "-0.375", "-0.125", "0.375", "0.500", "-0.167", "+0.083",
                            "–", "2 min 05 s |"]
    per_task = table_line(text, "per_task")
    assert "| +0.000 | +0.000 | 0.000 | 0.000 | -0.083 | +0.000 |" in per_task
    assert table_line(text, "joint").count("| – ") == 8
    intransigence = next(line for line in text.splitlines() if line.startswith("- Intransigence"))
    assert "run `joint` for `per_task`, `shared`" in intransigence
    assert "no joint run over the same tasks for `lonely`" in intransigence and "joint2" not in intransigence
    single = next(line for line in text.splitlines() if line.startswith("- Single-task transfer"))
    assert "run `per_task` for `per_task`, `shared`" in single
    assert "Avalanche" in text and "Chaudhry et al. 2018" in text and "Lopez-Paz & Ranzato" in text
    assert "the GEM code divides both BWT and FWT by T" in text


def test_write_report_writes_exactly_the_report_files(tmp_path):
    paths = write_report(SHARED, tmp_path / "run")
    assert paths == [tmp_path / "run" / "results.md", tmp_path / "run" / "heatmap.png"]
    assert sorted(os.listdir(tmp_path / "run")) == ["heatmap.png", "results.md"]
    assert paths[0].read_text(encoding="utf-8") == markdown_report(SHARED)
    assert paths[1].read_bytes().startswith(PNG)
    save_heatmap(JOINT, tmp_path / "joint.png")
    save_comparison_plot(comparison(comparison_runs()), tmp_path / "comparison.png")  # None values left out
    assert (tmp_path / "joint.png").read_bytes().startswith(PNG)
    assert (tmp_path / "comparison.png").read_bytes().startswith(PNG)


def bar_labels(ax):
    """The values written on an axis's bars, in drawing order."""
    return [text.get_text() for text in ax.texts]


def test_comparison_plot_puts_levels_and_differences_in_two_labelled_panels():
    fig = _comparison_figure(comparison([PER_TASK, SHARED]))
    try:
        levels, differences = fig.axes
        assert (levels.get_title(), differences.get_title()) == ("accuracy", "transfer and forgetting")
        assert [t.get_text().split("\n")[0] for t in levels.get_xticklabels()] == ["ACC", "avg incr. ACC"]
        # no joint run: intransigence is defined for no run and gets no empty group
        assert [t.get_text() for t in differences.get_xticklabels()] == [
            "BWT\n(higher is better)", "FWT\n(higher is better)", "forgetting\n(lower is better)",
            "forgetting (max)\n(lower is better)"]
        # per_task's bars then shared's, each in metric order; per_task: ACC (0.5 + 0.75 + 1) / 3, average incremental
        # ACC (0.5 + 0.625 + 0.75) / 3, no forgetting, FWT ((0.25 - 0.25) + (0.25 - 0.25)) / 2; shared: as in its report
        assert bar_labels(levels) == ["0.750", "0.625", "0.583", "0.736"]
        assert bar_labels(differences) == ["+0.000", "+0.000", "0.000", "0.000", "-0.375", "-0.125", "0.375", "0.500"]
        assert levels.get_ylim() == (0.0, 1.1) and differences.get_ylim()[0] < -0.375 < 0.5 < differences.get_ylim()[1]
        assert fig.get_supxlabel() == ""  # every run defines every plotted metric: nothing to explain
    finally:
        pyplot().close(fig)


def test_comparison_plot_explains_missing_bars_and_drops_an_empty_panel():
    fig = _comparison_figure(comparison(comparison_runs()))
    try:
        assert len(fig.axes[1].get_xticklabels()) == 5  # intransigence is there: joint runs cover per_task and shared
        assert fig.get_supxlabel().startswith("no bar: the metric is not defined for that run")
    finally:
        pyplot().close(fig)
    fig = _comparison_figure(comparison([JOINT]))
    try:
        (levels,) = fig.axes  # a joint run has ACC only: no differences panel at all
        assert bar_labels(levels) == ["0.667"]
    finally:
        pyplot().close(fig)


def test_compare_main_prints_and_writes(tmp_path, capsys):
    runs = [str(save(tmp_path / name, content)) for name, content in
            (("p", PER_TASK), ("s", SHARED), ("j", JOINT))]
    compare_main([*runs[:2], str(tmp_path / "j" / "results.json"), "--output", str(tmp_path / "out" / "cmp")])
    printed = capsys.readouterr().out
    assert "| per_task | per_task | a → b → c |" in printed and "-0.167" in printed
    assert sorted(os.listdir(tmp_path / "out" / "cmp")) == ["comparison.md", "comparison.png"]
    assert (tmp_path / "out" / "cmp" / "comparison.md").read_text(encoding="utf-8") + "\n" == printed
    assert (tmp_path / "out" / "cmp" / "comparison.png").read_bytes().startswith(PNG)
    compare_main([*runs, "--names", "P", "S", "J"])
    printed = capsys.readouterr().out
    assert "| S | shared |" in printed and "run `J` for `P`, `S`" in printed


@pytest.mark.parametrize("case", ["missing", "not_json", "short_row", "version", "twice", "names", "no_runs",
                                  "unknown_option", "abbreviation"])
def test_compare_main_refuses_bad_input_and_writes_nothing(tmp_path, case):
    good = str(save(tmp_path / "good", PER_TASK))
    bad = tmp_path / "bad"
    argv, named = [good, str(bad)], str(bad / "results.json")
    if case == "missing":
        named = str(bad)
    elif case == "not_json":
        bad.mkdir()
        (bad / "results.json").write_text('{"format_version": 1,')
    elif case in ("short_row", "version"):
        content = copy.deepcopy(SHARED)
        if case == "short_row":
            content["scores"]["acc"]["after"][1] = [0.5, 0.5]
        else:
            content["format_version"] = 99  # 1 and 2 are read
        save(bad, content)
    else:
        argv, named = {"twice": ([good, str(tmp_path / "good" / "results.json")], good),
                       "names": ([good, "--names", "a", "b"], "--names"), "no_runs": (["--names", "a"], "no RUN"),
                       "unknown_option": ([good, "--bogus"], "--bogus"), "abbreviation": ([good, "--out", "x"], "--out")
                       }[case]
    with pytest.raises(MTLConfigError) as caught:
        compare_main([*argv, "--output", str(tmp_path / "out")] if case != "no_runs" else argv)
    message = str(caught.value)
    assert named in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_read_results_accepts_the_folder_or_the_file_and_checks_lengths(tmp_path):
    folder = save(tmp_path / "run", SHARED)
    assert read_results(folder) == read_results(folder / "results.json") == SHARED
    content = copy.deepcopy(SHARED)
    content["scores"]["f1"]["after"][2] = [0.5, 0.5, 0.5, 0.5]
    (folder / "results.json").write_text(json.dumps(content))
    with pytest.raises(MTLConfigError, match=r"results\.json: scores\.f1\.after\[2\] must hold 3 numbers.*got 4"):
        read_results(folder)
    for key, value, expected in (("test_sizes", [1, 2], "test_sizes must hold 3"), ("stages", [["a"], ["x"]], "stages"),
                                 ("scores", {"acc": SHARED["scores"]["acc"]}, "scores.f1"), ("order", [], "order")):
        (folder / "results.json").write_text(json.dumps({**SHARED, key: value}))
        with pytest.raises(MTLConfigError, match=expected) as caught:
            read_results(folder)
        assert str(folder / "results.json") in str(caught.value)
    (folder / "results.json").write_text(json.dumps({k: v for k, v in SHARED.items() if k != "wall_time_s"}))
    with pytest.raises(MTLConfigError, match="missing key.*wall_time_s"):
        read_results(folder)
    (folder / "results.json").write_text("[1, 2]")
    with pytest.raises(MTLConfigError, match="top level is a list"):
        read_results(folder)


def test_stored_bytes_show_in_the_report_and_the_comparison():
    runs = comparison_runs()
    runs[0]["stored_bytes"] = {"adapters_and_heads": 14_892, "replay_buffer": 3_600}
    text = markdown_report(runs[0])
    assert "| adapters and heads | 14,892 |" in text and "| total | 18,492 |" in text
    row = comparison(runs)[0]
    assert row["stored_bytes"] == 18_492
    assert "| 18.1 KB |" in comparison_markdown([row])


@pytest.mark.parametrize("metric, row, column, value, key", [
    ("acc", 1, 0, float("nan"), "scores.acc.after[1][0] (task c) is nan"),  # off the diagonal, where max() dropped it
    ("f1", None, 2, float("inf"), "scores.f1.before[2] (task b) is inf"),
])
def test_compare_refuses_a_non_finite_score_naming_the_file_row_and_column(tmp_path, metric, row, column, value, key):
    content = copy.deepcopy(SHARED)
    scores = content["scores"][metric]
    (scores["after"][row] if row is not None else scores["before"])[column] = value
    folder = save(tmp_path / "broken", content)  # json.dumps writes NaN and Infinity, as other tools' writers may
    with pytest.raises(MTLConfigError) as caught:
        compare_main([str(save(tmp_path / "good", PER_TASK)), str(folder)])
    assert str(caught.value) == f"{folder / 'results.json'}: {key}, expected a finite score"


def test_metrics_of_a_run_in_memory_refuse_a_non_finite_score_naming_the_run():
    content = copy.deepcopy(SHARED)
    content["scores"]["acc"]["after"][2][1] = float("nan")
    with pytest.raises(MTLConfigError, match=r"^runs/shared: scores\.acc: R\[2\]\[1\] \(task a after training b\) "
                                             r"is nan, expected a finite score"):
        run_metrics(content)
    joint = copy.deepcopy(JOINT)
    joint["scores"]["acc"]["after"][0][0] = float("inf")
    with pytest.raises(MTLConfigError, match=r"^runs/joint: scores\.acc\.after\[-1\] \(the final row.*is inf"):
        run_metrics(joint)
