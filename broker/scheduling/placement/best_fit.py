"""best_fit, the default placer, and the dispatcher's lazy spine planner built on it.

Whole-GPU tasks go to the node with the fewest wholly free GPUs that still has enough (fills
busy nodes, keeps empty ones whole); GPU shares go to the GPU they fill best (least share left
over); CPU tasks prefer nodes without GPUs, then the tightest CPU fit.

``BestFit`` is the indexed core; ``BestFitPlacer`` adds the ``Placer`` contract (choose/take,
preference lists, backfill views); ``propose`` is the spine: priority order, skip-ahead,
best fit, lazy on both sides so the dispatcher commits one batch while it plans the next.
"""

from __future__ import annotations

import dataclasses
import itertools
from bisect import bisect_left
from collections.abc import Container, Iterable, Iterator, Sequence
from typing import Any

from broker.scheduling.model import NodeFree, Placement, TaskRequest
from broker.scheduling.placement.base import ChooseThenTake, Entries, LabelGroups, reindex
from broker.scheduling.placement.free_index import FreeIndex


class BestFit:
    """Places tasks one at a time onto a private copy of the cluster's free capacity.

    Indexed so that a placement looks at the few nodes that can win, not every node: wholly
    free GPU count -> nodes (whole GPUs); per label group, every GPU sorted by (free share,
    its node's wholly free count, node rank, index), and nodes sorted by (free CPU, rank),
    apart for nodes with and without GPUs. Rank (the order nodes came in) breaks ties as the
    plain scan over all nodes did."""

    def __init__(self, nodes: Iterable[NodeFree]) -> None:
        # The caller's nodes, copied only when a placement takes from one (own()): most cycles
        # place a few tasks on a few of thousands of nodes.
        self.nodes = {n.id: n for n in nodes}
        self.owned: set[str] = set()
        self.max_gpus = max((len(n.free_milli) for n in self.nodes.values()), default=0)
        # Wholly free GPU count -> node ids, insertion-ordered so ties break the same way each run.
        self.by_whole: list[dict[str, None]] = [{} for _ in range(self.max_gpus + 1)]
        self.whole: dict[str, int] = {}
        # Node id -> its wholly free GPU indices, ascending: kept up to date as tasks are placed
        # rather than recounted, since every placement needs them.
        self.whole_gpus: dict[str, list[int]] = {}
        for node in self.nodes.values():
            self.whole_gpus[node.id] = node.whole_indices()
            self._file(node, len(self.whole_gpus[node.id]))
        self.free_slots = sum(n.free_slots for n in self.nodes.values())
        self.ranked = list(self.nodes.values())
        self.rank = {node.id: rank for rank, node in enumerate(self.ranked)}
        self.groups = LabelGroups(self.ranked)
        # The share and CPU indexes are built when the first such task asks: a pass of whole-GPU
        # tasks (most cycles, often with one task) should not pay for sorting every GPU.
        self.indexed = False
        self.shares: list[list[tuple[int, ...]]] = [[] for _ in self.groups.labels]
        self.cpus: list[list[tuple[int, ...]]] = [[] for _ in range(2 * len(self.groups.labels))]

    @classmethod
    def from_index(cls, index: FreeIndex) -> BestFit:
        """Start from a FreeIndex kept across cycles: containers copied, no node visited one by one;
        the same placements as ``BestFit(nodes)`` over its nodes in id order."""
        fit = cls.__new__(cls)
        fit.nodes, fit.owned, fit.max_gpus = dict(index.nodes), set(), index.max_gpus
        fit.by_whole = [dict.fromkeys(bucket) for bucket in index.by_whole[: index.max_gpus + 1]]
        fit.by_whole += [{} for _ in range(index.max_gpus + 1 - len(fit.by_whole))]
        fit.whole, fit.whole_gpus = dict(index.whole), dict(index.whole_gpus)  # lists copied by own()
        fit.free_slots, fit.ranked, fit.rank = index.free_slots, list(index.ranked), index.rank
        fit.groups = index.groups
        fit.indexed = False
        fit.shares = [[] for _ in fit.groups.labels]
        fit.cpus = [[] for _ in range(2 * len(fit.groups.labels))]
        return fit

    def own(self, node_id: str) -> NodeFree:
        """The node, as this placer's own copy (made on first use) that placements may change."""
        node = self.nodes[node_id]
        if node_id not in self.owned:
            self.owned.add(node_id)
            node = self.nodes[node_id] = self.ranked[self.rank[node_id]] = node.copy()
            self.whole_gpus[node_id] = list(self.whole_gpus[node_id])  # from_index shares the lists
        return node

    def index(self) -> None:
        if self.indexed:
            return
        self.indexed = True
        for node in self.ranked:
            for entries, entry in self._entries(node):
                entries.append(entry)
        for entries in (*self.shares, *self.cpus):
            entries.sort()

    def indexed_entries(self, node: NodeFree) -> Entries:
        """The node's index entries, or none while the indexes are not built."""
        return self._entries(node) if self.indexed else []

    def _entries(self, node: NodeFree) -> Entries:
        group, rank, whole = self.groups.of[node.id], self.rank[node.id], self.whole[node.id]
        shares = self.shares[group]
        out: Entries = [(shares, (milli, whole, rank, i)) for i, milli in enumerate(node.free_milli)]
        out.append((self.cpus[2 * group + (len(node.free_milli) > 0)], (node.free_cpu_milli, rank)))
        return out

    def _file(self, node: NodeFree, count: int) -> None:
        self.whole[node.id] = count
        self.by_whole[count][node.id] = None

    def _refile(self, node: NodeFree, count: int) -> None:
        """Move the node to the back of the bucket for ``count``, even when that is its own bucket."""
        del self.by_whole[self.whole[node.id]][node.id]
        self.whole[node.id] = count
        self.by_whole[count][node.id] = None

    def place(self, task: TaskRequest) -> Placement | None:
        if self.free_slots <= 0:
            return None
        if task.whole_gpus:
            choice = self._whole(task)
        elif task.gpu_milli:
            choice = self._share(task)
        else:
            choice = self._cpu(task)
        if choice is None:
            return None
        node, gpus = choice
        node = self.own(node.id)
        before = self.indexed_entries(node)
        whole = self.whole_gpus[node.id]
        if task.whole_gpus:
            del whole[: len(gpus)]  # _whole hands out the lowest wholly free indices
        elif gpus and gpus[0] in whole:
            whole.remove(gpus[0])  # a share leaves its GPU partly used
        node.take(task, gpus)
        self._refile(node, len(whole))
        reindex(before, self.indexed_entries(node))
        self.free_slots -= 1
        return Placement(task.id, node.id, tuple(gpus))

    def _whole(self, task: TaskRequest) -> tuple[NodeFree, list[int]] | None:
        for bucket in self.by_whole[task.whole_gpus:]:
            for node_id in bucket:
                node = self.nodes[node_id]
                if node.gpu_memory_mb >= task.gpu_memory_mb and node.host_fits(task):
                    return node, self.whole_gpus[node_id][: task.whole_gpus]
        return None

    def _share(self, task: TaskRequest) -> tuple[NodeFree, list[int]] | None:
        best = self._best_share(task)
        return None if best is None else (self.ranked[best[2]], [best[3]])

    def _best_share(self, task: TaskRequest, skip: Container[str] = ()) -> tuple[int, ...] | None:
        """The least (free share, node's wholly free count, rank, index) of a GPU the share fits on,
        outside nodes in ``skip``: least share left over, then the node with fewest whole GPUs."""
        self.index()
        best: tuple[int, ...] | None = None
        for group, _ in self.groups.matching(task):
            entries = self.shares[group]
            for k in range(bisect_left(entries, (task.gpu_milli,)), len(entries)):
                entry = entries[k]
                if best is not None and entry >= best:
                    break
                node = self.ranked[entry[2]]
                if (node.free_mem[entry[3]] >= node.share_memory(task) and node.host_fits(task)
                        and node.id not in skip):
                    best = entry
                    break
        return best

    def _cpu(self, task: TaskRequest) -> tuple[NodeFree, list[int]] | None:
        best = self._best_cpu(task)
        return None if best is None else (self.ranked[best[2]], [])

    def _best_cpu(self, task: TaskRequest, skip: Container[str] = ()) -> tuple[int, ...] | None:
        """The least (has GPUs, free CPU, rank) of a node the task fits on, outside ``skip``:
        nodes without GPUs first, then the tightest CPU fit."""
        self.index()
        best: tuple[int, ...] | None = None
        for gpus in (0, 1):
            for group, _ in self.groups.matching(task):
                entries = self.cpus[2 * group + gpus]
                for k in range(bisect_left(entries, (task.cpu_milli,)), len(entries)):
                    entry = (gpus, *entries[k])
                    if best is not None and entry >= best:
                        break
                    node = self.ranked[entry[2]]
                    if node.host_fits(task) and node.id not in skip:
                        best = entry
                        break
            if best is not None:
                return best
        return None


