"""The schedulable nodes indexed by free shape, kept from cycle to cycle (issue 14).

``BestFit`` built its indexes from every node each cycle: at 10,000 nodes that is tens of
milliseconds before the first placement, even when one task waits. ``FreeIndex`` keeps them
and is told only which nodes changed (``store.free_view.FreeView``); ``BestFit.from_index``
starts a cycle from it by copying containers, with no Python-level visit per node.

Kept: node id -> NodeFree (schedulable nodes only: up, lease valid, not draining), per wholly
free GPU count the node ids in id order (the order ``BestFit`` breaks ties in: its rank), each
node's wholly free GPU indices, the free slots in all, the label groups. It is a candidate
filter, not a policy: ``BestFit`` still judges the candidates it yields, so a change to how
best_fit scores keeps working on top of it. The NodeFree objects are the caller's, shared:
nothing here changes them.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable, Mapping

from broker.scheduling.model import NodeFree
from broker.scheduling.placement.base import LabelGroups


class FreeIndex:
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
        self.rebuilds = 0  # times membership or labels changed and ranks were rebuilt (tests count them)

    def update(self, changed: Iterable[str], nodes: Mapping[str, NodeFree | None]) -> None:
        """Bring the nodes in ``changed`` up to date: ``nodes[id]`` is what is free on it now,
        None or absent when it is not schedulable (down, gone, lease run out, draining)."""
        reshaped = False  # the set of nodes, a node's labels or its GPU count changed
        for node_id in changed:
            node = nodes.get(node_id)
            if node is not None and node.draining:
                node = None
            old = self.nodes.get(node_id)
            if old is node:
                continue
            if old is not None:
                self._drop(old)
            if node is None:
                reshaped = True
                continue
            self.nodes[node_id] = node
            whole = node.whole_indices()
            self.whole_gpus[node_id], self.whole[node_id] = whole, len(whole)
            while len(self.by_whole) <= len(node.free_milli):
                self.by_whole.append([])
            insort(self.by_whole[len(whole)], node_id)
            self.free_slots += node.free_slots
            if old is None or (old.labels, old.serves, len(old.free_milli)) != (
                    node.labels, node.serves, len(node.free_milli)):
                reshaped = True
            else:
                self.ranked[self.rank[node_id]] = node
        if reshaped:
            self._rebuild()

    def _drop(self, old: NodeFree) -> None:
        bucket = self.by_whole[self.whole.pop(old.id)]
        del bucket[bisect_left(bucket, old.id)]
        del self.nodes[old.id], self.whole_gpus[old.id]
        self.free_slots -= old.free_slots

    def _rebuild(self) -> None:
        """Ranks, label groups and the widest node: only when nodes come, go or change labels."""
        self.rebuilds += 1
        self.ranked = [self.nodes[i] for i in sorted(self.nodes)]
        self.rank = {node.id: rank for rank, node in enumerate(self.ranked)}
        self.groups = LabelGroups(self.ranked)
        self.max_gpus = max((len(n.free_milli) for n in self.ranked), default=0)
        del self.by_whole[self.max_gpus + 1:]
