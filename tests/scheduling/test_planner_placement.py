"""Placers: best_fit (same as the spine's BestFit), spread, first_fit, labels and preferences, views."""

from __future__ import annotations

import random

import pytest

from broker.scheduling.config import PlacementKind
from broker.scheduling.model import NodeFree, Placement, TaskRequest
from broker.scheduling.placement import make_placer
from broker.scheduling.placement.best_fit import BestFitPlacer, plan
from broker.scheduling.placement.first_fit import FirstFitPlacer
from broker.scheduling.placement.frag_aware import FragAware
from broker.scheduling.placement.spread import SpreadPlacer
from broker.scheduling.timeline import Hold, Timeline, Usage
from tests.scheduling.helpers import GiB, node, placed, planner, running, snapshot, task


def place_all(kind: str, nodes: list[NodeFree], tasks: list[TaskRequest]) -> list[Placement]:
    placer = make_placer(kind, nodes)
    return [p for t in tasks if (p := placer.place(t)) is not None]


def used(n: NodeFree, gpu: int, milli: int) -> NodeFree:
    n.free_milli[gpu] -= milli
    n.free_mem[gpu] -= n.gpu_memory_mb * milli // 1000
    return n


PLACEMENT_TABLE = [
    # (placement, nodes, tasks, expected placements)
    pytest.param("best_fit", [node("big", 8), node("small", 2)], [task("t", 2)], [("t", "small", (0, 1))],
                 id="best_fit: fewest wholly free GPUs that fit"),
    pytest.param("spread", [node("big", 8), node("small", 2)], [task("t", 2)], [("t", "big", (0, 1))],
                 id="spread: most wholly free GPUs"),
    pytest.param("first_fit", [node("b", 2), node("a", 8)], [task("t", 2)], [("t", "a", (0, 1))],
                 id="first_fit: first node by id"),
    pytest.param("spread", [node("a", 4), node("b", 4)], [task("x", 1), task("y", 1), task("z", 1)],
                 [("x", "a", (0,)), ("y", "b", (0,)), ("z", "a", (1,))], id="spread alternates between nodes"),
    pytest.param("best_fit", [node("a", 4), node("b", 4)], [task("x", 1), task("y", 1), task("z", 1)],
                 [("x", "a", (0,)), ("y", "a", (1,)), ("z", "a", (2,))], id="best_fit packs one node"),
    pytest.param("best_fit", [used(node("a", 2), 0, 300)], [task("t", 1)], [("t", "a", (1,))],
                 id="whole GPUs skip a GPU a share uses"),
    pytest.param("spread", [used(node("a", 2), 0, 300)], [task("t", 1)], [("t", "a", (1,))],
                 id="spread: whole GPUs skip a GPU a share uses"),
    pytest.param("first_fit", [used(node("a", 2), 0, 300)], [task("t", 1)], [("t", "a", (1,))],
                 id="first_fit: whole GPUs skip a GPU a share uses"),
    pytest.param("best_fit", [used(used(node("a", 3), 0, 500), 1, 200)], [task("t", 0.5)], [("t", "a", (0,))],
                 id="best_fit: a share fills the fullest GPU"),
    pytest.param("spread", [used(used(node("a", 3), 0, 500), 1, 200)], [task("t", 0.5)], [("t", "a", (2,))],
                 id="spread: a share goes to the emptiest GPU"),
    pytest.param("first_fit", [used(used(node("a", 3), 0, 600), 1, 200)], [task("t", 0.5)], [("t", "a", (1,))],
                 id="first_fit: a share takes the lowest index that fits"),
    pytest.param("best_fit", [node("gpu", 8), node("cpu", 0, cpus=4)], [task("t", cpus=2)], [("t", "cpu", ())],
                 id="best_fit: CPU tasks avoid GPU nodes"),
    pytest.param("spread", [node("gpu", 8, cpus=128), node("cpu", 0, cpus=4)], [task("t", cpus=2)],
                 [("t", "cpu", ())], id="spread: CPU tasks avoid GPU nodes"),
    pytest.param("first_fit", [node("a-gpu", 8), node("b-cpu", 0)], [task("t", cpus=2)], [("t", "b-cpu", ())],
                 id="first_fit: CPU tasks avoid GPU nodes"),
    pytest.param("best_fit", [node("gpu", 8), node("cpu", 0, cpus=1)], [task("t", cpus=2)], [("t", "gpu", ())],
                 id="a CPU task uses a GPU node when no CPU node fits"),
    pytest.param("spread", [node("a", 0, cpus=8), node("b", 0, cpus=16)], [task("t", cpus=2)], [("t", "b", ())],
                 id="spread: CPU tasks go where most CPU is free"),
    pytest.param("best_fit", [node("a", 8, gpu="A100"), node("b", 8, gpu="H100")], [task("t", 1, gpu="H100")],
                 [("t", "b", (0,))], id="labels must match"),
]


@pytest.mark.parametrize(("kind", "nodes", "tasks", "expected"), PLACEMENT_TABLE)
def test_placement(kind: str, nodes: list[NodeFree], tasks: list[TaskRequest],
                   expected: list[tuple[str, str, tuple[int, ...]]]) -> None:
    assert place_all(kind, nodes, tasks) == [Placement(*e) for e in expected]


@pytest.mark.parametrize("kind", ["best_fit", "spread", "first_fit"])
def test_preference_h100_else_a100(kind: str) -> None:
    nodes = [node("a100", 8, gpu="A100"), node("h100", 2, gpu="H100"), node("v100", 8, gpu="V100")]
    tasks = [task(f"t{i}", 1, prefer={"gpu": ["H100", "A100"]}) for i in range(4)]
    got = [(p.task_id, p.node_id) for p in place_all(kind, nodes, tasks)]
    assert got == [("t0", "h100"), ("t1", "h100"), ("t2", "a100"), ("t3", "a100")]