class BestFitPlacer(ChooseThenTake, BestFit):
    """``policy.BestFit`` with choose/take, ``prefer`` (each acceptable label set in turn) and ``views``."""

    def choose(self, task: TaskRequest, views: dict[str, NodeFree] | None = None) -> Placement | None:
        if self.free_slots <= 0:
            return None
        if not task.prefer:
            return self._fast(task, views or {})
        for labels in _preferred(task):  # most preferred first
            found = self._fast(dataclasses.replace(task, labels=labels, prefer=()), views or {})
            if found is not None:
                return Placement(task.id, found.node_id, found.gpu_indices)
        return None

    def _fast(self, task: TaskRequest, views: dict[str, NodeFree]) -> Placement | None:
        if task.whole_gpus:
            choice = self._whole_viewed(task, views) if views else self._whole(task)
        elif task.gpu_milli:
            choice = self._share_viewed(task, views) if views else self._share(task)
        else:
            choice = self._cpu_viewed(task, views) if views else self._cpu(task)
        return None if choice is None else Placement(task.id, choice[0].id, tuple(choice[1]))

    def _whole_viewed(self, task: TaskRequest, views: dict[str, NodeFree]) -> tuple[NodeFree, list[int]] | None:
        """BestFit._whole, judging the nodes in ``views`` by their view."""
        best: tuple[int, NodeFree, list[int]] | None = None
        for node_id, view in views.items():
            gpus = view.gpus_for(task)
            if gpus is not None and (best is None or len(view.whole_indices()) < best[0]):
                best = (len(view.whole_indices()), self.nodes[node_id], gpus)
        last = self.max_gpus if best is None else best[0]
        for bucket in self.by_whole[task.whole_gpus: last + 1]:
            for node_id in bucket:
                node = self.nodes[node_id]
                if node_id not in views and node.gpu_memory_mb >= task.gpu_memory_mb and node.host_fits(task):
                    return node, self.whole_gpus[node_id][: task.whole_gpus]
        return None if best is None else (best[1], best[2])

    def _share_viewed(self, task: TaskRequest, views: dict[str, NodeFree]) -> tuple[NodeFree, list[int]] | None:
        """BestFit._share, judging the nodes in ``views`` by their view."""
        best = self._best_share(task, views)
        for node_id, view in views.items():
            if not view.free_milli or not view.host_fits(task):
                continue
            memory, whole, rank = view.share_memory(task), len(view.whole_indices()), self.rank[node_id]
            for i, milli in enumerate(view.free_milli):
                if milli >= task.gpu_milli and view.free_mem[i] >= memory and (
                        best is None or (milli, whole, rank, i) < best):
                    best = (milli, whole, rank, i)
        return None if best is None else (self.ranked[best[2]], [best[3]])

    def _cpu_viewed(self, task: TaskRequest, views: dict[str, NodeFree]) -> tuple[NodeFree, list[int]] | None:
        """BestFit._cpu, judging the nodes in ``views`` by their view."""
        best = self._best_cpu(task, views)
        for node_id, view in views.items():
            key = (len(view.free_milli) > 0, view.free_cpu_milli, self.rank[node_id])
            if view.host_fits(task) and (best is None or key < best):
                best = key
        return None if best is None else (self.ranked[best[2]], [])

    def take(self, task: TaskRequest, placement: Placement) -> None:
        node = self.own(placement.node_id)
        before = self.indexed_entries(node)
        node.take(task, placement.gpu_indices)
        whole = self.whole_gpus[node.id]
        for i in placement.gpu_indices:
            if i in whole:
                whole.remove(i)
        self._refile(node, len(whole))
        reindex(before, self.indexed_entries(node))
        self.free_slots -= 1


