"""spread: the least-loaded node first (most wholly free GPUs; a share to the GPU with most
share free; CPU tasks to the node with most CPU free)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Container, Iterable, Sequence

from broker.scheduling.model import NodeFree, TaskRequest
from broker.scheduling.placement.base import Entries, Indexed, cpu_key, reindex


def _spread_key(node: NodeFree, task: TaskRequest, gpus: list[int]) -> tuple[float, ...]:
    if task.whole_gpus:
        return (-len(node.whole_indices()),)
    if task.gpu_milli:
        return (-node.free_milli[gpus[0]],)
    return cpu_key(node, task, most_free=True)


class SpreadPlacer(Indexed):
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
                gpus = None if node.id in skip else node.gpus_for(task, self.pick)
                if gpus is not None:
                    return node, gpus
        return None
