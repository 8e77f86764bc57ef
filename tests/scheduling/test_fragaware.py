"""FragAware tables: fragmentation gradient descent placement, with no Redis anywhere."""

from __future__ import annotations

import random

import pytest

from broker.errors import InvalidRequest
from broker.scheduling.model import NodeFree, Placement, TaskRequest
from broker.scheduling.placement.best_fit import BestFit
from broker.scheduling.placement.frag_aware import FragAware
from broker.store.records import decode_mix

GiB = 1024


def node(node_id: str, gpus: int = 0, used: dict[int, int] | None = None, cpus: int = 64, ram: int = 512 * GiB,
         slots: int = 16, mem: int = 80 * GiB, **labels: str) -> NodeFree:
    """A node with ``gpus`` GPUs; ``used`` maps index -> milli already taken (memory in proportion)."""
    used = used or {}
    return NodeFree(node_id, mem, [1000 - used.get(i, 0) for i in range(gpus)],
                    [mem - used.get(i, 0) * mem // 1000 for i in range(gpus)], cpus * 1000, ram, slots, labels)


def task(task_id: str, gpus: float = 0, cpus: float = 0, ram: int = 0, prefer: dict[str, tuple[str, ...]] | None = None,
         **labels: str) -> TaskRequest:
    whole = int(gpus) if gpus >= 1 else 0
    milli = round(gpus * 1000) if 0 < gpus < 1 else 0
    return TaskRequest(task_id, whole, milli, 0, round(cpus * 1000), ram, tuple(sorted(labels.items())),
                       prefer=tuple(sorted((prefer or {}).items())))


def place_all(placer: FragAware, tasks: list[TaskRequest]) -> list[Placement | None]:
    return [placer.place(t) for t in tasks]


PLACEMENT_TABLE = [
    pytest.param(
        # KAI scheduler's fractional example: GPU0 already holds a 0.5 share.
        [node("n", 2, used={0: 500})], {}, [task("a", 0.6), task("b", 0.5), task("c", 0.5), task("d", 0.3)],
        [Placement("a", "n", (1,)), Placement("b", "n", (0,)), None, Placement("d", "n", (1,))],
        id="fractional shares fill GPUs; the share that fits nowhere waits"),
    pytest.param(
        # Mostly 0.5 shares expected: 600 left would strand 100, 700 left leaves a usable 500.
        [node("a", 1, used={0: 400}), node("b", 1, used={0: 300})], {(0, 500): 9, (0, 200): 1}, [task("t", 0.2)],
        [Placement("t", "b", (0,))], id="a share goes where it leaves a usable remainder, unlike best fit"),
    pytest.param(
        [node("fresh", 8), node("busy", 8, used={0: 300})], {(8, 0): 5, (1, 0): 5}, [task("t", 1)],
        [Placement("t", "busy", (1,))], id="a whole GPU does not break a fresh node that 8-GPU tasks need"),
    pytest.param(
        [node("fresh", 4), node("busy", 4, used={0: 300, 1: 500})], {(1, 0): 1, (0, 500): 1}, [task("t", 0.5)],
        [Placement("t", "busy", (1,))], id="a share goes to a partly used GPU, keeping whole GPUs whole"),
    pytest.param(
        [node("n", 4, used={1: 200, 3: 100})], {(2, 0): 1}, [task("t", 2)],
        [Placement("t", "n", (0, 2))], id="whole GPUs are the ones nobody partly uses"),
    pytest.param(
        [node("n", 2, used={0: 100, 1: 100})], {(1, 0): 1}, [task("t", 1)], [None],
        id="no wholly free GPU: a whole-GPU task waits"),
    pytest.param(
        [node("a", 2, A100="x"), node("b", 2, gpu="H100"), node("c", 1, gpu="A100")], {(1, 0): 1},
        [task("t", 1, gpu="A100")], [Placement("t", "c", (0,))], id="labels must match"),
    pytest.param(
        [node("a", 1, gpu="A100"), node("h", 2, used={0: 500}, gpu="H100")], {(0, 500): 1},
        [task("t", 0.5, prefer={"gpu": ("A100", "H100")})], [Placement("t", "a", (0,))],
        id="prefer lists win before fragmentation"),
    pytest.param(
        [node("a", 1, gpu="T4")], {(1, 0): 1}, [task("t", 1, prefer={"gpu": ("A100", "H100")})], [None],
        id="a node outside every prefer list is not used"),
    pytest.param(
        [node("small", 2, cpus=2), node("big", 2, cpus=4)], {(1, 0): 1}, [task("t", 1, cpus=3)],
        [Placement("t", "big", (0,))], id="CPU is checked as well as GPUs"),
]


@pytest.mark.parametrize(("nodes", "mix", "tasks", "expected"), PLACEMENT_TABLE)
def test_placement(nodes: list[NodeFree], mix: dict[str, int], tasks: list[TaskRequest],
                   expected: list[Placement | None]) -> None:
    assert place_all(FragAware(nodes, mix), tasks) == expected


def test_host_shortage_strands_gpus() -> None:
    """A task goes where it leaves enough CPU for the next GPU task like those seen; best fit does not look."""
    nodes = [node("tight", 2, cpus=20), node("roomy", 2, cpus=30)]
    fgd = FragAware(nodes, {(1, 0): 4})
    assert fgd.choose(task("seen", 1, cpus=10)) is not None  # not taken: teaches what 1-GPU tasks ask of a host
    # On "tight" 8 CPUs would be left: its other GPU could take no such task.
    assert fgd.place(task("t", 1, cpus=12)) == Placement("t", "roomy", (0,))
    assert BestFit(nodes).place(task("t", 1, cpus=12)) == Placement("t", "tight", (0,))


def test_cpu_task_keeps_cpu_beside_free_gpus() -> None:
    nodes = [node("tight", 2, cpus=20), node("roomy", 2, cpus=40)]
    fgd = FragAware(nodes, {(1, 0): 4})
    fgd.choose(task("seen", 1, cpus=10))
    assert fgd.place(task("c", cpus=15)) == Placement("c", "roomy")
    assert BestFit(nodes).place(task("c", cpus=15)) == Placement("c", "tight")


def test_share_remainder_differs_from_best_fit() -> None:
    nodes = [node("a", 1, used={0: 400}), node("b", 1, used={0: 300})]
    assert BestFit(nodes).place(task("t", 0.2)) == Placement("t", "a", (0,))
    assert FragAware(nodes, {(0, 500): 9, (0, 200): 1}).place(task("t", 0.2)) == Placement("t", "b", (0,))


def test_empty_mix_falls_back_to_the_tasks_seen() -> None:
    """No mix: the task's own shape is the mix, so a 0.3 share leaves room for another, not a 100 sliver."""
    nodes = [node("a", 1, used={0: 400}), node("b", 1, used={0: 600})]
    assert FragAware(nodes, {}).place(task("t", 0.3)) == Placement("t", "a", (0,))
    assert BestFit(nodes).place(task("t", 0.3)) == Placement("t", "b", (0,))


def test_choose_does_not_take_and_take_applies() -> None:
    placer = FragAware([node("n", 1)], {(0, 500): 1})
    first = placer.choose(task("a", 0.5))
    assert first == Placement("a", "n", (0,))
    assert placer.nodes["n"].free_milli == [1000]
    placer.take(task("a", 0.5), first)
    assert placer.nodes["n"].free_milli == [500]
    placer.take(task("b", 0.5), Placement("b", "n", (0,)))  # taken though not chosen here
    assert placer.choose(task("c", 0.5)) is None


def test_views_judge_nodes_less_what_is_held() -> None:
    nodes = [node("a", 1), node("b", 1, used={0: 400})]
    placer = FragAware(nodes, {(0, 600): 1})
    assert placer.choose(task("t", 0.6)) == Placement("t", "b", (0,))
    held = nodes[1].copy()
    held.free_milli[0], held.free_mem[0] = 0, 0  # b's GPU is held for a backfilled task
    assert placer.choose(task("t", 0.6), views={"b": held}) == Placement("t", "a", (0,))
    assert placer.nodes["b"].free_milli == [600]  # the view changed nothing of the placer's own


def test_identical_nodes_break_ties_in_order() -> None:
    placer = FragAware([node(f"n{i}", 2) for i in range(4)], {(1, 0): 1})
    assert [p.node_id for p in place_all(placer, [task(str(i), 1) for i in range(8)]) if p] == \
        ["n0", "n0", "n1", "n1", "n2", "n2", "n3", "n3"]


@pytest.mark.parametrize(("mix", "field_text"), [
    ({"one": 1}, "'one'"),
    ({"1,500": 1}, "a share"),
    ({"0,1500": 1}, "a share"),
    ({"1,0": -1}, "integer >= 0"),
])
def test_bad_mix_is_refused(mix: dict[str, int], field_text: str) -> None:
    """The stored request mix is decoded before frag_aware sees it; a bad entry names the field."""
    with pytest.raises(InvalidRequest) as info:
        decode_mix(mix)
    assert info.value.fields == ["mix"]
    assert field_text in str(info.value)


def test_cpu_left_must_feed_the_free_gpus() -> None:
    """Beyond FGD's all-or-nothing CPU check: 25 CPUs beside 3 free GPUs feed only 2 tasks like those seen."""
    nodes = [node("short", 4, cpus=45), node("roomy", 4, cpus=60)]
    fgd = FragAware(nodes, {(1, 0): 4})
    fgd.choose(task("seen", 1, cpus=10))
    assert fgd.place(task("t", 1, cpus=20)) == Placement("t", "roomy", (0,))
    assert BestFit(nodes).place(task("t", 1, cpus=20)) == Placement("t", "short", (0,))


def test_slots_feed_gpus_like_cpu() -> None:
    """With 2 slots left, 4 free GPUs take only 2 of the 4 whole-GPU tasks expected: a CPU task
    there would leave 3 of them unfed, so it goes where slots are plenty."""
    nodes = [node("few", 4, slots=2), node("many", 4, slots=8)]
    assert FragAware(nodes, {(1, 0): 1}).place(task("c", cpus=1)) == Placement("c", "many")


def test_each_choice_is_the_best_of_a_full_scan() -> None:
    """The per-shape heaps (judged once per state, stale entries dropped lazily) pick what judging
    every node afresh would pick, as nodes fill and their states come and go."""
    from broker.scheduling.placement.frag_aware import _state

    rng = random.Random(7)
    nodes = [node(f"n{i}", rng.choice([1, 2, 4, 8]), cpus=rng.choice([16, 32, 96]),
                  gpu=rng.choice(["A100", "T4"])) for i in range(12)]
    placer = FragAware(nodes, {(1, 0): 5, (0, 500): 3, (0, 300): 2, (2, 0): 1})
    sizes = [1, 1, 2, 0.5, 0.3, 0.7]
    for i in range(120):
        labels = {"gpu": "T4"} if i % 7 == 0 else {}
        t = task(f"t{i}", rng.choice(sizes), cpus=rng.choice([2, 4, 8]), **labels)
        chosen = placer.choose(t)  # first: it may learn from t and judge anew
        ranks = [r for n in placer.nodes.values()
                 if (r := placer._rank(t, _state(n, tuple(sorted(n.labels.items()))))) is not None]
        assert (chosen is None) == (not ranks)
        if chosen is not None:
            node_now = placer.nodes[chosen.node_id]
            mine = placer._rank(t, _state(node_now, tuple(sorted(node_now.labels.items()))))
            assert mine is not None and mine[0] == min(r[0] for r in ranks)
            placer.take(t, chosen)
            assert all(m >= 0 for m in node_now.free_milli) and node_now.free_cpu_milli >= 0


def test_a_share_does_not_take_the_cpu_another_share_needs() -> None:
    """Shares seen ask 8 CPUs. "small" (8 CPUs) can host one more; "big" (64) many. A 2-CPU share
    on "small" would strand its GPU for every such share; on "big" it strands nothing. The rule
    that made the CPU feed every share slot (4 of 0.25 per GPU) saw "small" as fragmented
    already (CPU for 1 of 4) and no rise either way, and took "small"."""
    nodes = [node("small", 1, cpus=8), node("big", 1, cpus=64)]
    fgd = FragAware(nodes, {(0, 250): 10})
    fgd.choose(task("seen", 0.25, cpus=8))
    assert fgd.place(task("t", 0.25, cpus=2)) == Placement("t", "big", (0,))


def test_shares_weigh_by_count_times_how_many_a_gpu_holds() -> None:
    """A 0.5 share on "x" (700 free) leaves 200, room for one 0.2 share; on "y" (600 free) it
    leaves 100, room for nothing. FGD weighs kinds by count (ten 0.5 shares to six 0.2): y strands
    less of the 0.5 shares' GPU (100 against 200) and wins. A share weighed by count times how
    many fit on a GPU (20 to 30) makes the 100 that the 0.2 shares lose on y count for more, and
    x wins: the small shares fill what the large ones leave. Whole-GPU kinds keep their count."""
    from broker.scheduling.placement.frag_aware import share_weights

    mix = {(0, 500): 10, (0, 200): 6, (1, 0): 10}
    assert share_weights(mix) == {(0, 500): 20 / 60, (0, 200): 30 / 60, (1, 0): 10 / 60}
    assert share_weights({(8, 0): 3, (1, 0): 3, (0, 250): 1}) == {(8, 0): 0.3, (1, 0): 0.3, (0, 250): 0.4}
    nodes = [node("x", 1, used={0: 300}), node("y", 1, used={0: 400})]
    placer = FragAware(nodes, mix)
    assert placer.place(task("half", 0.5)) == Placement("half", "x", (0,))
    assert placer.place(task("fifth", 0.2)) == Placement("fifth", "x", (0,))  # fills x's GPU
