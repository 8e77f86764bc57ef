"""best_fit, the default placer, and the dispatcher's lazy spine planner built on it.

Each task goes to the fullest node it fits on, every resource weighed: free GPU, GPU memory,
CPU and memory, each as a share of the largest node's, summed with ``WEIGHTS`` (the ATC '23
paper's best fit weighs free CPU and GPU half and half; GPU-only packing strands GPUs on nodes
whose CPU ran out). A share takes the GPU it fills best there (least share left over); whole
GPUs are the lowest wholly free ones; CPU tasks prefer nodes without GPUs.

``BestFit`` is the indexed core; ``BestFitPlacer`` adds the ``Placer`` contract (choose/take,
preference lists, backfill views); ``propose`` is the spine: priority order, skip-ahead,
best fit, lazy on both sides so the dispatcher commits one batch while it plans the next.
"""

from __future__ import annotations

import dataclasses
import itertools
from bisect import bisect_left, insort
from collections.abc import Container, Iterable, Iterator, Sequence
from typing import Any, Self

from broker.models import MILLI
from broker.scheduling.model import NodeFree, Placement, TaskRequest, WarmMap
from broker.scheduling.placement.base import ChooseThenTake, LabelGroups
from broker.scheduling.placement.free_index import SCALE, WEIGHTS, Entry, FreeIndex, Key, factors_of, fullness
from broker.scheduling.placement.warm import COLD_TRIES, cold_gpus, steered, warm_choice

SHARE_BUCKETS = 20  # nodes filed by the most share free on one GPU, in steps of MILLI / SHARE_BUCKETS
__all__ = ["SCALE", "WEIGHTS", "BestFit", "BestFitPlacer", "fullness", "plan", "propose"]  # fullness: free_index's


def _share_bucket(node: NodeFree) -> int:
    return max(node.free_milli, default=0) * SHARE_BUCKETS // MILLI


