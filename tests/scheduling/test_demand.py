"""scheduling.demand: how many more nodes of each shape the planner itself would need to place the
pending tasks now (gpubroker_wanted_nodes)."""

from __future__ import annotations

from dataclasses import replace

from broker.scheduling.config import SchedulingConfig
from broker.scheduling.demand import shape_label, shape_of, templates, wanted_nodes
from broker.scheduling.model import NodeFree, RunningTask, TaskRequest
from tests.scheduling.helpers import node, running, snapshot, task

CONFIG = SchedulingConfig.parse({"preemption": False})
BIG, SMALL = (8, 80 * 1024, 64_000, 512 * 1024), (1, 80 * 1024, 64_000, 512 * 1024)


def full_cluster(pending: int) -> tuple[list[NodeFree], list[TaskRequest], list[RunningTask]]:
    """Two 8-GPU nodes, each held whole by a running task, and ``pending`` 8-GPU tasks."""
    nodes = [node("a", 8), node("b", 8)]
    run = [running("r1", "a", tuple(range(8))), running("r2", "b", tuple(range(8)))]
    return nodes, [task(f"t{i}", 8) for i in range(pending)], run


def test_three_8_gpu_tasks_on_a_full_cluster_of_8_gpu_nodes_want_three_more() -> None:
    nodes, pending, run = full_cluster(3)
    small = node("c", 1)
    snap = snapshot([*nodes, small], pending, run)
    assert wanted_nodes(CONFIG, snap, templates(snap.nodes)) == {BIG: 3, SMALL: 0}  # no 1-GPU node holds one
    assert shape_label(BIG) == "gpus=8,gpu_memory_mb=81920,cpus=64,memory_mb=524288"


def test_none_once_the_capacity_is_there() -> None:
    nodes, pending, run = full_cluster(3)
    more = [node(f"new{i}", 8) for i in range(3)]
    snap = snapshot([*nodes, *more], pending, run)
    assert wanted_nodes(CONFIG, snap, templates(snap.nodes)) == {BIG: 0}
    assert wanted_nodes(CONFIG, snapshot([node("a", 8)], []), templates([node("a", 8)])) == {BIG: 0}


def test_small_tasks_are_packed_onto_as_few_new_nodes_as_the_planner_would() -> None:
    nodes, _, run = full_cluster(0)
    pending = [task(f"t{i}", 2) for i in range(9)]  # 18 GPUs: three 8-GPU nodes (4 + 4 + 1 tasks)
    snap = snapshot(nodes, pending, run)
    assert wanted_nodes(CONFIG, snap, templates(snap.nodes)) == {BIG: 3}
    # a node's slots count too: two tasks per node at most
    slim = replace(node("a", 8), free_slots=2, cap_slots=2)
    assert wanted_nodes(CONFIG, snapshot([slim], []), {shape_of(slim): slim}) == {BIG: 0}
    assert wanted_nodes(CONFIG, snapshot([], pending), {shape_of(slim): slim}) == {BIG: 5}


def test_only_what_nodes_can_fix_counts() -> None:
    def wanted(**rate_limits: tuple[float, float]) -> dict[tuple[int, int, int, int], int]:
        nodes, pending, run = full_cluster(1)
        labelled = [task("gpu-kind", 1, gpu="H100")]  # no node of the shape has the label
        infer = [task(f"infer{i}", 1, name="infer") for i in range(4)]
        snap = snapshot(nodes, [*pending, *labelled, *infer], run, rate_limits=rate_limits)
        return wanted_nodes(CONFIG, snap, templates(snap.nodes))

    assert wanted() == {BIG: 2}  # the 8-GPU task's node, and one for the four 1-GPU tasks
    assert wanted(infer=(0.1, 0.0)) == {BIG: 1}  # no start allowed now: more nodes would not start them


def test_a_gang_wants_a_node_per_member_when_spread() -> None:
    nodes, _, run = full_cluster(0)
    gang = replace(task("g", 4), replicas=3, spread=True)
    snap = snapshot(nodes, [gang], run)
    assert wanted_nodes(CONFIG, snap, templates(snap.nodes)) == {BIG: 3}
    nodes, _, run = full_cluster(0)
    together = replace(task("h", 4), replicas=4)
    assert wanted_nodes(CONFIG, snapshot(nodes, [together], run), templates(nodes)) == {BIG: 2}


def test_an_elastic_task_wants_a_node_its_minimum_fits_on() -> None:
    """16 GPUs at most, 1 at least: a 1-GPU node would run it, so one is wanted."""
    nodes, _pending, run = full_cluster(0)
    small = node("c", 1)
    snap = snapshot([*nodes, small], [replace(task("e", 16), min_gpus=1)], [*run, running("r3", "c", (0,))])
    assert wanted_nodes(CONFIG, snap, templates(snap.nodes)) == {BIG: 1, SMALL: 1}
