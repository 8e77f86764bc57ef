"""Preemption that does not thrash: a per-task budget, and victims chosen by the work they would lose."""

from __future__ import annotations

import dataclasses

import pytest

from broker.scheduling.config import SchedulingConfig
from tests.scheduling.helpers import MIN, task
from tests.scheduling.test_planner_preempt import low, preempt


@pytest.mark.parametrize(("stopped", "budget", "expected"), [
    (0, 3, True), (2, 3, True), (3, 3, False), (7, None, True), (1, 0, False)])
def test_a_task_stopped_max_preemptions_times_is_stopped_no_more(stopped: int, budget: int | None,
                                                                expected: bool) -> None:
    victim = dataclasses.replace(low("v", (0, 1, 2, 3)), preemptions=stopped)
    found = preempt([victim], [task("t", 2, priority=5)], max_preemptions=budget)
    assert found == ([("t", "n0", ("v",))] if expected else [])


def test_the_budget_is_three_by_default() -> None:
    assert SchedulingConfig().max_preemptions == 3


def test_srtf_leaves_a_restarted_long_job_alone_once_its_budget_is_spent() -> None:
    """The Philly case: a long job, restarted from scratch, looked long again to srtf each time."""
    long_job = low("long", (0, 1, 2, 3), started=99 * MIN, est=24 * 60 * MIN)
    short = task("short", 4, est=10 * MIN)
    assert preempt([long_job], [short], ordering="srtf") == [("short", "n0", ("long",))]
    spent = dataclasses.replace(long_job, preemptions=3)
    assert preempt([spent], [short], ordering="srtf") == []


def test_a_recent_checkpoint_makes_the_older_task_the_cheaper_victim() -> None:
    """Without checkpoints the most recently started goes (it has least to redo); "old" started
    90 minutes ago but checkpointed a minute ago, so stopping it loses 1 minute against 10."""
    old = dataclasses.replace(low("old", (0, 1), started=10 * MIN), checkpoint_at=99 * MIN)
    new = low("new", (2, 3), started=90 * MIN)
    assert preempt([old, new], [task("t", 2, priority=5)]) == [("t", "n0", ("old",))]
    assert preempt([dataclasses.replace(old, checkpoint_at=None), new],
                   [task("t", 2, priority=5)]) == [("t", "n0", ("new",))]


def test_among_nodes_the_one_losing_least_work() -> None:
    """One victim of 2 GPUs either way: n1's checkpointed 5 minutes ago, n0's ran 50 minutes unsaved."""
    a = low("a", (0, 1), node_id="n0", started=50 * MIN)
    b = dataclasses.replace(low("b", (0, 1), node_id="n1", started=10 * MIN), checkpoint_at=95 * MIN)
    assert preempt([a, b], [task("t", 2, priority=5)], nodes=2, gpus=2) == [("t", "n1", ("b",))]


def test_work_at_risk() -> None:
    run = low("r", (0,), started=100.0)
    assert run.work_at_risk(160.0) == 60.0
    assert dataclasses.replace(run, checkpoint_at=150.0).work_at_risk(160.0) == 10.0
    assert dataclasses.replace(run, checkpoint_at=50.0).work_at_risk(160.0) == 60.0  # a previous attempt's