class BestFit:
    """Places tasks one at a time onto a private copy of the cluster's free capacity: each on the
    fullest node it fits on, every resource weighed (``fullness``: free GPU, GPU memory, CPU and
    memory, each as a share of the largest node's), then the node given first. A share takes the
    GPU it fills best there; CPU tasks prefer nodes without GPUs.

    Indexed so that a placement looks at the few nodes that can win, not every node: per label
    group, nodes sorted by (fullness, rank) in buckets by wholly free GPU count (whole-GPU
    tasks), by the most share free on one GPU (shares) and by whether they have GPUs (CPU
    tasks). A bucket is read from its fullest node to the first the task fits on."""

    def __init__(self, nodes: Iterable[NodeFree]) -> None:
        # The caller's nodes, copied only when a placement takes from one (own()): most cycles
        # place a few tasks on a few of thousands of nodes.
        self.nodes = {n.id: n for n in nodes}
        self.ranked = list(self.nodes.values())
        self.rank = {node.id: rank for rank, node in enumerate(self.ranked)}
        self.groups = LabelGroups(self.ranked)
        self.factors = factors_of(self.ranked)
        self.max_gpus = max((len(n.free_milli) for n in self.ranked), default=0)
        # Node id -> its wholly free GPU indices, ascending: kept up to date as tasks are placed
        # (each list copied when its node is first taken from: own()).
        self.whole_gpus: dict[str, list[int]] = {n.id: n.whole_indices() for n in self.ranked}
        self.free_slots = sum(n.free_slots for n in self.ranked)
        # (kind, group, bucket) -> sorted [(fullness, rank)]; kind "w": whole, "s": share, "c": CPU.
        # Each kind of bucket is built when the first task that reads it asks: a pass of whole-GPU
        # tasks (most cycles, often with one task) should not pay for the other two.
        self.buckets: dict[Key, list[Entry]] = {}
        self.built: set[str] = set()
        self._filed_w: dict[str, Key] = {}  # from_index: each node's whole-GPU bucket as the index filed it
        self._start()

    def _start(self) -> None:
        """What each pass starts empty."""
        self.owned: set[str] = set()
        self.failed: set[tuple[Any, ...]] = set()  # task shapes that fit nowhere
        self.dead: dict[tuple[Any, ...], set[int]] = {}  # task shape -> ranks of nodes it does not fit
        self._keys_memo: dict[tuple[int, int, int], list[Key]] = {}
        self.filed: dict[str, list[tuple[Key, Entry]]] = {}  # node id -> its entries in built buckets

    def _filed(self, node: NodeFree) -> list[tuple[Key, Entry]]:
        found = self.filed.get(node.id)
        if found is None:
            key = self._filed_w.get(node.id)
            found = self.filed[node.id] = [] if key is None else [(key, (fullness(node, self.factors),
                                                                         self.rank[node.id]))]
        return found

    def _index(self, kind: str) -> None:
        if kind in self.built:
            return
        self.built.add(kind)
        touched = set()
        for node in self.ranked:
            filed = self._filed(node)
            for key, entry in self._entries(node, (kind,)):
                self.buckets.setdefault(key, []).append(entry)
                filed.append((key, entry))
                touched.add(key)
        for key in touched:
            self.buckets[key].sort()

    @classmethod
    def from_index(cls, index: FreeIndex) -> Self:
        """Start from a FreeIndex kept across cycles (its nodes in id order): the same placements
        as ``BestFit(nodes)`` over them. Its whole-GPU buckets are copied (list copies, no visit
        per node); share and CPU buckets are built here, as a task of their kind first asks."""
        fit = cls.__new__(cls)
        fit.nodes = dict(zip(index.ids, index.ranked, strict=True))
        fit.ranked, fit.rank, fit.groups = list(index.ranked), index.rank, index.groups
        fit.factors, fit.max_gpus = index.factors, index.max_gpus
        fit.whole_gpus, fit.free_slots = dict(index.whole_gpus), index.free_slots
        fit.buckets = {key: list(entries) for key, entries in index.buckets.items()}
        fit.built, fit._filed_w = {"w"}, index.filed
        fit._start()
        return fit

    def own(self, node_id: str) -> NodeFree:
        """The node, as this placer's own copy (made on first use) that placements may change."""
        node = self.nodes[node_id]
        if node_id not in self.owned:
            self.owned.add(node_id)
            self._filed(node)  # its entries, as filed before this copy changes
            node = self.nodes[node_id] = self.ranked[self.rank[node_id]] = node.copy()
            self.whole_gpus[node_id] = list(self.whole_gpus[node_id])
        return node

    def _entries(self, node: NodeFree, kinds: Iterable[str]) -> list[tuple[tuple[str, int, int], tuple[int, int]]]:
        """The node's bucket entries for ``kinds`` ("w": whole GPUs, "s": shares, "c": CPU)."""
        group, entry = self.groups.of[node.id], (fullness(node, self.factors), self.rank[node.id])
        out = []
        for kind in kinds:
            if kind == "c":
                out.append((("c", group, int(bool(node.free_milli))), entry))
            elif node.free_milli:
                bucket = len(self.whole_gpus[node.id]) if kind == "w" else _share_bucket(node)
                out.append(((kind, group, bucket), entry))
        return out

    def _refile(self, node: NodeFree) -> None:
        for key, entry in self._filed(node):
            entries = self.buckets[key]
            del entries[bisect_left(entries, entry)]
        self.filed[node.id] = after = self._entries(node, self.built)
        for key, entry in after:
            insort(self.buckets.setdefault(key, []), entry)

    def place(self, task: TaskRequest) -> Placement | None:
        if self.free_slots <= 0:
            return None
        choice = self._best(task)
        if choice is None:
            return None
        node, gpus = choice
        self._take(node.id, task, gpus)
        return Placement(task.id, node.id, tuple(gpus))

    def _take(self, node_id: str, task: TaskRequest, gpus: Sequence[int]) -> None:
        node = self.own(node_id)
        node.take(task, gpus)
        whole = self.whole_gpus[node_id]
        for i in gpus:
            if i in whole:
                whole.remove(i)
        self._refile(node)
        self.free_slots -= 1

    def _keys(self, task: TaskRequest, group: int) -> list[tuple[str, int, int]]:
        """The buckets of ``group`` where ``task`` may fit, CPU tasks' GPU-less nodes first."""
        memo = (task.whole_gpus, task.gpu_milli, group)
        found = self._keys_memo.get(memo)
        if found is None:
            found = self._keys_memo[memo] = self._bucket_keys(task, group)
        return found

    def _bucket_keys(self, task: TaskRequest, group: int) -> list[tuple[str, int, int]]:
        if task.whole_gpus:
            return [("w", group, c) for c in range(task.whole_gpus, self.max_gpus + 1)]
        if task.gpu_milli:
            return [("s", group, b) for b in range(task.gpu_milli * SHARE_BUCKETS // MILLI, SHARE_BUCKETS + 1)]
        return [("c", group, 0), ("c", group, 1)]

    def _best(self, task: TaskRequest, skip: Container[str] = ()) -> tuple[NodeFree, list[int]] | None:
        """The fullest node outside ``skip`` that ``task`` fits on, and its GPUs (CPU tasks: nodes
        without GPUs first)."""
        shape = task.shape
        if shape in self.failed:
            return None
        self._index("w" if task.whole_gpus else "s" if task.gpu_milli else "c")
        # Free capacity only shrinks in a placer: a node a shape did not fit never will.
        dead = self.dead.setdefault(shape, set())
        best: tuple[tuple[int, int, int], list[int]] | None = None
        cpu_only = not (task.whole_gpus or task.gpu_milli)
        for group, _ in self.groups.matching(task):
            for key in self._keys(task, group):
                entries = self.buckets.get(key)
                if not entries:
                    continue
                for entry in entries:
                    if entry[1] in dead:
                        continue
                    ranked = (key[2] if cpu_only else 0, *entry)
                    if best is not None and ranked >= best[0]:
                        break
                    node = self.ranked[entry[1]]
                    if node.id in skip:
                        continue
                    gpus = self._gpus(node, task)
                    if gpus is not None:
                        best = (ranked, gpus)
                        break
                    dead.add(entry[1])
        if best is None:
            if not skip:
                self.failed.add(shape)
            return None
        return self.ranked[best[0][2]], best[1]

    def _gpus(self, node: NodeFree, task: TaskRequest) -> list[int] | None:
        if task.whole_gpus:
            whole = self.whole_gpus[node.id]
            if len(whole) < task.whole_gpus or node.gpu_memory_mb < task.gpu_memory_mb or not node.host_fits(task):
                return None
            return whole[: task.whole_gpus]
        return node.gpus_for(task)


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
        choice = self._best(task, views)
        if views:
            best = None if choice is None else self._ranked(self.nodes[choice[0].id], task)
            for node_id, view in views.items():
                gpus = view.gpus_for(task)
                if gpus is not None:
                    key = self._ranked(view, task, node_id)
                    if best is None or key < best:
                        best, choice = key, (self.nodes[node_id], gpus)
        return None if choice is None else Placement(task.id, choice[0].id, tuple(choice[1]))

    def _ranked(self, node: NodeFree, task: TaskRequest, node_id: str | None = None) -> tuple[int, int, int]:
        """How ``_best`` ranks a node (lower wins), judged by what is free on ``node``."""
        cpu_only = not (task.whole_gpus or task.gpu_milli)
        return (int(bool(node.free_milli)) if cpu_only else 0, fullness(node, self.factors),
                self.rank[node_id or node.id])

    def take(self, task: TaskRequest, placement: Placement) -> None:
        self._take(placement.node_id, task, placement.gpu_indices)


def _preferred(task: TaskRequest) -> list[tuple[tuple[str, str], ...]]:
    """Exact label sets meeting ``task.prefer``, lowest total preference first."""
    keys = [k for k, _ in task.prefer]
    combos = itertools.product(*(list(enumerate(values)) for _, values in task.prefer))
    ranked = sorted(combos, key=lambda combo: sum(i for i, _ in combo))
    return [tuple(sorted((*task.labels, *zip(keys, (v for _, v in combo), strict=True)))) for combo in ranked]


def propose(tasks: Iterable[TaskRequest], nodes: Iterable[NodeFree] | FreeIndex,
            tokens: dict[str, float] | None = None, warm: WarmMap | None = None) -> Iterator[Placement]:
    """Propose placements for ``tasks`` (already in dispatch order) onto ``nodes`` (or the nodes
    a FreeIndex keeps: the same placements), one at a time.
    ``tokens``: starts each rate-limited task name may take now (taken from as tasks are placed).
    ``warm``: GPU sets warm for task names; a task takes its warm set when it fits (``placement.warm``).

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
        placement = _warm_place(fit, task, warm) if warm and steered(task) else fit.place(task)
        if placement is None:
            failed.add(task.shape)
            if tokens and task.name in tokens:
                tokens[task.name] += 1
        else:
            yield placement


def _warm_place(fit: BestFit, task: TaskRequest, warm: WarmMap) -> Placement | None:
    """``fit.place`` minding warm processes (``placement.warm``): the set warm for the task's name;
    else best fit's choice unless it takes GPUs a warm process holds: then a set on that node, or
    on one of the next ``COLD_TRIES`` nodes best fit would take, that none holds."""
    if fit.free_slots <= 0:
        return None
    found = warm_choice(task, warm, fit.nodes)
    choice = (found.node_id, list(found.gpu_indices)) if found is not None else None
    first = None
    if choice is None:
        best = first = fit._best(task)
        skip: set[str] = set()
        while best is not None and warm.evicts(best[0].id, best[1]):
            cold = cold_gpus(best[0], task, warm)
            if cold is not None:
                choice = (best[0].id, list(cold))
                break
            skip.add(best[0].id)
            best = fit._best(task, skip) if len(skip) <= COLD_TRIES else None
        else:
            choice = (best[0].id, best[1]) if best is not None else None
        if choice is None and first is not None:
            choice = (first[0].id, first[1])
    if choice is None:
        return None
    fit._take(choice[0], task, choice[1])
    return Placement(task.id, choice[0], tuple(choice[1]))


def plan(tasks: Sequence[TaskRequest], nodes: Iterable[NodeFree]) -> list[Placement]:
    """``propose``, all at once: the spine's decision for a whole queue (tests and benchmarks
    compare against it; the dispatcher takes ``propose`` lazily)."""
    return list(propose(tasks, nodes))