def test_preference_ranks_before_fit() -> None:
    """The A100 node fits best (2 GPUs free), but the H100 node is preferred."""
    nodes = [node("a100", 2, gpu="A100"), node("h100", 8, gpu="H100")]
    assert place_all("best_fit", nodes, [task("t", 2, prefer={"gpu": ["H100", "A100"]})]) == [
        Placement("t", "h100", (0, 1))]


def test_kai_fractional_example() -> None:
    """2 GPUs, GPU0 holds a 0.5 share; shares 0.6, 0.5, 0.5, 0.3 in that order."""
    snap = snapshot([node("n", 2)], [task("a", 0.6), task("b", 0.5), task("c", 0.5), task("d", 0.3)],
                    [running("r", "n", (0,), share=500)])
    result = planner().plan(snap)
    assert placed(result) == {"a": ("n", (1,)), "b": ("n", (0,)), "d": ("n", (1,))}
    assert list(result.waiting) == ["c"]


def random_cluster(rng: random.Random) -> tuple[list[NodeFree], list[TaskRequest]]:
    nodes = []
    for i in range(rng.randint(1, 12)):
        n = node(f"n{i}", rng.choice([0, 1, 2, 4, 8]), cpus=rng.choice([8, 32]), slots=rng.choice([2, 8]),
                 **({"zone": rng.choice("ab")} if rng.random() < 0.3 else {}))
        for g in range(len(n.free_milli)):
            if rng.random() < 0.3:
                used(n, g, rng.choice([250, 500, 1000]))
        nodes.append(n)
    tasks = []
    for i in range(rng.randint(1, 40)):
        gpus = rng.choice([0, 0.25, 0.5, 0.7, 1, 2, 4, 8])
        labels = {"zone": rng.choice("ab")} if rng.random() < 0.2 else {}
        tasks.append(task(f"t{i}", gpus, cpus=rng.choice([0, 1, 4]), ram=rng.choice([0, 1024]),
                          priority=rng.randint(0, 3), seq=i + 1, **labels))
    return nodes, tasks


@pytest.mark.parametrize("seed", range(40))
def test_best_fit_matches_the_spine(seed: int) -> None:
    """Without preferences, the planner's best_fit proposes exactly what policy.plan does."""
    rng = random.Random(seed)
    nodes, tasks = random_cluster(rng)
    ordered = sorted(tasks, key=lambda t: (-t.priority, t.seq))
    expected = plan(ordered, [n.copy() for n in nodes])
    assert place_all("best_fit", [n.copy() for n in nodes], ordered) == expected
    assert planner().plan(snapshot([n.copy() for n in nodes], tasks)).placements == expected


def test_make_placer_kinds() -> None:
    assert isinstance(make_placer(PlacementKind.BEST_FIT, []), BestFitPlacer)
    assert isinstance(make_placer("spread", []), SpreadPlacer)
    assert isinstance(make_placer("first_fit", []), FirstFitPlacer)
    with pytest.raises(ValueError, match="placement: unknown kind 'worst_fit'"):
        make_placer("worst_fit", [])


def test_frag_aware_is_made_from_the_placers_table() -> None:
    placer = make_placer("frag_aware", [node("a", 2)], {(1, 0): 3})
    assert isinstance(placer, FragAware)
    assert placer.place(task("t", 1)) is not None
    result = planner(placement="frag_aware").plan(snapshot([node("a", 2)], [task("x", 1), task("y", 2)]))
    assert [p.task_id for p in result.placements] == ["x"]


@pytest.mark.parametrize("kind", ["best_fit", "spread", "first_fit"])
def test_views_replace_a_node(kind: str) -> None:
    """A placer judges a node by its view (less what is held) and takes from its own copy."""
    placer = make_placer(kind, [node("a", 4), node("b", 4)])
    view = node("a", 4)
    view.free_milli[:] = [0, 0, 0, 1000]
    view.free_mem[:] = [0, 0, 0, 80 * GiB]
    choice = placer.choose(task("t", 2), {"a": view})
    assert choice is not None and choice.node_id == "b"
    assert placer.choose(task("u", 1), {"a": view, "b": node("b", 0)}) == Placement("u", "a", (3,))
    placer.take(task("u", 1), Placement("u", "a", (3,)))
    assert placer.nodes["a"].free_milli == [1000, 1000, 1000, 0]


def test_timeline_windows_and_earliest_start() -> None:
    """Releases add at expected ends; a hold takes from its start; a window is the least over it."""
    n = node("n", 4)
    n.free_milli[:2] = [0, 0]
    n.free_mem[:2] = [0, 0]
    line = Timeline(0.0, {"n": n})
    line.release("n", 100.0, Usage("r1", (0,), 1000, 80 * GiB, 0, 0))
    line.release("n", 200.0, Usage("r2", (1,), 1000, 80 * GiB, 0, 0))
    order = {"n": 0}
    assert line.earliest(task("t", 3), 50.0, order) == (100.0, "n", [0, 2, 3])
    line.hold(Hold("n", 100.0, 300.0, Usage("h", (0, 2, 3), 1000, 80 * GiB, 0, 0)))
    assert line.window("n", 0.0, 50.0).free_milli == [0, 0, 1000, 1000]
    assert line.window("n", 0.0, 150.0).free_milli == [0, 0, 0, 0]
    assert line.earliest(task("u", 2), 50.0, order) == (0.0, "n", [2, 3])  # ends before the hold starts
    assert line.earliest(task("v", 2), 500.0, order) == (300.0, "n", [0, 1])
    view = line.views(500.0)
    assert view is not None and view["n"].free_milli == [0, 0, 0, 0]
    assert line.views(50.0) is None
