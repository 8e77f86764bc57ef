"""The indexed placers decide exactly as a plain scan over every node does.

``Reference`` is that scan, written as plainly as possible from the placers' rules; random
clusters (label groups, preferences, partly used GPUs, memory-bound shares, views) are placed
by both, one choice and one take at a time."""

from __future__ import annotations

import itertools
import random

import pytest

from broker.models import MILLI
from broker.scheduling.model import NodeFree, Placement, TaskRequest
from broker.scheduling.placement import make_placer
from broker.scheduling.placement.best_fit import WEIGHTS, plan
from broker.scheduling.placement.first_fit import _MaxTree
from tests.scheduling.helpers import GiB, node, task

Key = tuple[float, ...]


def _fits(n: NodeFree, t: TaskRequest) -> bool:
    return (n.free_slots >= 1 and n.free_cpu_milli >= t.cpu_milli and n.free_memory_mb >= t.memory_mb
            and all(n.labels.get(k) == v for k, v in t.labels)
            and all(n.labels.get(k) in values for k, values in t.prefer))


def _whole(n: NodeFree) -> list[int]:
    return [i for i in range(len(n.free_milli)) if n.free_milli[i] == MILLI and n.free_mem[i] == n.gpu_memory_mb]


def _share_gpus(n: NodeFree, t: TaskRequest) -> list[int]:
    memory = t.gpu_memory_mb or t.gpu_milli * n.gpu_memory_mb // MILLI
    return [i for i in range(len(n.free_milli)) if n.free_milli[i] >= t.gpu_milli and n.free_mem[i] >= memory]


def _preference(n: NodeFree, t: TaskRequest) -> int:
    return sum(values.index(n.labels[k]) for k, values in t.prefer)


class Reference:
    """Judges every node for every task. best_fit: the fullest node, every dimension weighed (free
    GPU, GPU memory, CPU, memory, each over the largest node's, by ``WEIGHTS``), ties to the given
    order; a share to the GPU there with the least share left over; CPU tasks to nodes without
    GPUs first. spread: most wholly free, most share free, most CPU free. first_fit: lowest id,
    lowest GPU index."""

    def __init__(self, kind: str, nodes: list[NodeFree]) -> None:
        self.kind = kind
        given = sorted(nodes, key=lambda n: n.id) if kind == "first_fit" else nodes
        self.nodes = {n.id: n.copy() for n in given}
        self.rank = {n: r for r, n in enumerate(self.nodes)}
        self.free_slots = sum(n.free_slots for n in self.nodes.values())
        extent = [max([1] + [len(n.free_milli) * MILLI for n in nodes]),
                  max([1] + [len(n.free_milli) * n.gpu_memory_mb for n in nodes]),
                  max([1] + [max(n.cap_cpu_milli, n.free_cpu_milli) for n in nodes]),
                  max([1] + [max(n.cap_memory_mb, n.free_memory_mb) for n in nodes])]
        self.factors = [w * 1_000_000 / e for w, e in zip(WEIGHTS, extent, strict=True)]

    def fullness(self, n: NodeFree) -> int:
        free = (sum(n.free_milli), sum(n.free_mem), n.free_cpu_milli, n.free_memory_mb)
        return round(sum(f * v for f, v in zip(self.factors, free, strict=True)))

    def choose(self, t: TaskRequest, views: dict[str, NodeFree] | None = None) -> Placement | None:
        if self.free_slots <= 0:
            return None
        if self.kind != "best_fit" or not t.prefer:
            return self._choose(t, views or {})
        keys = [k for k, _ in t.prefer]
        combos = sorted(itertools.product(*(list(enumerate(v)) for _, v in t.prefer)),
                        key=lambda c: sum(i for i, _ in c))
        for combo in combos:  # best_fit tries each acceptable label set, most preferred first
            labels = tuple(sorted((*t.labels, *zip(keys, (v for _, v in combo), strict=True))))
            exact = TaskRequest(t.id, t.whole_gpus, t.gpu_milli, t.gpu_memory_mb, t.cpu_milli, t.memory_mb, labels)
            found = self._choose(exact, views or {})
            if found is not None:
                return found
        return None

    def _choose(self, t: TaskRequest, views: dict[str, NodeFree]) -> Placement | None:
        best: tuple[Key, str, list[int]] | None = None
        for node_id, own in self.nodes.items():
            n = views.get(node_id, own)
            for key, gpus in self._options(n, t):
                if best is None or key < best[0]:
                    best = (key, node_id, gpus)
        return None if best is None else Placement(t.id, best[1], tuple(best[2]))

    def _options(self, n: NodeFree, t: TaskRequest) -> list[tuple[Key, list[int]]]:
        """(key, GPUs) of each way ``t`` fits on ``n``."""
        if not _fits(n, t):
            return []
        # best_fit tries each preferred label set in turn (choose) instead of ranking nodes by it
        pref = 0 if self.kind == "best_fit" else _preference(n, t)
        rank, whole = self.rank[n.id], len(_whole(n))
        if t.whole_gpus:
            if n.gpu_memory_mb < t.gpu_memory_mb or whole < t.whole_gpus:
                return []
            gpus = _whole(n)[: t.whole_gpus]
            if self.kind == "best_fit":
                return [((0, self.fullness(n), rank), gpus)]
            return [((pref, -whole if self.kind == "spread" else 0, rank), gpus)]
        if t.gpu_milli:
            fit = _share_gpus(n, t)
            if self.kind == "best_fit":
                return [((0, self.fullness(n), rank, n.free_milli[i], i), [i]) for i in fit]
            if self.kind == "spread":
                return [((pref, -n.free_milli[i], rank, i), [i]) for i in fit]
            return [((pref, rank, i), [i]) for i in fit]
        has_gpus = len(n.free_milli) > 0
        if self.kind == "best_fit":
            return [((has_gpus, self.fullness(n), rank), [])]
        cpu = {"best_fit": n.free_cpu_milli, "spread": -n.free_cpu_milli, "first_fit": 0}[self.kind]
        return [((pref, has_gpus, cpu, rank), [])]

    def take(self, t: TaskRequest, p: Placement) -> None:
        self.nodes[p.node_id].take(t, p.gpu_indices)
        self.free_slots -= 1


