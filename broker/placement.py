"""Placers (where one task goes) and the per-node timeline that backfill holds live on.

Every placer works on its own copy of the free capacity and implements ``policy.Placer``:
labels must match; among nodes meeting a task's ``prefer`` lists the lower
``NodeFree.preference`` wins before the placer's own criterion; whole-GPU tasks take only
GPUs no share is using; CPU-only tasks take a node without GPUs when one fits.

- best_fit: the node with the fewest wholly free GPUs that still fits (``policy.BestFit``,
  which it extends, so both propose the same); a share goes to the GPU it fills best.
- spread: the node with the most wholly free GPUs; a share to the GPU with most share free;
  CPU tasks to the node with most CPU free.
- first_fit: nodes by id, lowest GPU index.
- frag_aware: ``broker.fragaware.FragAware`` (FGD).

best_fit, spread and first_fit keep indexes per label group (sorted lists, max trees) so that
a decision reads the few nodes that can win rather than every node; they decide exactly as a
scan over every node would (tests/test_placement_speedups.py holds that scan).

``broker.timeline.Timeline`` (backfill holds, earliest starts) judges nodes with ``gpus_on``
and ``labels_match`` from here.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from bisect import bisect_left
from collections.abc import Callable, Container, Iterable, Mapping, Sequence

from broker.policy import (
    BestFit,
    ChooseThenTake,
    Entries,
    LabelGroups,
    NodeFree,
    Placement,
    Placer,
    TaskRequest,
    reindex,
)
from broker.scheduling import PlacementKind

INF = math.inf
NodeKey = Callable[[NodeFree, TaskRequest, list[int]], tuple[float, ...]]


def gpus_on(node: NodeFree, task: TaskRequest, pick: str = "fill") -> list[int] | None:
    """The GPU indices ``task`` would take on ``node`` ([] for a CPU task), or None if it does not fit.

    Whole GPUs: the lowest wholly free ones. A share: the GPU it fills best (``pick="spread"``:
    the one with most share free; ``"first"``: the lowest index), lowest index on ties."""
    if not node.host_fits(task):
        return None
    if task.whole_gpus:
        if node.gpu_memory_mb < task.gpu_memory_mb:
            return None
        whole = node.whole_indices()
        return whole[: task.whole_gpus] if len(whole) >= task.whole_gpus else None
    if not task.gpu_milli:
        return []
    memory = node.share_memory(task)
    best, best_key = -1, 0
    for i, (milli, mem) in enumerate(zip(node.free_milli, node.free_mem, strict=True)):
        if milli >= task.gpu_milli and mem >= memory:
            key = -milli if pick == "spread" else milli if pick == "fill" else i
            if best < 0 or key < best_key:
                best, best_key = i, key
    return None if best < 0 else [best]


def labels_match(node: NodeFree, task: TaskRequest) -> bool:
    """The node carries the task's labels (and one value of each preference list), whatever is free."""
    return (all(node.labels.get(k) == v for k, v in task.labels)
            and all(node.labels.get(k) in values for k, values in task.prefer))


class _Indexed(ChooseThenTake):
    """A placer whose ``node_key`` ranks the nodes a task fits on (lowest wins, then rank: the
    order nodes came in). Subclasses keep per label group indexes, so that ``_search`` finds a
    group's best node without judging every node; nodes in ``views`` are judged one by one."""

    pick = "fill"

    def __init__(self, nodes: Iterable[NodeFree], node_key: NodeKey) -> None:
        self.nodes = {n.id: n.copy() for n in nodes}
        self.node_key = node_key
        self.free_slots = sum(n.free_slots for n in self.nodes.values())
        self.ranked = list(self.nodes.values())
        self.rank = {node.id: rank for rank, node in enumerate(self.ranked)}
        self.groups = LabelGroups(self.ranked)

    def choose(self, task: TaskRequest, views: dict[str, NodeFree] | None = None) -> Placement | None:
        if self.free_slots <= 0:
            return None
        skip = views or {}
        best: tuple[tuple[float, ...], str, list[int]] | None = None
        for group, preference in self.groups.matching(task):
            if best is not None and preference > best[0][0]:
                continue
            found = self._search(group, task, skip)
            if found is not None:
                node, gpus = found
                key = (preference, *self.node_key(node, task, gpus), self.rank[node.id])
                if best is None or key < best[0]:
                    best = (key, node.id, gpus)
        for node_id, view in skip.items():
            viewed = gpus_on(view, task, self.pick)
            if viewed is not None:
                key = (view.preference(task), *self.node_key(view, task, viewed), self.rank[node_id])
                if best is None or key < best[0]:
                    best = (key, node_id, viewed)
        return None if best is None else Placement(task.id, best[1], tuple(best[2]))

    def _search(self, group: int, task: TaskRequest, skip: Container[str]) -> tuple[NodeFree, list[int]] | None:
        """The lowest-keyed node of ``group`` outside ``skip`` that ``task`` fits on, and its GPUs."""
        raise NotImplementedError

    def _update(self, node: NodeFree, task: TaskRequest, gpus: Sequence[int]) -> None:
        """Take ``task`` from ``node`` and bring the indexes up to date."""
        raise NotImplementedError

    def take(self, task: TaskRequest, placement: Placement) -> None:
        self._update(self.nodes[placement.node_id], task, placement.gpu_indices)
        self.free_slots -= 1


