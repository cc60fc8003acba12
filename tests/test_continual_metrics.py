"""Continual-learning metrics against hand-computed values (exact: every score is a multiple of 1/4)."""

from __future__ import annotations

import pytest

from mtl.continual.metrics import (AccuracyMatrix, accuracy, all_metrics, average_incremental_accuracy,
                                   backward_transfer, forgetting, forgetting_per_task, forward_transfer, intransigence,
                                   single_task_transfer, weighted_accuracy)
from mtl.errors import MTLConfigError

# R[i][j]: task j after training task i; ties (R[1][1] == R[3][1], R[0][0] == R[2][0]) and negative transfer (b[1] >
# R[0][1]) on purpose; unequal test sizes
R4 = AccuracyMatrix(
    tasks=("a", "b", "c", "d"),
    after=((0.50, 0.25, 0.25, 0.50),
           (0.25, 0.75, 0.50, 0.25),
           (0.50, 0.50, 1.00, 0.25),
           (0.25, 0.75, 0.75, 0.75)),
    before=(0.25, 0.50, 0.25, 0.50),
    test_sizes=(4, 2, 1, 1),
)


def test_accuracy_and_its_weighted_and_incremental_variants():
    assert accuracy(R4) == (0.25 + 0.75 + 0.75 + 0.75) / 4 == 0.625
    assert weighted_accuracy(R4) == (0.25 * 4 + 0.75 * 2 + 0.75 + 0.75) / 8 == 0.5
    assert average_incremental_accuracy(R4) == pytest.approx((0.5 + 0.5 + 2 / 3 + 0.625) / 4, abs=1e-15)


def test_backward_and_forward_transfer_follow_the_paper_formulas():
    # BWT over j < T-1: (0.25-0.5) + (0.75-0.75) + (0.75-1.0), divided by T-1 = 3 (not by T as the GEM code does)
    assert backward_transfer(R4) == pytest.approx(-0.5 / 3, abs=1e-15)
    # FWT over j >= 1: (0.25-0.5) + (0.5-0.25) + (0.25-0.5), divided by 3: negative transfer is kept
    assert forward_transfer(R4) == pytest.approx(-0.25 / 3, abs=1e-15)


def test_forgetting_first_vs_last_and_max_based():
    assert forgetting_per_task(R4) == [0.25, 0.0, 0.25]
    assert forgetting_per_task(R4, max_based=True) == [0.25, 0.0, 0.25]  # the max ties with R[j, j] here
    differ = AccuracyMatrix(("a", "b", "c"), ((0.50, 0.0, 0.0), (0.75, 0.50, 0.0), (0.25, 0.50, 0.50)))
    assert forgetting_per_task(differ) == [0.25, 0.0] and forgetting(differ) == 0.125
    assert forgetting_per_task(differ, max_based=True) == [0.5, 0.0] and forgetting(differ, max_based=True) == 0.25


def test_negative_forgetting_is_not_clamped():
    improves = AccuracyMatrix(("a", "b"), ((0.50, 0.0), (0.75, 0.50)))
    assert forgetting(improves) == -0.25 and forgetting(improves, max_based=True) == -0.25
    assert backward_transfer(improves) == 0.25


def test_intransigence_and_single_task_transfer():
    assert intransigence(R4, joint=(0.75, 0.75, 0.75, 1.0)) == (0.25 + 0.0 - 0.25 + 0.25) / 4
    assert single_task_transfer(R4, single=(0.5, 0.5, 1.0, 0.5)) == (0.0 + 0.25 + 0.0 + 0.25) / 4


def test_a_one_task_sequence_has_no_transfer_or_forgetting():
    one = AccuracyMatrix(("a",), ((0.75,),), before=(0.5,), test_sizes=(3,))
    metrics = all_metrics(one)
    assert metrics["acc"] == metrics["acc_weighted"] == metrics["avg_incremental_acc"] == 0.75
    assert metrics["bwt"] is None and metrics["fwt"] is None
    assert metrics["forgetting"] is None and metrics["forgetting_max"] is None


def test_all_metrics_names_every_metric_its_inputs_define():
    assert set(all_metrics(R4, joint=(1, 1, 1, 1), single=(0, 0, 0, 0))) == {
        "acc", "acc_weighted", "avg_incremental_acc", "bwt", "fwt", "forgetting", "forgetting_max",
        "intransigence", "single_task_transfer"}
    bare = AccuracyMatrix(("a", "b"), ((0.5, 0.5), (0.5, 0.5)))
    assert set(all_metrics(bare)) == {"acc", "avg_incremental_acc", "bwt", "forgetting", "forgetting_max"}


@pytest.mark.parametrize("kwargs, message", [
    ({"tasks": (), "after": ()}, "at least one task"),
    ({"tasks": ("a", "b"), "after": ((0.5, 0.5),)}, "2 x 2"),
    ({"tasks": ("a",), "after": ((0.5,),), "before": (0.1, 0.2)}, "before must hold 1"),
])
def test_malformed_matrices_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AccuracyMatrix(**kwargs)


@pytest.mark.parametrize("after, before, where", [
    # off the diagonal: max-based forgetting's max() over column 0 would have skipped it (max(0.5, nan) == 0.5)
    (((0.5, 0.0, 0.0), (float("nan"), 0.5, 0.0), (0.25, 0.5, 0.5)), None, "R[1][0] (task a after training b) is nan"),
    (((0.5, 0.0, 0.0), (0.75, 0.5, 0.0), (0.25, 0.5, float("-inf"))), None,
     "R[2][2] (task c after training c) is -inf"),
    (((0.5, 0.0, 0.0), (0.75, 0.5, 0.0), (0.25, 0.5, 0.5)), (0.25, float("inf"), 0.25),
     "b[1] (task b before training) is inf"),
])
def test_a_non_finite_score_is_one_line_naming_the_run_row_and_column(after, before, where):
    with pytest.raises(MTLConfigError) as caught:
        AccuracyMatrix(("a", "b", "c"), after, before, source="runs/broken")
    message = str(caught.value)
    assert message.startswith(f"runs/broken: {where}, expected a finite score") and "\n" not in message
