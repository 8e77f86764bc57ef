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

``Timeline`` knows, per node, when running tasks release what they hold (by their
estimates) and what is held for blocked higher-ranked tasks (backfill holds, preemptors):
it builds the ``views`` a placer judges a node by, and finds a task's earliest start.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from bisect import bisect_left
from collections.abc import Callable, Collection, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from broker.policy import (
    MILLI,
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
Start = tuple[float, str, list[int]]  # when, node, GPU indices
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


@dataclass(slots=True)
class Usage:
    """What one task holds (or will hold) on one node: ``milli``/``mem`` on each GPU index."""

    task_id: str
    gpu_indices: tuple[int, ...]
    milli: int
    mem: int
    cpu_milli: int
    memory_mb: int

    @classmethod
    def of(cls, task: TaskRequest, node: NodeFree, gpus: Iterable[int]) -> Usage:
        share = bool(task.gpu_milli)
        return cls(task.id, tuple(gpus), task.gpu_milli if share else MILLI,
                   node.share_memory(task) if share else node.gpu_memory_mb, task.cpu_milli, task.memory_mb)

    def apply(self, node: NodeFree, sign: int) -> None:
        for i in self.gpu_indices:
            node.free_milli[i] += sign * self.milli
            node.free_mem[i] += sign * self.mem
        node.free_cpu_milli += sign * self.cpu_milli
        node.free_memory_mb += sign * self.memory_mb
        node.free_slots += sign


@dataclass(slots=True)
class Hold:
    """Capacity kept for ``usage.task_id`` on ``node_id`` over [start, end)."""

    node_id: str
    start: float
    end: float
    usage: Usage


def _min_into(into: NodeFree, other: NodeFree) -> None:
    into.free_milli = [min(a, b) for a, b in zip(into.free_milli, other.free_milli, strict=True)]
    into.free_mem = [min(a, b) for a, b in zip(into.free_mem, other.free_mem, strict=True)]
    into.free_cpu_milli = min(into.free_cpu_milli, other.free_cpu_milli)
    into.free_memory_mb = min(into.free_memory_mb, other.free_memory_mb)
    into.free_slots = min(into.free_slots, other.free_slots)


class Timeline:
    """Free capacity over time, per node: free now (the placer's live copy), plus releases at
    running tasks' expected ends, less holds. Releases only add, so a task that starts at ``t``
    and runs ``d`` fits if it fits at ``t`` and at each hold start in (t, t + d)."""

    def __init__(self, now: float, nodes: dict[str, NodeFree]) -> None:
        self.now = now
        self.nodes = nodes
        self.releases: dict[str, list[tuple[float, Usage]]] = {n: [] for n in nodes}
        self.holds: dict[str, list[Hold]] = {}
        self.later: set[str] = set()  # nodes with a hold that starts after now
        self._binding: dict[str, None] = {}  # nodes where some task's view is less than what is free (ordered)
        self._dirty: dict[str, None] = {}
        self.version: dict[str, int] = dict.fromkeys(nodes, 0)
        self.changes = 0  # bumped on every change anywhere: keys the caches below
        self._views: dict[tuple[str, int, int], NodeFree | None] = {}
        self._earliest: dict[tuple[Any, ...], Start | None] = {}
        self._node_earliest: dict[tuple[Any, ...], tuple[int, tuple[float, list[int]] | None]] = {}
        self._bounds: dict[str, tuple[int, list[float]]] = {}

    def touch(self, node_id: str) -> None:
        self.version[node_id] += 1
        self.changes += 1
        self._dirty[node_id] = None

    def release(self, node_id: str, when: float | None, usage: Usage) -> None:
        """``usage`` comes back at ``when`` (None: not before the end of time, but a preemption may move it)."""
        self.releases[node_id].append((INF if when is None else max(when, self.now), usage))
        self.releases[node_id].sort(key=lambda r: r[0])
        self.touch(node_id)

    def release_now(self, node_id: str, task_id: str, usage: Usage) -> None:
        """A task asked to stop: what it holds counts as coming back now."""
        kept = [r for r in self.releases[node_id] if r[1].task_id != task_id]
        self.releases[node_id] = [(self.now, usage), *kept]
        self.touch(node_id)

    def hold(self, hold: Hold) -> None:
        self.holds.setdefault(hold.node_id, []).append(hold)
        if hold.start > self.now:
            self.later.add(hold.node_id)
        self.touch(hold.node_id)

    def state_at(self, node_id: str, when: float, moved: Collection[str] = ()) -> NodeFree:
        """Free at ``when``: ``moved`` task ids release now instead of at their end."""
        state = self.nodes[node_id].copy()
        for at, usage in self.releases[node_id]:
            if at <= when or usage.task_id in moved:
                usage.apply(state, 1)
        for h in self.holds.get(node_id, ()):
            if h.start <= when < h.end:
                h.usage.apply(state, -1)
        return state

    def window(self, node_id: str, start: float, end: float, moved: Collection[str] = ()) -> NodeFree:
        """Free throughout [start, end): the least of what is free at each point."""
        state = self.state_at(node_id, start, moved)
        for h in self.holds.get(node_id, ()):
            if start < h.start < end:
                _min_into(state, self.state_at(node_id, h.start, moved))
        return state

    def views(self, duration: float) -> dict[str, NodeFree] | None:
        """Per node with a hold starting before now + ``duration``: what a task running that long
        may take now without delaying any hold."""
        for node_id in self._dirty:  # a node whose view is its free capacity for the longest task is so for all
            if node_id in self.holds:
                view = self.window(node_id, self.now, INF)
                _min_into(view, self.nodes[node_id])
                if view == self.nodes[node_id]:
                    self._binding.pop(node_id, None)
                else:
                    self._binding[node_id] = None
        self._dirty.clear()
        out = {}
        for node_id in self._binding:
            holds = self.holds[node_id]
            starts = sum(1 for h in holds if h.start < self.now + duration)
            if not starts:
                continue
            key = (node_id, self.version[node_id], starts)
            if key not in self._views:
                view = self.window(node_id, self.now, self.now + duration)
                _min_into(view, self.nodes[node_id])
                self._views[key] = None if view == self.nodes[node_id] else view  # a hold on busy GPUs only
            found = self._views[key]
            if found is not None:
                out[node_id] = found
        return out or None

    def earliest(self, task: TaskRequest, duration: float, order: Mapping[str, int], fits_now: bool = True
                 ) -> Start | None:
        """When and where ``task`` could start soonest given expected ends and holds: (time, node, GPUs).

        ``fits_now=False`` promises it fits on no node's free capacity now (it was just refused)."""
        key = (task.shape, duration if self.holds else None, self.changes, fits_now)
        if key not in self._earliest:
            self._earliest[key] = self._search(task, duration, order, fits_now)
        return self._earliest[key]

    def _search(self, task: TaskRequest, duration: float, order: Mapping[str, int], fits_now: bool) -> Start | None:
        candidates = [n for n in self.nodes.values()
                      if len(n.free_milli) >= task.whole_gpus and labels_match(n, task)
                      and (not task.gpu_milli or n.free_milli)]
        # Lower bounds, to visit likely nodes first and stop early: the k-th GPU to become wholly
        # free; else, for a task that fits nowhere now, a node's first release (nothing there changes before).
        bounds = {n.id: self._bound(n.id, task, fits_now) for n in candidates}
        candidates.sort(key=lambda n: bounds[n.id])
        best: tuple[tuple[float, int, int], str, list[int]] | None = None
        for node in candidates:
            if bounds[node.id] == INF or (best is not None and bounds[node.id] > best[0][0]):
                break
            found = self._node_earliest_cached(node.id, task, duration)
            if found is not None:
                rank = (found[0], node.preference(task), order[node.id])
                if best is None or rank < best[0]:
                    best = (rank, node.id, found[1])
        return None if best is None else (best[0][0], best[1], best[2])

    def _bound(self, node_id: str, task: TaskRequest, fits_now: bool) -> float:
        if task.whole_gpus:
            return self._whole_bound(node_id, task.whole_gpus)
        if fits_now or node_id in self.holds:
            return self.now
        releases = self.releases[node_id]
        return releases[0][0] if releases else INF

    def _whole_bound(self, node_id: str, count: int) -> float:
        cached = self._bounds.get(node_id)
        if cached is None or cached[0] != self.version[node_id]:
            cached = (self.version[node_id], self._ready_times(node_id))
            self._bounds[node_id] = cached
        return cached[1][count - 1]

    def _ready_times(self, node_id: str) -> list[float]:
        """When each GPU becomes wholly free by the expected ends, soonest first (inf: never known)."""
        node = self.nodes[node_id]
        ready = [self.now if node.gpu_is_whole(i) else INF for i in range(len(node.free_milli))]
        ultimate = node.copy()
        last = [self.now] * len(ready)
        for at, usage in self.releases[node_id]:
            if at == INF:
                break
            usage.apply(ultimate, 1)
            for i in usage.gpu_indices:
                last[i] = max(last[i], at)
        for i in range(len(ready)):
            if ready[i] == INF and ultimate.gpu_is_whole(i):
                ready[i] = last[i]
        return sorted(ready)

    def _node_earliest_cached(self, node_id: str, task: TaskRequest, duration: float) -> tuple[float, list[int]] | None:
        key = (node_id, task.shape, duration if node_id in self.holds else None)
        cached = self._node_earliest.get(key)
        if cached is not None and cached[0] == self.version[node_id]:
            return cached[1]
        found = self._node_earliest_at(node_id, task, duration)
        self._node_earliest[key] = (self.version[node_id], found)
        return found

    def _node_earliest_at(self, node_id: str, task: TaskRequest, duration: float) -> tuple[float, list[int]] | None:
        releases = self.releases[node_id]
        if node_id not in self.holds:  # free only grows: apply releases in time order until it fits
            state = self.nodes[node_id].copy()
            when, i = self.now, 0
            while True:
                while i < len(releases) and releases[i][0] <= when:
                    releases[i][1].apply(state, 1)
                    i += 1
                gpus = gpus_on(state, task)
                if gpus is not None:
                    return when, gpus
                if i == len(releases) or releases[i][0] == INF:
                    return None
                when = releases[i][0]
        times = sorted({self.now, *(at for at, _ in releases if at < INF),
                        *(h.end for h in self.holds[node_id] if self.now < h.end < INF)})
        for when in times:
            gpus = gpus_on(self.window(node_id, when, when + duration), task)
            if gpus is not None:
                return when, gpus
        return None
