"""The schedulable nodes indexed by free shape, kept from cycle to cycle (issue 14).

``BestFit`` built its indexes from every node each cycle: at 10,000 nodes that is tens of
milliseconds before the first placement, even when one task waits. ``FreeIndex`` keeps them
and is told only which nodes changed (``store.free_view.FreeView``); ``BestFit.from_index``
starts a cycle from it by copying containers, with no Python-level visit per node.

Kept: node id -> NodeFree (schedulable nodes only: up, lease valid, not draining), per wholly
free GPU count the node ids in id order (the order ``BestFit`` breaks ties in: its rank), each
node's wholly free GPU indices, the free slots in all, the label groups, and best fit's buckets
for whole-GPU tasks: per (label group, wholly free GPU count) the nodes' (fullness, rank), sorted
(``fullness`` weighs every dimension against the largest node's, ``factors``). A node whose free
capacity changed is refiled; ranks, groups, factors and buckets are rebuilt only when nodes come,
go or change labels or size. Building those buckets from every node each cycle was a third of the
lazy pass at 10,000 nodes (issue 14). The NodeFree objects are the caller's, shared: nothing here
changes them.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable, Mapping

from broker.models import MILLI
from broker.scheduling.model import NodeFree
from broker.scheduling.placement.base import LabelGroups

# Weights of free GPU, GPU memory, CPU and memory in a node's fullness (each as a share of the
# largest node's capacity in that dimension). The paper's best fit weighs CPU and GPU half and half.
WEIGHTS = (0.35, 0.15, 0.35, 0.15)
SCALE = 1_000_000  # fullness is an integer, so that equal nodes tie exactly

Factors = tuple[float, float, float, float]
Key = tuple[str, int, int]  # best fit's bucket: (kind, label group, bucket); kind "w": whole GPUs
Entry = tuple[int, int]  # (fullness, rank)


def extent(node: NodeFree) -> tuple[int, int, int, int]:
    """The node's size in each dimension (GPU milli, GPU memory, CPU milli, memory MiB)."""
    gpus = len(node.free_milli)
    return (gpus * MILLI, gpus * node.gpu_memory_mb, max(node.cap_cpu_milli, node.free_cpu_milli),
            max(node.cap_memory_mb, node.free_memory_mb))


def factors_of(nodes: Iterable[NodeFree]) -> Factors:
    """What each dimension's free amount is multiplied by in ``fullness``: its weight over the largest node's."""
    top = [1, 1, 1, 1]
    for n in nodes:
        for d, value in enumerate(extent(n)):
            top[d] = max(top[d], value)
    return (WEIGHTS[0] * SCALE / top[0], WEIGHTS[1] * SCALE / top[1], WEIGHTS[2] * SCALE / top[2],
            WEIGHTS[3] * SCALE / top[3])


def fullness(node: NodeFree, factors: Factors) -> int:
    """What is free on the node, every dimension weighed: lower is fuller."""
    return round(factors[0] * sum(node.free_milli) + factors[1] * sum(node.free_mem)
                 + factors[2] * node.free_cpu_milli + factors[3] * node.free_memory_mb)