def random_cluster(rng: random.Random) -> list[NodeFree]:
    nodes = []
    for i in rng.sample(range(100), rng.randint(1, 40)):  # ids out of order: first_fit sorts them
        labels = {"gpu": rng.choice(["A100", "H100", "V100"])} if rng.random() < 0.7 else {}
        if rng.random() < 0.3:
            labels["zone"] = rng.choice("ab")
        n = node(f"n{i:02d}", rng.choice([0, 1, 2, 4, 8, 8]), mem=rng.choice([40, 80]) * GiB,
                 cpus=rng.choice([4, 16, 64]), ram=rng.choice([16, 512]) * GiB, slots=rng.choice([1, 3, 64]), **labels)
        for g in range(len(n.free_milli)):
            if rng.random() < 0.4:
                milli = rng.choice([100, 250, 500, 700, 1000])
                n.free_milli[g] -= milli
                n.free_mem[g] -= rng.choice([milli * n.gpu_memory_mb // MILLI, n.gpu_memory_mb // 2, 0])
        nodes.append(n)
    return nodes


def random_task(rng: random.Random, i: int) -> TaskRequest:
    gpus = rng.choice([0, 0.1, 0.25, 0.3, 0.5, 0.7, 1, 1, 2, 4, 8])
    labels = {"gpu": rng.choice(["A100", "H100"])} if rng.random() < 0.2 else {}
    if rng.random() < 0.1:
        labels["zone"] = rng.choice("ab")
    prefer: dict[str, list[str]] = {}
    if not labels and rng.random() < 0.25:
        prefer["gpu"] = rng.sample(["A100", "H100", "V100"], rng.randint(1, 3))
        if rng.random() < 0.4:
            prefer["zone"] = rng.sample(["a", "b"], 2)
    return task(f"t{i}", gpus, gpu_mem=rng.choice([0, 0, 20 * GiB, 50 * GiB]), cpus=rng.choice([0, 1, 4, 16]),
                ram=rng.choice([0, 1024, 64 * GiB]), prefer=prefer, **labels)


def random_views(rng: random.Random, nodes: dict[str, NodeFree]) -> dict[str, NodeFree] | None:
    """Some nodes seen with less free than they have (as backfill holds make them)."""
    if rng.random() < 0.5:
        return None
    views = {}
    for node_id in rng.sample(sorted(nodes), min(len(nodes), rng.randint(1, 4))):
        view = nodes[node_id].copy()
        for g in range(len(view.free_milli)):
            if rng.random() < 0.5:
                view.free_milli[g] = view.free_mem[g] = 0
        view.free_cpu_milli //= rng.choice([1, 2])
        views[node_id] = view
    return views


@pytest.mark.parametrize("kind", ["best_fit", "spread", "first_fit"])
@pytest.mark.parametrize("seed", range(60))
def test_same_choices_as_a_plain_scan(kind: str, seed: int) -> None:
    rng = random.Random(seed)
    nodes = random_cluster(rng)
    placer, reference = make_placer(kind, nodes), Reference(kind, nodes)
    for i in range(rng.randint(1, 120)):
        t = random_task(rng, i)
        views = random_views(rng, reference.nodes)
        expected = reference.choose(t, views)
        assert placer.choose(t, views) == expected, (i, t, views)
        if expected is not None:
            placer.take(t, expected)
            reference.take(t, expected)
    assert placer.nodes == reference.nodes


@pytest.mark.parametrize("seed", range(30))
def test_the_spine_plan_is_best_fit_by_plain_scan(seed: int) -> None:
    rng = random.Random(1000 + seed)
    nodes = random_cluster(rng)
    tasks = [random_task(rng, i) for i in range(rng.randint(1, 150))]
    reference, expected = Reference("best_fit", nodes), []
    failed: set[object] = set()
    for t in tasks:
        if reference.free_slots <= 0:
            break
        if t.shape in failed:
            continue
        found = reference._choose(t, {})  # policy.BestFit meets preferences but does not rank them
        if found is None:
            failed.add(t.shape)
        else:
            reference.take(t, found)
            expected.append(found)
    assert plan(tasks, nodes) == expected


@pytest.mark.parametrize("seed", range(20))
def test_max_tree_finds_the_first_position_reaching_a_value(seed: int) -> None:
    rng = random.Random(seed)
    values = [rng.randint(-5, 20) for _ in range(rng.randint(1, 70))]
    tree = _MaxTree(list(values))
    for _ in range(200):
        if rng.random() < 0.5:
            position = rng.randrange(len(values))
            values[position] = rng.randint(-5, 20)
            tree.set(position, values[position])
        least, start = rng.randint(-6, 22), rng.randrange(len(values) + 2)
        expected = next((p for p in range(start, len(values)) if values[p] >= least), None)
        assert tree.first(least, start) == expected


def test_a_large_cluster_is_placed_the_same() -> None:
    """A cluster large enough that the indexes hold many nodes per bucket and tree level."""
    rng = random.Random(99)
    nodes = []
    for i in range(300):
        n = node(f"n{i:03d}", 8, cpus=rng.choice([16, 64]), slots=rng.choice([4, 64]),
                 gpu=rng.choice(["A100", "H100"]))
        for g in range(8):
            if rng.random() < 0.2:
                n.free_milli[g] -= 500
                n.free_mem[g] -= 40 * GiB
        nodes.append(n)
    tasks = [random_task(rng, i) for i in range(600)]
    for kind in ("best_fit", "spread", "first_fit"):
        placer, reference = make_placer(kind, nodes), Reference(kind, nodes)
        for t in tasks:
            expected = reference.choose(t)
            assert placer.place(t) == expected, (kind, t)
            if expected is not None:
                reference.take(t, expected)
