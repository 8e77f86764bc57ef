"""Task names nodes run, and rate limits, in every planner: a task goes only where its name is
run, and a rate-limited name starts no more than its budget allows."""

from __future__ import annotations

import dataclasses

import pytest

from broker.scheduling.model import NodeFree
from broker.scheduling.placement import PlacementKind, make_placer
from broker.scheduling.placement.best_fit import propose
from tests.scheduling.helpers import node, placed, planner, snapshot, task


def serving(n: NodeFree, *names: str) -> NodeFree:
    return dataclasses.replace(n, serves=frozenset(names))


@pytest.mark.parametrize("kind", list(PlacementKind))
def test_every_placer_places_a_task_only_where_its_name_runs(kind: PlacementKind) -> None:
    nodes = [serving(node("a", 8), "other"), serving(node("b", 8), "train", "other"), node("c", 1)]
    placer = make_placer(kind, nodes, {(1, 0): 1})
    assert placer.place(task("t1", 2, name="train")).node_id == "b"  # c runs anything but has one GPU
    assert placer.place(task("t2", 8, name="train")) is None  # only b runs it, and b is partly taken now


def test_the_planner_says_when_no_node_runs_the_name() -> None:
    plan = planner().plan(snapshot([serving(node("a", 8), "other")], [task("t", 1, name="train")]))
    assert plan.placements == []
    assert plan.waiting["t"].reason.startswith("no node runs task train")
    assert planner().plan(snapshot([], [task("u", 1, name="train")])).waiting["u"].reason.startswith("no node is up")


def test_the_planner_starts_no_more_than_a_rate_limited_name_may() -> None:
    tasks = [task(f"t{i}", 1, name="infer") for i in range(4)] + [task("free", 1, name="other")]
    plan = planner().plan(snapshot([node("a", 8)], tasks, rate_limits={"infer": (0.5, 2.4)}))
    assert sorted(placed(plan)) == ["free", "t0", "t1"]  # 2 whole starts in the bucket
    waiting = plan.waiting["t2"]
    assert waiting.reason.startswith("rate limited: task infer starts at most 0.5 times a second")
    assert waiting.estimated_start is not None and waiting.estimated_start == pytest.approx(1.2)  # (1 - 0.4) / 0.5
    assert plan.tokens["infer"] == pytest.approx(0.4)


def test_the_lazy_spine_keeps_the_same_budget() -> None:
    tokens = {"infer": 1.0}
    tasks = [task("t0", 1, name="infer"), task("t1", 1, name="infer"), task("x", 1, name="other")]
    assert [p.task_id for p in propose(tasks, [node("a", 8)], tokens)] == ["t0", "x"]
    assert tokens == {"infer": 0.0}
    # A task that does not fit takes no start from the bucket.
    tokens = {"infer": 1.0}
    assert [p.task_id for p in propose([task("big", 9, name="infer"), task("t", 1, name="infer")],
                                       [node("a", 8)], tokens)] == ["t"]