class FreeIndex:
    BULK = 64  # changes past this and an eighth of the nodes are refiled at once

    def __init__(self) -> None:
        self.nodes: dict[str, NodeFree] = {}
        self.by_whole: list[list[str]] = [[]]  # wholly free GPU count -> node ids, in id order
        self.whole_gpus: dict[str, list[int]] = {}  # node id -> its wholly free GPUs (shared: copy to change)
        self.whole: dict[str, int] = {}  # node id -> its wholly free GPU count
        self.free_slots = 0
        self.max_gpus = 0
        self.ranked: list[NodeFree] = []  # nodes in id order; rank: the position in it
        self.rank: dict[str, int] = {}
        self.groups = LabelGroups(())
        self.ids: list[str] = []  # ``ranked``'s ids
        self.factors: Factors = factors_of(())
        self.buckets: dict[Key, list[Entry]] = {}  # best fit's whole-GPU buckets, sorted
        self.filed: dict[str, Key] = {}  # node id -> its bucket there (nodes with GPUs)
        self.rebuilds = 0  # times membership or labels changed and ranks were rebuilt (tests count them)

    def update(self, changed: Iterable[str], nodes: Mapping[str, NodeFree | None]) -> None:
        """Bring the nodes in ``changed`` up to date: ``nodes[id]`` is what is free on it now,
        None or absent when it is not schedulable (down, gone, lease run out, draining)."""
        changed = list(changed)
        # Many changed (every node, when all their tasks ended): refiled all at once, a sort per
        # list, rather than one insort (a move of the list's tail) per node.
        bulk = len(changed) > self.BULK + len(self.nodes) // 8
        reshaped = False  # the set of nodes, a node's labels or its GPU count changed
        for node_id in changed:
            node = nodes.get(node_id)
            if node is not None and node.draining:
                node = None
            old = self.nodes.get(node_id)
            if old is node:
                continue
            if old is not None:
                self._drop(old, bulk)
            if node is None:
                reshaped = True
                continue
            self.nodes[node_id] = node
            whole = node.whole_indices()
            self.whole_gpus[node_id], self.whole[node_id] = whole, len(whole)
            while len(self.by_whole) <= len(node.free_milli):
                self.by_whole.append([])
            if not bulk:
                insort(self.by_whole[len(whole)], node_id)
            self.free_slots += node.free_slots
            if old is None or (old.labels, old.serves, extent(old)) != (node.labels, node.serves, extent(node)):
                reshaped = True
            else:
                self.ranked[self.rank[node_id]] = node
                if not bulk:
                    self._file(node)
        if reshaped:
            self._rebuild()
        elif bulk:
            self._refile_all()

    def _entry(self, node: NodeFree) -> tuple[Key, Entry]:
        return ("w", self.groups.of[node.id], self.whole[node.id]), (fullness(node, self.factors), self.rank[node.id])

    def _file(self, node: NodeFree) -> None:
        if node.free_milli:
            key, entry = self._entry(node)
            insort(self.buckets.setdefault(key, []), entry)
            self.filed[node.id] = key

    def _drop(self, old: NodeFree, bulk: bool) -> None:
        key, whole = self.filed.pop(old.id, None), self.whole.pop(old.id)
        if not bulk:  # else refiled all at once
            if key is not None and old.id in self.rank:
                entries = self.buckets[key]
                del entries[bisect_left(entries, (fullness(old, self.factors), self.rank[old.id]))]
            del self.by_whole[whole][bisect_left(self.by_whole[whole], old.id)]
        del self.nodes[old.id], self.whole_gpus[old.id]
        self.free_slots -= old.free_slots

    def _rebuild(self) -> None:
        """Ranks, label groups, factors, buckets and the widest node: only when nodes come, go or
        change labels or size."""
        self.rebuilds += 1
        self.ids = sorted(self.nodes)
        self.ranked = [self.nodes[i] for i in self.ids]
        self.rank = {node_id: rank for rank, node_id in enumerate(self.ids)}
        self.groups = LabelGroups(self.ranked)
        self.max_gpus = max((len(n.free_milli) for n in self.ranked), default=0)
        self.factors = factors_of(self.ranked)
        self._refile_all()

    def _refile_all(self) -> None:
        self.by_whole = [[] for _ in range(self.max_gpus + 1)]
        for node_id in self.ids:
            self.by_whole[self.whole[node_id]].append(node_id)
        self.buckets, self.filed = {}, {}
        for node in self.ranked:
            if node.free_milli:
                key, entry = self._entry(node)
                self.buckets.setdefault(key, []).append(entry)
                self.filed[node.id] = key
        for entries in self.buckets.values():
            entries.sort()
