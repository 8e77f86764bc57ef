"""Warm affinity (issue 14): a GPU task goes where a pool process is warm for it, when it can.

A ``reuse=True`` GPU task runs only in a pool process warm for exactly its GPU indices
(``workers.warm``); a task placed on other GPUs starts in a fresh process and loads its model
again. Workers publish, per node, the GPU sets their warm processes hold and the task name each
ran last (``store.warm_map``); this is the placers' side: before its own choice, a task whose
name a warm process last ran takes that node and exact GPU set when the set is free now and the
node fits the task (labels, task names, CPU, RAM, slots, GPU memory), and, for the full planner,
when the node is no less preferred (``prefer`` lists) than the placer's own choice. Otherwise it
is placed as before: affinity never makes a task wait, never changes the order tasks are placed
in, and judges fit on the placer's own copy (and backfill views), so capacity checks are the
placer's; reserve.lua re-checks all of it.

Which tasks ask: the dispatcher does not see ``reuse`` (a decorator's is known to its worker
only). Only a ``reuse=True`` GPU task leaves a process warm for a GPU set, so a task whose name
such a process ran last is steered to it; one of that name sent with ``reuse=False`` would be
steered too, and then starts in a fresh process (the warm one is retired), as on any GPUs.
Gangs and CPU tasks are placed as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from broker.scheduling.model import NodeFree, Placement, TaskRequest, WarmSets
from broker.scheduling.placement.base import ChooseThenTake, Placer

__all__ = ["WarmFirst", "WarmSets", "fits_exactly", "warm_choice", "warm_first"]


def fits_exactly(node: NodeFree, task: TaskRequest, gpus: tuple[int, ...]) -> bool:
    """Does ``task`` fit on ``node`` taking exactly ``gpus`` (whole GPUs: all of them, wholly
    free; a share: the one GPU, with room for it)?"""
    if not node.host_fits(task) or not gpus or max(gpus) >= len(node.free_milli) or min(gpus) < 0:
        return False
    if task.whole_gpus:
        return (len(gpus) == task.whole_gpus and node.gpu_memory_mb >= task.gpu_memory_mb
                and all(node.gpu_is_whole(i) for i in gpus))
    if task.gpu_milli:
        (i,) = gpus if len(gpus) == 1 else (-1,)
        return i >= 0 and node.free_milli[i] >= task.gpu_milli and node.free_mem[i] >= node.share_memory(task)
    return False


def warm_choice(task: TaskRequest, warm: WarmSets, nodes: Mapping[str, NodeFree],
                views: Mapping[str, NodeFree] | None = None) -> Placement | None:
    """The first node (by id) and GPU set warm for ``task``'s name that it fits on now, judged by
    ``views`` where they have the node, else by ``nodes`` (only schedulable nodes are there)."""
    by_node = warm.get(task.name) if task.whole_gpus or task.gpu_milli else None
    if not by_node or task.is_gang:
        return None
    for node_id in sorted(by_node):
        node = views.get(node_id) if views else None
        node = node if node is not None else nodes.get(node_id)
        if node is None:
            continue
        for gpus in by_node[node_id]:
            if fits_exactly(node, task, gpus):
                return Placement(task.id, node_id, tuple(gpus))
    return None


class WarmFirst(ChooseThenTake):
    """A ``Placer`` that offers each task its warm GPU set first, then asks ``inner``."""

    def __init__(self, inner: Placer, warm: WarmSets) -> None:
        self.inner, self.warm = inner, warm
        self.nodes = inner.nodes  # the same dict: placers change its entries, never replace it
        self.hits = 0  # placements steered to a warm set (tests count them)

    def choose(self, task: TaskRequest, views: dict[str, NodeFree] | None = None) -> Placement | None:
        chosen = self.inner.choose(task, views)
        if chosen is None or task.name not in self.warm:
            return chosen
        found = warm_choice(task, self.warm, self.inner.nodes, views)
        if found is None or found == chosen:
            return chosen
        if task.prefer and self._judged(found.node_id, views).preference(task) > self._judged(
                chosen.node_id, views).preference(task):
            return chosen
        self.hits += 1
        return found

    def _judged(self, node_id: str, views: Mapping[str, NodeFree] | None) -> NodeFree:
        view = views.get(node_id) if views else None
        return view if view is not None else self.inner.nodes[node_id]

    def take(self, task: TaskRequest, placement: Placement) -> None:
        self.inner.take(task, placement)

    def __getattr__(self, name: str) -> Any:  # the rest of the inner placer's interface
        return getattr(self.inner, name)


def warm_first(placer: Placer, warm: WarmSets | None) -> Placer:
    """``placer``, offering warm sets first when any GPU set is warm."""
    return WarmFirst(placer, warm) if warm else placer
