"""Modes (strict, best_effort, backfill), reasons and estimated starts, and bad snapshots."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from broker.scheduling.model import NodeFree, RunningTask, Snapshot, TaskRequest
from tests.scheduling.helpers import MIN, node, order_of, planner, running, snapshot, task


def backfill_case(j3_minutes: float) -> tuple[list[NodeFree], list[TaskRequest], list[RunningTask]]:
    """One node of 32 GPUs; J1 (priority 10, 1 GPU, 10 min) runs; J2 (priority 5, 32 GPUs) and J3
    (priority 1, 31 GPUs) wait."""
    pending = [task("J2", 32, priority=5, est=60 * MIN), task("J3", 31, priority=1, est=j3_minutes * MIN)]
    return [node("n", 32)], pending, [running("J1", "n", (0,), priority=10, est=10 * MIN)]


MODE_TABLE = [
    pytest.param("backfill", 5, ["J3"], id="backfill: J3 ends before J2's hold starts"),
    pytest.param("backfill", 60, [], id="backfill: J3 would delay J2"),
    pytest.param("best_effort", 60, ["J3"], id="best_effort: skip-ahead regardless"),
    pytest.param("strict", 5, [], id="strict: J3 waits behind J2"),
]


@pytest.mark.parametrize(("mode", "minutes", "expected"), MODE_TABLE)
def test_backfill_example(mode: str, minutes: float, expected: list[str]) -> None:
    result = planner(mode=mode).plan(snapshot(*backfill_case(minutes)))
    assert order_of(result) == expected
    assert result.waiting["J2"].position == 1
    if mode == "backfill":
        assert result.waiting["J2"].estimated_start == 10 * MIN  # held from J1's end


def test_backfill_reasons_and_etas() -> None:
    result = planner(mode="backfill").plan(snapshot(*backfill_case(60)))
    assert result.waiting["J2"].reason == "needs 32 GPUs on one node; largest free block is 31"
    assert result.waiting["J3"].reason == "held for higher-ranked task J2 (backfill)"
    assert result.waiting["J3"].estimated_start == 70 * MIN  # after J2's hour


def test_backfill_unknown_runtime_never_ends() -> None:
    nodes, tasks, run = backfill_case(5)
    tasks[1].estimate_s = None
    assert order_of(planner(mode="backfill").plan(snapshot(nodes, tasks, run))) == []


def test_backfill_uses_capacity_not_held() -> None:
    """J2's hold is on node n; a long task fits on node m now."""
    nodes, tasks, run = backfill_case(60)
    result = planner(mode="backfill").plan(snapshot([*nodes, node("m", 2)], [*tasks, task("J4", 2, est=99 * MIN)], run))
    assert order_of(result) == ["J4"]


def test_backfill_hold_cap() -> None:
    """Beyond the cap, blocked tasks get no hold: a long task may then take what would have been held."""
    from broker.scheduling.config import SchedulingConfig
    from broker.scheduling.planner import Planner

    nodes, tasks, run = backfill_case(60)
    config = SchedulingConfig.parse({"mode": "backfill", "preemption": False})
    assert order_of(Planner(config, max_holds=0).plan(snapshot(nodes, tasks, run))) == ["J3"]


def test_strict_blocks_everything_behind_the_first() -> None:
    tasks = [task("a", 1, priority=9), task("big", 8, priority=5), task("c", 1, priority=1)]
    result = planner(mode="strict").plan(snapshot([node("n", 4)], tasks))
    assert order_of(result) == ["a"]
    assert result.waiting["c"].reason == "behind big (strict order)"
    assert result.waiting["c"].position == 3


