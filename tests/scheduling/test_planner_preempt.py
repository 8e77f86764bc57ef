"""Preemption: priority, equal priority, min runtime, minimal victim sets, reclaim, srtf, stopping capacity."""

from __future__ import annotations

from typing import Any

import pytest

from broker.scheduling.model import RunningTask, TaskRequest
from tests.scheduling.helpers import MIN, node, planner, running, snapshot, task


def preempt(run: list[RunningTask], pending: list[TaskRequest], gpus: int = 4, now: float = 100 * MIN,
            nodes: int = 1, **config: Any) -> list[tuple[str, str, tuple[str, ...]]]:
    config.setdefault("preemption", True)
    cluster = [node(f"n{i}", gpus) for i in range(nodes)]
    result = planner(**config).plan(snapshot(cluster, pending, run, now=now))
    return [(p.task_id, p.node_id, tuple(sorted(p.victims))) for p in result.preemptions]


def low(task_id: str, gpus: tuple[int, ...], priority: int = 0, node_id: str = "n0", **kw: Any) -> RunningTask:
    kw.setdefault("preemptible", True)
    return running(task_id, node_id, gpus, priority=priority, **kw)


PREEMPT_TABLE = [
    pytest.param([low("v", (0, 1, 2, 3))], [task("t", 2, priority=5)], {}, [("t", "n0", ("v",))],
                 id="lower priority is preempted"),
    pytest.param([low("v", (0, 1, 2, 3), preemptible=False)], [task("t", 2, priority=5)], {}, [],
                 id="only preemptible tasks"),
    pytest.param([low("v", (0, 1, 2, 3), priority=5)], [task("t", 2, priority=5)], {}, [],
                 id="equal priority: never by default"),
    pytest.param([low("v", (0, 1, 2, 3), priority=5)], [task("t", 2, priority=5)], {"preempt_equal_priority": True},
                 [("t", "n0", ("v",))], id="equal priority when allowed"),
    pytest.param([low("v", (0, 1, 2, 3), priority=9)], [task("t", 2, priority=5)], {"preempt_equal_priority": True},
                 [], id="never a higher priority"),
    pytest.param([low("v", (0, 1, 2, 3), started=99 * MIN)], [task("t", 2, priority=5)], {"min_runtime_s": 120},
                 [], id="min_runtime: ran 60 s of 120"),
    pytest.param([low("v", (0, 1, 2, 3), started=97 * MIN)], [task("t", 2, priority=5)], {"min_runtime_s": 120},
                 [("t", "n0", ("v",))], id="min_runtime: ran 180 s"),
    pytest.param([low("a", (0,), started=10), low("b", (1,), started=20), low("c", (2,), started=30),
                  low("d", (3,), started=40)], [task("t", 2, priority=5)], {},
                 [("t", "n0", ("c", "d"))], id="most recently started go first"),
    pytest.param([low("a", (0,), priority=1), low("b", (1,), priority=3), low("c", (2, 3), priority=0, started=-1)],
                 [task("t", 2, priority=5)], {}, [("t", "n0", ("c",))],
                 id="lowest priority first, and the set is minimal"),
    pytest.param([low("small", (0,), priority=0, started=50), low("big", (1, 2, 3), priority=1)],
                 [task("t", 3, priority=5)], {}, [("t", "n0", ("big",))],
                 id="a victim that is not needed is dropped"),
    pytest.param([low("a", (0,)), low("b", (1,)), low("c", (2,)), running("keep", "n0", (3,))],
                 [task("t", 4, priority=5)], {}, [], id="never useless: would not fit anyway"),
    pytest.param([low("x1", (0,), node_id="n0"), low("x2", (1,), node_id="n0"), low("y", (0, 1), node_id="n1")],
                 [task("t", 2, priority=5)], {"nodes": 2, "gpus": 2}, [("t", "n1", ("y",))],
                 id="the node needing fewest victims"),
    pytest.param([low("s", (0,), share=500, started=1), low("w", (1,))], [task("t", 1, priority=5)],
                 {"gpus": 2}, [("t", "n0", ("s",))], id="ties: least GPU taken from victims"),
]


@pytest.mark.parametrize(("run", "pending", "config", "expected"), PREEMPT_TABLE)
def test_preemption(run: list[RunningTask], pending: list[TaskRequest], config: dict[str, Any],
                    expected: list[tuple[str, str, tuple[str, ...]]]) -> None:
    config = dict(config)
    gpus, nodes = config.pop("gpus", 4), config.pop("nodes", 1)
    assert preempt(run, pending, gpus=gpus, nodes=nodes, **config) == expected


def test_preemption_off() -> None:
    assert preempt([low("v", (0, 1, 2, 3))], [task("t", 2, priority=5)], preemption=False) == []


def test_preemptor_waits_and_holds_the_node() -> None:
    """It is not placed this pass; a lower task may not take what is held for it."""
    run = [low("v", (0, 1))]
    pending = [task("t", 4, priority=5), task("small", 2, priority=1)]
    result = planner(preemption=True).plan(snapshot([node("n0", 4)], pending, run, now=100 * MIN))
    assert result.placements == []
    assert result.waiting["t"].reason == "preempting 1 task on node n0"
    assert result.preemptions[0].reason == "priority 5 > 0"