def _preferred(task: TaskRequest) -> list[tuple[tuple[str, str], ...]]:
    """Exact label sets meeting ``task.prefer``, lowest total preference first."""
    keys = [k for k, _ in task.prefer]
    combos = itertools.product(*(list(enumerate(values)) for _, values in task.prefer))
    ranked = sorted(combos, key=lambda combo: sum(i for i, _ in combo))
    return [tuple(sorted((*task.labels, *zip(keys, (v for _, v in combo), strict=True)))) for combo in ranked]


def propose(tasks: Iterable[TaskRequest], nodes: Iterable[NodeFree] | FreeIndex,
            tokens: dict[str, float] | None = None) -> Iterator[Placement]:
    """Propose placements for ``tasks`` (already in dispatch order) onto ``nodes`` (or the nodes
    a FreeIndex keeps: the same placements), one at a time.
    ``tokens``: starts each rate-limited task name may take now (taken from as tasks are placed).

    Lazy on both sides: the dispatcher commits each batch while the next is planned, and
    ``tasks`` is not read past the point where every free slot is taken."""
    fit = BestFit.from_index(nodes) if isinstance(nodes, FreeIndex) else BestFit(nodes)
    failed: set[tuple[Any, ...]] = set()
    pending = iter(tasks)
    while fit.free_slots > 0:  # checked before taking a task: the next one may cost a Redis read
        task = next(pending, None)
        if task is None:
            return
        if failed and task.shape in failed:  # capacity only shrinks within a plan
            continue
        if tokens and task.name in tokens:
            if tokens[task.name] < 1:
                continue
            tokens[task.name] -= 1
        placement = fit.place(task)
        if placement is None:
            failed.add(task.shape)
            if tokens and task.name in tokens:
                tokens[task.name] += 1
        else:
            yield placement


def plan(tasks: Sequence[TaskRequest], nodes: Iterable[NodeFree]) -> list[Placement]:
    """``propose``, all at once: the spine's decision for a whole queue (tests and benchmarks
    compare against it; the dispatcher takes ``propose`` lazily)."""
    return list(propose(tasks, nodes))