def _cpu_key(node: NodeFree, task: TaskRequest, most_free: bool) -> tuple[float, ...]:
    left = node.free_cpu_milli - task.cpu_milli
    return (len(node.free_milli) > 0, -left if most_free else left)


def _spread_key(node: NodeFree, task: TaskRequest, gpus: list[int]) -> tuple[float, ...]:
    if task.whole_gpus:
        return (-len(node.whole_indices()),)
    if task.gpu_milli:
        return (-node.free_milli[gpus[0]],)
    return _cpu_key(node, task, most_free=True)


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
            gpus = gpus_on(view, task)
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


class SpreadPlacer(_Indexed):
    """Per label group, sorted: nodes by (-wholly free GPUs, rank), GPUs by (-free share, rank,
    index), nodes by (-free CPU, rank) apart for nodes without and with GPUs; a search reads
    from the front and stops at the first that fits."""

    pick = "spread"

    def __init__(self, nodes: Iterable[NodeFree]) -> None:
        super().__init__(nodes, _spread_key)
        groups = len(self.groups.labels)
        self.wholes: list[list[tuple[int, ...]]] = [[] for _ in range(groups)]
        self.shares: list[list[tuple[int, ...]]] = [[] for _ in range(groups)]
        self.cpus: list[list[tuple[int, ...]]] = [[] for _ in range(2 * groups)]
        for node in self.ranked:
            for entries, entry in self._entries(node):
                entries.append(entry)
        for entries in (*self.wholes, *self.shares, *self.cpus):
            entries.sort()

    def _entries(self, node: NodeFree) -> Entries:
        group, rank = self.groups.of[node.id], self.rank[node.id]
        shares = self.shares[group]
        out: Entries = [(shares, (-milli, rank, i)) for i, milli in enumerate(node.free_milli)]
        out.append((self.wholes[group], (-len(node.whole_indices()), rank)))
        out.append((self.cpus[2 * group + (len(node.free_milli) > 0)], (-node.free_cpu_milli, rank)))
        return out

    def _update(self, node: NodeFree, task: TaskRequest, gpus: Sequence[int]) -> None:
        before = self._entries(node)
        node.take(task, gpus)
        reindex(before, self._entries(node))

    def _search(self, group: int, task: TaskRequest, skip: Container[str]) -> tuple[NodeFree, list[int]] | None:
        if task.gpu_milli and not task.whole_gpus:
            entries = self.shares[group]
            for k in range(bisect_left(entries, (1 - task.gpu_milli,))):  # free share >= the task's
                _, rank, i = entries[k]
                node = self.ranked[rank]
                if node.free_mem[i] >= node.share_memory(task) and node.host_fits(task) and node.id not in skip:
                    return node, [i]
            return None
        if task.whole_gpus:
            lists, least = [self.wholes[group]], task.whole_gpus
        else:
            lists, least = [self.cpus[2 * group], self.cpus[2 * group + 1]], task.cpu_milli
        for entries in lists:
            for k in range(bisect_left(entries, (1 - least,))):
                node = self.ranked[entries[k][1]]
                gpus = None if node.id in skip else gpus_on(node, task, self.pick)
                if gpus is not None:
                    return node, gpus
        return None


def _first_fit_key(node: NodeFree, task: TaskRequest, gpus: list[int]) -> tuple[float, ...]:
    return (len(node.free_milli) > 0,) if not task.whole_gpus and not task.gpu_milli else ()


