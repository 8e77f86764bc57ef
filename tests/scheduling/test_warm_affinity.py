"""Warm affinity (issue 14): a task whose name a warm pool process last ran takes that node and
exact GPU set when it is free and fits; else a set no warm process holds when one fits as well;
otherwise it is placed as without affinity."""

from __future__ import annotations

import dataclasses

import pytest

from broker.scheduling.model import WarmMap
from broker.scheduling.placement import PlacementKind
from broker.scheduling.placement.best_fit import propose
from broker.scheduling.placement.warm import WARM_SCAN
from tests.scheduling.helpers import node, placed, planner, running, snapshot, task

WARM_A = WarmMap.of({"A": {"b": [(1,)]}})  # a process on node b, warm for GPU 1, last ran A


def two_nodes() -> list:
    return [node("a", gpus=2), node("b", gpus=2)]


def lazy(tasks: list, nodes: list, warm: WarmMap | None) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {p.task_id: (p.node_id, p.gpu_indices) for p in propose(tasks, nodes, warm=warm)}


def test_a_task_goes_to_the_gpu_set_warm_for_its_name_though_another_comes_first() -> None:
    tasks = [task("t1", 1, name="A")]
    assert lazy(tasks, two_nodes(), None) == {"t1": ("a", (0,))}  # the default order
    assert lazy(tasks, two_nodes(), WARM_A) == {"t1": ("b", (1,))}


@pytest.mark.parametrize("kind", [k.value for k in PlacementKind])
def test_every_placer_of_the_full_planner_prefers_the_warm_set(kind: str) -> None:
    plan = planner(placement=kind).plan(snapshot(two_nodes(), [task("t1", 1, name="A")], warm=WARM_A))
    assert placed(plan) == {"t1": ("b", (1,))}


def test_gangs_and_cpu_tasks_are_placed_as_before() -> None:
    tasks = [task("other", 1, name="B"), task("cpu", 0, cpus=1, name="A"),
             dataclasses.replace(task("gang", 1, name="A"), replicas=2)]
    without = lazy(tasks[:2], two_nodes(), None)
    assert lazy(tasks[:2], two_nodes(), WARM_A) == without
    gangs = [planner().plan(snapshot(two_nodes(), [tasks[2]], warm=warm)).gangs for warm in (WarmMap(), WARM_A)]
    assert gangs[0] == gangs[1] and gangs[0]


def test_a_busy_warm_set_is_not_waited_for() -> None:
    nodes = two_nodes()
    plan = planner().plan(snapshot(nodes, [task("t1", 1, name="A")], [running("r", "b", (1,))], warm=WARM_A))
    assert placed(plan)["t1"][0] == "a" or placed(plan)["t1"] == ("b", (0,))  # placed, not on the busy GPU
    assert placed(plan)["t1"] != ("b", (1,))


def test_priority_order_holds_the_first_task_of_the_name_gets_the_warm_set() -> None:
    tasks = [task("t1", 1, name="A", priority=5), task("t2", 1, name="A")]
    got = lazy(tasks, two_nodes(), WARM_A)
    assert got["t1"] == ("b", (1,)) and got["t2"] != ("b", (1,))


def test_the_set_must_fit_the_request_exactly() -> None:
    wide = lazy([task("t2", 2, name="A")], two_nodes(), WARM_A)  # two GPUs: the warm set of one is not it
    assert wide == lazy([task("t2", 2, name="A")], two_nodes(), None)
    two = WarmMap.of({"A": {"b": [(0, 1)]}})
    assert lazy([task("t2", 2, name="A")], two_nodes(), two) == {"t2": ("b", (0, 1))}
    share = lazy([task("s", 0.5, name="A")], two_nodes(), WARM_A)  # a share takes the warm GPU
    assert share == {"s": ("b", (1,))}


def test_labels_and_capacity_still_decide() -> None:
    nodes = [node("a", gpus=2, zone="x"), node("b", gpus=2, zone="y")]
    assert lazy([task("t1", 1, name="A", zone="x")], nodes, WARM_A) == {"t1": ("a", (0,))}
    small = [node("a", gpus=2), node("b", gpus=2, cpus=1)]
    assert lazy([task("t1", 1, cpus=2, name="A")], small, WARM_A) == {"t1": ("a", (0,))}
    gone = WarmMap.of({"A": {"c": [(0,)], "b": [(7,)]}})  # a node not schedulable, an index it has not
    assert lazy([task("t1", 1, name="A")], two_nodes(), gone) == {"t1": ("a", (0,))}


def test_a_less_preferred_warm_node_loses_to_the_preferred_one() -> None:
    nodes = [node("a", gpus=2, gpu="H100"), node("b", gpus=2, gpu="A100")]
    wants = task("t1", 1, name="A", prefer={"gpu": ["H100", "A100"]})
    assert placed(planner().plan(snapshot(nodes, [wants], warm=WARM_A))) == {"t1": ("a", (0,))}


def test_another_name_takes_a_set_no_warm_process_holds_on_the_same_node() -> None:
    warm = WarmMap.of({"A": {"a": [(0,)]}})  # default order would take a's GPU 0, making A's process exit
    assert lazy([task("t", 1, name="B")], two_nodes(), warm) == {"t": ("a", (1,))}
    assert placed(planner().plan(snapshot(two_nodes(), [task("t", 1, name="B")], warm=warm))) == {"t": ("a", (1,))}
    share = lazy([task("s", 0.5, name="B")], two_nodes(), warm)
    assert share == {"s": ("a", (1,))}


def test_the_lazy_planner_looks_on_further_nodes_for_a_cold_set() -> None:
    warm = WarmMap.of({"A": {"a": [(0,)]}, "B": {"a": [(1,)]}})
    assert lazy([task("t", 1, name="C")], two_nodes(), warm) == {"t": ("b", (0,))}
    everywhere = WarmMap.of({"A": {"a": [(0,)], "b": [(0,)]}, "B": {"a": [(1,)], "b": [(1,)]}})
    assert lazy([task("t", 1, name="C")], two_nodes(), everywhere) == {"t": ("a", (0,))}  # nothing cold: as before


def test_a_node_whose_every_slot_is_warm_has_no_cold_set() -> None:
    nodes = [node("a", gpus=2, slots=1), node("b", gpus=2, slots=1)]  # one pool process each
    warm = WarmMap.of({"A": {"a": [(0,)]}})
    assert lazy([task("t", 1, name="B")], nodes, warm) == {"t": ("b", (0,))}  # a's GPU 1 would evict A too


def test_a_task_looks_at_a_bounded_number_of_warm_sets() -> None:
    nodes = [node(f"n{i:02}", gpus=2) for i in range(WARM_SCAN + 6)]
    for n in nodes[:-1]:  # A's warm set is busy everywhere but on the last node
        n.free_milli[0] = n.free_mem[0] = 0
    warm = WarmMap.of({"A": {n.id: [(0,)] for n in nodes}})
    assert lazy([task("t", 1, name="A")], nodes, warm)["t"][0] != nodes[-1].id
    fewer = WarmMap.of({"A": {n.id: [(0,)] for n in nodes[WARM_SCAN - 1:]}})  # within the bound: found
    assert lazy([task("t", 1, name="A")], nodes, fewer)["t"] == (nodes[-1].id, (0,))