REASON_TABLE = [
    pytest.param([node("n", 8, gpu="A100")], task("t", 1, gpu="H100"), [], "no node has labels gpu=H100",
                 id="labels"),
    pytest.param([node("n", 8, gpu="A100")], task("t", 1, prefer={"gpu": ["H100", "V100"]}), [],
                 "no node has labels gpu=H100|V100", id="preference lists"),
    pytest.param([node("n", 8)], task("t", 8), [running("r", "n", (0, 1, 2, 3))],
                 "needs 8 GPUs on one node; largest free block is 4", id="whole GPUs"),
    pytest.param([node("n", 4)], task("t", 8), [], "needs 8 GPUs on one node; no matching node has that many",
                 id="no node that big"),
    pytest.param([node("n", 1)], task("t", 0.6), [running("r", "n", (0,), share=500)],
                 "needs 0.6 of one GPU; largest free share is 0.5", id="shares"),
    pytest.param([node("n", 2, cpus=8)], task("t", 1, cpus=16), [],
                 "needs 16 CPUs on one node beside its GPUs; most free is 8", id="CPUs"),
    pytest.param([node("n", 0, ram=1000)], task("t", ram=4000), [running("r", "n", ram=500)],
                 "needs 4000 MiB of memory on one node; most free is 500", id="memory"),
    pytest.param([node("n", 2, slots=1)], task("t", 1), [running("r", "n", (0,))],
                 "no free task slot on a node beside its GPUs", id="slots"),
]


@pytest.mark.parametrize(("nodes", "pending", "run", "reason"), REASON_TABLE)
def test_reasons(nodes: list[NodeFree], pending: TaskRequest, run: list[RunningTask], reason: str) -> None:
    result = planner().plan(snapshot(nodes, [pending], run))
    assert result.waiting[pending.id].reason == reason


ETA_TABLE = [
    pytest.param([running("r1", "n", (0, 1), est=100), running("r2", "n", (2, 3), est=300)], task("t", 3), 100.0,
                 id="first expected end that frees enough"),
    pytest.param([running("r1", "n", (0, 1), est=100), running("r2", "n", (2, 3), est=300)], task("t", 6), 300.0,
                 id="needs both to end"),
    pytest.param([running("r1", "n", (0, 1), est=100), running("r2", "n", (2, 3))], task("t", 6), None,
                 id="unknown end: unknown start"),
    pytest.param([running("r1", "n", (0, 1), started=-500, est=100), running("r2", "n", (2, 3), est=300)],
                 task("t", 3), 300.0, id="an overdue task is not free now: the next release is r2's"),
    pytest.param([running("r1", "n", (0, 1, 2, 3), started=-500, est=100)], task("t", 4), 500.0,
                 id="an overdue task's estimate moves with it: as long again as it has run"),
]


@pytest.mark.parametrize(("run", "pending", "eta"), ETA_TABLE)
def test_estimated_start(run: list[RunningTask], pending: TaskRequest, eta: float | None) -> None:
    result = planner().plan(snapshot([node("n", 6)], [pending], run))
    assert result.waiting[pending.id].estimated_start == eta


def test_learned_runtime_of_running_tasks_feeds_eta() -> None:
    run = [running("r", "n", (0,), name="train", started=50)]
    result = planner().plan(snapshot([node("n", 1)], [task("t", 1)], run, runtimes={("train", (1, 0)): 200.0}))
    assert result.waiting["t"].estimated_start == 250.0


def test_explain_limit() -> None:
    tasks = [task(f"t{i}", 2) for i in range(5)]
    result = planner(explain_limit=3).plan(snapshot([node("n", 1)], tasks))
    assert sorted(w.position for w in result.waiting.values()) == [1, 2, 3]


BAD_SNAPSHOTS = [
    pytest.param(lambda: snapshot([node("n", 1)], [task("a", 1), task("a", 1)]), r"pending\[1\]\.id: 'a' appears twice",
                 id="duplicate id"),
    pytest.param(lambda: snapshot([node("n", 1)], [task("a", 1, est=-1)]), r"pending\[0\]\.estimate_s: must be",
                 id="negative estimate"),
    pytest.param(lambda: Snapshot(0.0, [node("n", 1)], [], [running("r", "n", (3,))]),
                 r"running\[0\]\.gpu_indices: \(3,\) outside node n's 1 GPUs", id="GPU index out of range"),
]


@pytest.mark.parametrize(("build", "message"), BAD_SNAPSHOTS)
def test_bad_snapshot_named(build: Callable[[], Snapshot], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        planner().plan(build())