_NONE = -(1 << 62)  # below any value a tree holds


class _MaxTree:
    """A segment tree of per-position maxima: the first position at or after ``start`` whose value
    reaches a threshold, in O(log n)."""

    def __init__(self, values: list[int]) -> None:
        self.size = 1
        while self.size < len(values):
            self.size *= 2
        self.tree = [_NONE] * (2 * self.size)
        self.tree[self.size: self.size + len(values)] = values
        for i in range(self.size - 1, 0, -1):
            self.tree[i] = max(self.tree[2 * i], self.tree[2 * i + 1])

    def set(self, position: int, value: int) -> None:
        tree, i = self.tree, position + self.size
        tree[i] = value
        i //= 2
        while i:
            tree[i] = max(tree[2 * i], tree[2 * i + 1])
            i //= 2

    def first(self, least: int, start: int) -> int | None:
        tree, size = self.tree, self.size
        if start >= size:
            return None
        i = start + size
        while tree[i] < least:  # go to the next subtree to the right
            while i & 1:
                i >>= 1
                if i == 0:
                    return None
            i += 1
        while i < size:
            i = 2 * i if tree[2 * i] >= least else 2 * i + 1
        return i - size


class FirstFitPlacer(_Indexed):
    """Per label group, nodes by id, with max trees of wholly free GPUs, largest free share, and
    free CPU (apart for nodes without and with GPUs): the first node that may fit is found
    in O(log n) and checked."""

    pick = "first"

    def __init__(self, nodes: Iterable[NodeFree]) -> None:
        super().__init__(sorted(nodes, key=lambda n: n.id), _first_fit_key)  # ties keep the first node by id
        self.members: list[list[NodeFree]] = [[] for _ in self.groups.labels]
        self.position: dict[str, int] = {}
        for node in self.ranked:
            members = self.members[self.groups.of[node.id]]
            self.position[node.id] = len(members)
            members.append(node)
        # Per group: [wholly free GPUs, largest free share, free CPU if no GPUs, free CPU if GPUs]
        self.trees = [[_MaxTree(list(values)) for values in zip(*map(self._values, members), strict=True)]
                      for members in self.members]

    @staticmethod
    def _values(node: NodeFree) -> tuple[int, int, int, int]:
        gpus = len(node.free_milli) > 0
        return (len(node.whole_indices()), max(node.free_milli, default=_NONE),
                _NONE if gpus else node.free_cpu_milli, node.free_cpu_milli if gpus else _NONE)

    def _update(self, node: NodeFree, task: TaskRequest, gpus: Sequence[int]) -> None:
        node.take(task, gpus)
        position = self.position[node.id]
        for tree, value in zip(self.trees[self.groups.of[node.id]], self._values(node), strict=True):
            tree.set(position, value)

    def _search(self, group: int, task: TaskRequest, skip: Container[str]) -> tuple[NodeFree, list[int]] | None:
        trees = self.trees[group]
        if task.whole_gpus:
            search, least = trees[:1], task.whole_gpus
        elif task.gpu_milli:
            search, least = trees[1:2], task.gpu_milli
        else:
            search, least = trees[2:], task.cpu_milli
        for tree in search:
            position = tree.first(least, 0)
            while position is not None:
                node = self.members[group][position]
                gpus = None if node.id in skip else gpus_on(node, task, self.pick)
                if gpus is not None:
                    return node, gpus
                position = tree.first(least, position + 1)
        return None


def make_placer(kind: PlacementKind | str, nodes: Iterable[NodeFree], mix: Mapping[str, int] | None = None) -> Placer:
    """A fresh placer of ``kind`` over a copy of ``nodes``; ``mix`` (shape key -> count) feeds frag_aware."""
    try:
        kind = PlacementKind(kind)
    except ValueError:
        known = ", ".join(k.value for k in PlacementKind)
        raise ValueError(f"placement: unknown kind {kind!r} (one of {known})") from None
    if kind is PlacementKind.BEST_FIT:
        return BestFitPlacer(nodes)
    if kind is PlacementKind.SPREAD:
        return SpreadPlacer(nodes)
    if kind is PlacementKind.FIRST_FIT:
        return FirstFitPlacer(nodes)
    from broker.fragaware import FragAware  # written alongside; imported only when chosen

    placer: Placer = FragAware(nodes, mix or {})
    return placer
