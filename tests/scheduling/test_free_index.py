"""FreeIndex, kept across cycles and told only which nodes changed, makes best_fit place exactly
as it does from a full list of the nodes (issue 14): random clusters changed at random between
cycles (placements taken, nodes gone, come, relabelled, draining), planned both ways."""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest

from broker.scheduling.config import SchedulingConfig
from broker.scheduling.model import NodeFree, Snapshot
from broker.scheduling.placement.best_fit import propose
from broker.scheduling.placement.free_index import FreeIndex
from broker.scheduling.planner import Planner
from tests.scheduling.helpers import GiB, node
from tests.scheduling.test_placement_speedups import random_cluster, random_task


def _changed(rng: random.Random, nodes: dict[str, NodeFree], placed: dict[str, NodeFree]) -> dict[str, NodeFree | None]:
    """What a cycle's scripts did: placements committed, and now and then a node gone, come,
    relabelled or draining. New NodeFree objects, as FreeView reads them."""
    out: dict[str, NodeFree | None] = dict(placed)
    for node_id in rng.sample(sorted(nodes), min(len(nodes), rng.randint(0, 4))):
        what = rng.random()
        if what < 0.3:
            out[node_id] = None
        elif what < 0.5:
            changed = copy.deepcopy(nodes[node_id])
            changed.labels = {"gpu": rng.choice(["A100", "H100"])}
            out[node_id] = changed
        elif what < 0.6:
            out[node_id] = dataclasses.replace(nodes[node_id].copy(), draining=True)
        else:  # capacity came back
            out[node_id] = node(node_id, len(nodes[node_id].free_milli), mem=80 * GiB, cpus=16, ram=64 * GiB, slots=3)
    for _ in range(rng.randint(0, 2)):
        new_id = f"m{rng.randrange(1000):03d}"
        out[new_id] = node(new_id, rng.choice([0, 2, 8, 16]), mem=40 * GiB, cpus=16, ram=64 * GiB, slots=3)
    return out


@pytest.mark.parametrize("seed", range(40))
def test_best_fit_from_the_index_places_as_from_every_node(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(7000 + seed)
    if seed % 2:  # every update refiles all at once, as when most nodes changed
        monkeypatch.setattr(FreeIndex, "BULK", -1)
    nodes = {n.id: n for n in random_cluster(rng)}
    index = FreeIndex()
    index.update(nodes, nodes)
    for cycle in range(8):
        listed = [nodes[i] for i in sorted(nodes) if not nodes[i].draining]  # as read_free gives them
        before = copy.deepcopy(listed)
        tasks = [random_task(rng, 1000 * cycle + i) for i in range(rng.randint(1, 60))]
        expected = list(propose(tasks, listed))
        assert list(propose(tasks, index)) == expected, cycle
        assert listed == before  # neither way changes the nodes it was given
        fresh = FreeIndex()
        fresh.update(nodes, nodes)
        assert (index.nodes, index.whole, index.free_slots, index.max_gpus) == (
            fresh.nodes, fresh.whole, fresh.free_slots, fresh.max_gpus)
        assert [b for b in index.by_whole if b] == [b for b in fresh.by_whole if b]
        assert [n.id for n in index.ranked] == [n.id for n in fresh.ranked]
        # best fit's whole-GPU buckets, refiled node by node, as built afresh (and untouched by propose)
        assert (index.factors, index.whole_gpus, index.filed) == (fresh.factors, fresh.whole_gpus, fresh.filed)
        assert {k: v for k, v in index.buckets.items() if v} == {k: v for k, v in fresh.buckets.items() if v}
        placed: dict[str, NodeFree] = {}
        by_id = {t.id: t for t in tasks}
        for p in expected[: rng.randint(0, len(expected))]:  # what reserve.lua committed
            taken = placed.setdefault(p.node_id, nodes[p.node_id].copy())
            taken.take(by_id[p.task_id], list(p.gpu_indices))
        changed = _changed(rng, nodes, placed)
        index.update(changed, changed)
        for node_id, now in changed.items():
            if now is None:
                nodes.pop(node_id, None)
            else:
                nodes[node_id] = now


def test_an_unchanged_node_is_not_visited_and_ranks_are_rebuilt_only_when_nodes_come_or_go() -> None:
    nodes = {f"n{i:04d}": node(f"n{i:04d}", 8, mem=80 * GiB, cpus=64, ram=512 * GiB, slots=8) for i in range(2000)}
    index = FreeIndex()
    index.update(nodes, nodes)
    assert index.rebuilds == 1
    taken = nodes["n0007"].copy()
    taken.free_milli[0] = 0
    index.update(["n0007"], {"n0007": taken})  # capacity changed: refiled, no rebuild
    assert index.rebuilds == 1 and index.whole["n0007"] == 7 and index.by_whole[7] == ["n0007"]
    index.update(["n0007"], {})  # gone
    assert index.rebuilds == 2 and "n0007" not in index.nodes and index.free_slots == 1999 * 8


@pytest.mark.parametrize("seed", range(12))
def test_a_full_pass_from_the_index_plans_as_from_the_node_list(seed: int) -> None:
    """The dispatcher's full pass hands the planner its FreeIndex (``Snapshot.index``): best fit
    starts from it, and plans exactly as over the listed nodes; an index of other nodes is not used."""
    rng = random.Random(9000 + seed)
    nodes = [n for n in random_cluster(rng) if not n.draining]
    index = FreeIndex()
    index.update({n.id: n for n in nodes}, {n.id: n for n in nodes})
    listed = list(index.ranked)
    tasks = [random_task(rng, i) for i in range(rng.randint(1, 80))]
    config = SchedulingConfig(preemption=False)
    plain = Planner(config).plan(Snapshot(100.0, listed, copy.deepcopy(tasks)))
    indexed = Planner(config).plan(Snapshot(100.0, listed, copy.deepcopy(tasks), index=index))
    assert (indexed.placements, indexed.waiting) == (plain.placements, plain.waiting)
    other = Planner(config).plan(Snapshot(100.0, listed[1:], copy.deepcopy(tasks), index=index))
    assert other == Planner(config).plan(Snapshot(100.0, listed[1:], copy.deepcopy(tasks)))
