"""What every placer shares: the ``Placer`` contract, label groups and sorted-index upkeep.

Every placer works on its own copy of the free capacity and implements ``Placer``: labels
must match; among nodes meeting a task's ``prefer`` lists the lower ``NodeFree.preference``
wins before the placer's own criterion; whole-GPU tasks take only GPUs no share is using;
CPU-only tasks take a node without GPUs when one fits. best_fit, spread and first_fit keep
indexes per label group (sorted lists, max trees) so that a decision reads the few nodes that
can win rather than every node; they decide exactly as a scan over every node would
(tests/scheduling/test_placement_speedups.py holds that scan).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Callable, Container, Iterable, Sequence
from typing import Any, Protocol

from broker.models import labels_fit
from broker.scheduling.model import NodeFree, Placement, TaskRequest

NodeKey = Callable[[NodeFree, TaskRequest, list[int]], tuple[float, ...]]


class Placer(Protocol):
    """Chooses where tasks go, one at a time, on its own copy of the free capacity.

    ``choose`` proposes without taking; ``take`` applies a placement (from ``choose`` or
    not) to the copy. ``views`` (backfill holds) maps node ids to a NodeFree to judge
    that node by instead of the placer's own copy (less what is held for others); the
    placement chosen is still taken from the placer's own copy. A task's ``labels``
    must match; among nodes meeting its ``prefer`` lists, lower ``NodeFree.preference``
    wins before the placer's own criterion."""

    nodes: dict[str, NodeFree]

    def choose(self, task: TaskRequest, views: dict[str, NodeFree] | None = None) -> Placement | None: ...

    def take(self, task: TaskRequest, placement: Placement) -> None: ...

    def place(self, task: TaskRequest) -> Placement | None: ...


class ChooseThenTake:
    """``place`` for a Placer: take what ``choose`` proposes."""

    def choose(self, task: TaskRequest, views: dict[str, NodeFree] | None = None) -> Placement | None:
        raise NotImplementedError

    def take(self, task: TaskRequest, placement: Placement) -> None:
        raise NotImplementedError

    def place(self, task: TaskRequest) -> Placement | None:
        placement = self.choose(task)
        if placement is not None:
            self.take(task, placement)
        return placement


class LabelGroups:
    """Nodes by their exact label set and the task names they run: a task is matched once per
    group, not per node."""

    def __init__(self, nodes: Iterable[NodeFree]) -> None:
        self.labels: list[dict[str, str]] = []
        self.serves: list[frozenset[str] | None] = []
        self.of: dict[str, int] = {}  # node id -> group
        known: dict[tuple[Any, ...], int] = {}
        for node in nodes:
            key = (tuple(sorted(node.labels.items())), node.serves)
            if key not in known:
                known[key] = len(self.labels)
                self.labels.append(dict(node.labels))
                self.serves.append(node.serves)
            self.of[node.id] = known[key]
        self._matching: dict[tuple[Any, ...], list[tuple[int, int]]] = {}

    def matching(self, task: TaskRequest) -> list[tuple[int, int]]:
        """(group, its ``NodeFree.preference``) for each group that runs the task's name and has its
        labels and preferences."""
        key = (task.labels, task.prefer, task.name)
        found = self._matching.get(key)
        if found is None:
            found = self._matching[key] = [
                (group, sum(values.index(labels[k]) for k, values in task.prefer))
                for group, (labels, serves) in enumerate(zip(self.labels, self.serves, strict=True))
                if (serves is None or task.name in serves) and labels_fit(labels, task.labels, task.prefer)]
        return found


Entries = list[tuple[list[tuple[int, ...]], tuple[int, ...]]]  # (sorted index, the node's entry in it)


def reindex(before: Entries, after: Entries) -> None:
    """Move a node's entries that changed (same indexes, same order in both lists) to their new place."""
    for (entries, old), (_, new) in zip(before, after, strict=True):
        if old != new:
            del entries[bisect_left(entries, old)]
            insort(entries, new)


class Indexed(ChooseThenTake):
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
            viewed = view.gpus_for(task, self.pick)
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


def cpu_key(node: NodeFree, task: TaskRequest, most_free: bool) -> tuple[float, ...]:
    left = node.free_cpu_milli - task.cpu_milli
    return (len(node.free_milli) > 0, -left if most_free else left)
