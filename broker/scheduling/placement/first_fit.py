"""first_fit: nodes by id, lowest GPU index that fits."""

from __future__ import annotations

from collections.abc import Container, Iterable, Sequence

from broker.scheduling.model import NodeFree, TaskRequest
from broker.scheduling.placement.base import Indexed


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


class FirstFitPlacer(Indexed):
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
                gpus = None if node.id in skip else node.gpus_for(task, self.pick)
                if gpus is not None:
                    return node, gpus
                position = tree.first(least, position + 1)
        return None
