"""Policy tables: ordering, skip-ahead and best-fit placement, with no Redis anywhere."""

from __future__ import annotations

import pytest

from broker.scheduling.model import NodeFree, Placement, TaskRequest
from broker.scheduling.ordering import queue_order
from broker.scheduling.placement.best_fit import plan

GiB = 1024


def node(node_id: str, gpus: int = 0, mem: int = 80 * GiB, used: dict[int, tuple[int, int]] | None = None,
         cpus: int = 64, ram: int = 512 * GiB, slots: int = 16, **labels: str) -> NodeFree:
    """A node with ``gpus`` GPUs; ``used`` maps index -> (milli, MiB) already taken."""
    used = used or {}
    return NodeFree(node_id, mem, [1000 - used.get(i, (0, 0))[0] for i in range(gpus)],
                    [mem - used.get(i, (0, 0))[1] for i in range(gpus)], cpus * 1000, ram, slots, labels)


def task(task_id: str, gpus: float = 0, gpu_mem: int = 0, cpus: float = 0, ram: int = 0, priority: int = 0,
         seq: int = 0, **labels: str) -> TaskRequest:
    whole = int(gpus) if gpus >= 1 else 0
    milli = round(gpus * 1000) if 0 < gpus < 1 else 0
    return TaskRequest(task_id, whole, milli, gpu_mem, round(cpus * 1000), ram, tuple(sorted(labels.items())),
                       priority, seq)


def test_order_is_priority_then_submit_order() -> None:
    tasks = [task("a", priority=0, seq=1), task("b", priority=5, seq=3), task("c", priority=5, seq=2),
             task("d", priority=-1, seq=0)]
    assert [t.id for t in queue_order(tasks)] == ["c", "b", "a", "d"]


PLACEMENT_TABLE = [
    pytest.param(
        [node("big", 8), node("small", 2)], [task("t", 2)], [Placement("t", "small", (0, 1))],
        id="whole GPUs go to the node they fill best"),
    pytest.param(
        [node("a", 4, used={0: (1000, 80 * GiB), 2: (1000, 80 * GiB)}), node("b", 4)], [task("t", 2)],
        [Placement("t", "a", (1, 3))], id="best fit counts wholly free GPUs and names their indices"),
    pytest.param(
        [node("a", 2, used={0: (300, 1000)})], [task("t", 2)], [],
        id="a whole-GPU task never takes a partly used GPU"),
    pytest.param(
        [node("a", 8)], [task("huge", 16), task("small", 1)], [Placement("small", "a", (0,))],
        id="a task that does not fit does not block smaller ones"),
    pytest.param(
        [node("a", 4, mem=40 * GiB), node("b", 4, mem=80 * GiB)], [task("t", 1, gpu_mem=60 * GiB)],
        [Placement("t", "b", (0,))], id="gpu_memory_mb per GPU selects nodes with big enough GPUs"),
    pytest.param(
        [node("a", 2, used={0: (500, 40 * GiB)}), node("b", 2)], [task("t", 0.5)],
        [Placement("t", "a", (0,))], id="a share goes to the GPU it fills best"),
    pytest.param(
        [node("a", 2, used={0: (500, 40 * GiB)})], [task("x", 0.6), task("y", 0.5), task("z", 0.3)],
        [Placement("x", "a", (1,)), Placement("y", "a", (0,)), Placement("z", "a", (1,))],
        id="shares pack: 0.6 on the free GPU, 0.5 fills GPU0, 0.3 joins 0.6"),
    pytest.param(
        [node("a", 1)], [task("x", 0.5), task("y", 0.5), task("z", 0.5)],
        [Placement("x", "a", (0,)), Placement("y", "a", (0,))], id="shares never exceed one GPU"),
    pytest.param(
        [node("a", 1, mem=10 * GiB)], [task("x", 0.25, gpu_mem=8 * GiB), task("y", 0.25, gpu_mem=4 * GiB)],
        [Placement("x", "a", (0,))], id="explicit GPU memory of shares is a limit too"),
    pytest.param(
        [node("gpu", 8), node("cpu", 0)], [task("t", cpus=4)], [Placement("t", "cpu", ())],
        id="CPU tasks prefer nodes without GPUs"),
    pytest.param(
        [node("a", 0, cpus=8), node("b", 0, cpus=4)], [task("t", cpus=3)], [Placement("t", "b", ())],
        id="CPU tasks take the tightest CPU fit"),
    pytest.param(
        [node("a", 2, gpu_model="A100"), node("b", 8, gpu_model="H100")], [task("t", 1, gpu_model="H100")],
        [Placement("t", "b", (0,))], id="labels select nodes"),
    pytest.param(
        [node("a", 8, cpus=2)], [task("x", 1, cpus=2), task("y", 1, cpus=1)], [Placement("x", "a", (0,))],
        id="CPU is checked with GPUs"),
    pytest.param(
        [node("a", 8, slots=1)], [task("x", 1), task("y", 1)], [Placement("x", "a", (0,))],
        id="slots bound concurrent tasks"),
    pytest.param(
        [node("a", 8, ram=100)], [task("x", ram=200), task("y", ram=50)], [Placement("y", "a", ())],
        id="RAM is checked"),
]


@pytest.mark.parametrize(("nodes", "tasks", "expected"), PLACEMENT_TABLE)
def test_placement(nodes: list[NodeFree], tasks: list[TaskRequest], expected: list[Placement]) -> None:
    assert plan(tasks, nodes) == expected


def test_plan_fills_a_cluster_exactly_and_never_double_books() -> None:
    nodes = [node(f"n{i}", 8) for i in range(10)]
    tasks = [task(f"t{i}", 1 + i % 3, seq=i) for i in range(60)]
    placements = plan(tasks, nodes)
    held = [(p.node_id, g) for p in placements for g in p.gpu_indices]
    assert len(held) == len(set(held)) == 80  # every GPU used once; the rest wait
    by_id = {t.id: t for t in tasks}
    assert all(len(p.gpu_indices) == by_id[p.task_id].whole_gpus for p in placements)


def test_plan_leaves_the_snapshot_untouched() -> None:
    nodes = [node("a", 1)]
    assert plan([task("x", 1), task("y", 1)], nodes) == [Placement("x", "a", (0,))]
    assert nodes == [node("a", 1)]
    assert plan([task("y", 1)], nodes) == [Placement("y", "a", (0,))]