def test_stopping_capacity_counts_as_coming_back() -> None:
    """v is already stopping for t: nothing more is preempted, and the node is kept for t."""
    run = [low("v", (0, 1), preempting=True), low("w", (2,))]
    pending = [task("t", 3, priority=5), task("other", 1)]
    snap = snapshot([node("n0", 4)], pending, run, now=100 * MIN, preempting_for={"t": "n0"})
    result = planner(preemption=True).plan(snap)
    assert result.preemptions == []
    assert result.placements == []  # GPU 3 is free, but held for t
    assert result.waiting["t"].reason == "waiting for preempted tasks to stop on node n0"


def test_stopping_for_another_node_does_not_block() -> None:
    run = [low("v", (0, 1), preempting=True)]
    snap = snapshot([node("n0", 4)], [task("t", 2, priority=5), task("other", 2, priority=1)], run,
                    now=100 * MIN, preempting_for={"t": "n0"})
    result = planner(preemption=True).plan(snap)
    assert [p.task_id for p in result.placements] == ["t"]  # it fits elsewhere on the node now
    assert result.preemptions == []


def test_reclaim_choosing_borrowers() -> None:
    """a is owed 4 GPUs and uses 2; b (guarantee 4) borrows 2 at high priority: a reclaims from b."""
    tenants = {"a": {"guarantee": {"gpus": 4}}, "b": {"guarantee": {"gpus": 4}}}
    run = [low("a1", (0, 1), tenant="a"), low("b1", (2,), tenant="b", priority=9), low("b2", (3,), tenant="b",
           priority=9), low("b3", (4, 5), tenant="b", priority=9), low("b4", (6, 7), tenant="b", priority=9)]
    got = preempt(run, [task("t", 2, tenant="a", priority=0)], gpus=8, ordering="fair", tenants=tenants)
    assert got == [("t", "n0", ("b1", "b2"))]  # the borrower's, whatever their priority; never a's own


def test_reclaim_only_while_under_guarantee() -> None:
    tenants = {"a": {"guarantee": {"gpus": 2}}, "b": {"guarantee": {"gpus": 2}}}
    run = [low("a1", (0, 1), tenant="a"), low("b1", (2, 3), tenant="b"), low("b2", (4, 5, 6, 7), tenant="b")]
    got = preempt(run, [task("t", 2, tenant="a", priority=9)], gpus=8, ordering="fair", tenants=tenants)
    # a would exceed its guarantee, so b's tasks are safe (across tenants only reclaim
    # preempts); within its own tenant priority still does (Kueue's withinClusterQueue).
    assert got == [("t", "n0", ("a1",))]
    alone = preempt([*run[1:], low("c1", (0, 1), tenant="c")], [task("t", 2, tenant="a", priority=9)], gpus=8,
                    ordering="fair", tenants={"a": {"guarantee": {"gpus": 0}}, "b": {"guarantee": {"gpus": 2}}})
    assert alone == []


def test_reclaim_stops_once_the_lender_is_within_its_guarantee() -> None:
    tenants = {"a": {"guarantee": {"gpus": 6}}, "b": {"guarantee": {"gpus": 3}}}
    run = [low("b1", (0,), tenant="b"), low("b2", (1,), tenant="b"), low("b3", (2,), tenant="b"),
           low("b4", (3,), tenant="b")]
    got = preempt(run, [task("t", 4, tenant="a")], gpus=4, ordering="fair", tenants=tenants)
    assert got == []  # only one of b's tasks is borrowed: taking more would go below b's guarantee


SRTF_TABLE = [
    pytest.param(low("long", (0, 1, 2, 3), est=600 * MIN, started=90 * MIN), task("short", 1, est=10 * MIN),
                 [("short", "n0", ("long",))], id="590 min left > 2 x 10 min"),
    pytest.param(low("long", (0, 1, 2, 3), est=110 * MIN), task("short", 1, est=10 * MIN),
                 [], id="10 min left: not worth it"),
    pytest.param(low("long", (0, 1, 2, 3), est=600 * MIN, priority=3), task("short", 1, est=10 * MIN), [],
                 id="never a higher priority"),
    pytest.param(low("long", (0, 1, 2, 3)), task("short", 1, est=10 * MIN), [], id="unknown remaining time"),
]


@pytest.mark.parametrize(("victim", "pending", "expected"), SRTF_TABLE)
def test_srtf(victim: RunningTask, pending: TaskRequest, expected: list[tuple[str, str, tuple[str, ...]]]) -> None:
    assert preempt([victim], [pending], ordering="srtf") == expected
    assert preempt([victim], [pending], ordering="sjf") == []


def test_preemptions_per_pass_caps_how_many_tasks_start_preempting() -> None:
    from broker.scheduling.config import SchedulingConfig
    from broker.scheduling.model import NodeFree, RunningTask, Snapshot, TaskRequest
    from broker.scheduling.planner import Planner

    nodes = [NodeFree(f"n{i}", 1000, [0], [0], 0, 0, 1, {}, 0, 0, 2) for i in range(4)]
    running = [RunningTask(f"low{i}", f"n{i}", (0,), 1000, 1000, 0, 0, priority=0, preemptible=True)
               for i in range(4)]
    urgent = [TaskRequest(f"hi{i}", 1, priority=5, seq=i) for i in range(4)]
    for cap, expected in ((0, 0), (2, 2), (64, 4)):
        config = SchedulingConfig.parse({"preemptions_per_pass": cap})
        plan = Planner(config).plan(Snapshot(100.0, nodes, urgent, running))
        assert len(plan.preemptions) == expected, (cap, plan.preemptions)
