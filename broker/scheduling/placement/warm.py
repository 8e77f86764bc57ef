"""Warm affinity (issue 14): a GPU task goes where a pool process is warm for it, when it can,
and does not make a process warm for another task name exit when a cold set fits as well.

A ``reuse=True`` GPU task runs only in a pool process warm for exactly its GPU indices
(``workers.warm``); a task placed on other GPUs starts in a fresh process and loads its model
again, and a task placed on GPUs a warm process holds makes that process exit. Workers publish,
per node, the GPU sets their warm processes hold and the task name each ran last
(``store.warm_map``, a ``WarmMap``); this is the placers' side:

1. a task whose name a warm process last ran takes that node and exact GPU set when the set is
   free now and the node fits the task (labels, task names, CPU, RAM, slots, GPU memory), and,
   for the full planner, the node is no less preferred (``prefer`` lists) than its own choice;
2. else the placer chooses as before; when its choice would take GPUs a warm process holds, a
   set of the same size on the same node that no warm process holds is taken instead (if the
   node has a slot without a warm process), and the lazy planner (``best_fit.propose``) also
   tries its next ``COLD_TRIES`` nodes for one (so that serving several models one request at a
   time does not load them in turn onto one GPU);
3. else its own choice stands.

Affinity never makes a task wait, never changes the order tasks are placed in, and judges fit
on the placer's own copy (and backfill views), so capacity checks are the placer's; reserve.lua
re-checks all of it.

Which tasks ask: the dispatcher does not see ``reuse`` (a decorator's is known to its worker
only). Only a ``reuse=True`` GPU task leaves a process warm for a GPU set, so a task whose name
such a process ran last is steered to it; one of that name sent with ``reuse=False`` would be
steered too, and then starts in a fresh process (the warm one exits), as on any GPUs. Gangs and
CPU tasks are placed as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from broker.scheduling.model import NodeFree, Placement, TaskRequest, WarmMap
from broker.scheduling.placement.base import ChooseThenTake, Placer

COLD_TRIES = 3  # further nodes the lazy planner asks for a set no warm process holds (step 2)
WARM_SCAN = 64  # warm sets of a name looked at per task (step 1)


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


def steered(task: TaskRequest) -> bool:
    """Is ``task`` one affinity may move (a single task asking for GPUs)?"""
    return bool(task.whole_gpus or task.gpu_milli) and not task.is_gang


def warm_choice(task: TaskRequest, warm: WarmMap, nodes: Mapping[str, NodeFree],
                views: Mapping[str, NodeFree] | None = None) -> Placement | None:
    """Step 1: the first node (in the map's order: by id as read) and GPU set warm for ``task``'s
    name that it fits on now, judged by ``views`` where they have the node, else by ``nodes``
    (schedulable nodes only); at most ``WARM_SCAN`` sets are looked at, so that a name warm on
    thousands of busy nodes costs each of its tasks a bounded look."""
    by_node = warm.by_name.get(task.name, {}) if steered(task) else {}
    looked = 0
    for node_id, sets in by_node.items():
        node = _judged(node_id, nodes, views)
        fitting = [gpus for gpus in sets if fits_exactly(node, task, gpus)] if node is not None else []
        if fitting:
            return Placement(task.id, node_id, tuple(fitting[0]))
        looked += len(sets)
        if looked >= WARM_SCAN:
            break
    return None


def cold_gpus(node: NodeFree, task: TaskRequest, warm: WarmMap) -> tuple[int, ...] | None:
    """Step 2 on one node: GPUs for ``task`` there that no warm process holds (whole GPUs: the
    lowest wholly free ones; a share: the GPU it fills best), or None; None too when every slot
    of the node has a warm process (a task on any other set would make one of them exit)."""
    if not node.host_fits(task) or 0 < node.cap_slots <= warm.processes.get(node.id, 0):
        return None
    held = warm.held.get(node.id, set())
    if task.whole_gpus:
        cold = [i for i in node.whole_indices() if i not in held]
        ok = len(cold) >= task.whole_gpus and node.gpu_memory_mb >= task.gpu_memory_mb
        return tuple(cold[: task.whole_gpus]) if ok else None
    memory = node.share_memory(task)
    room = [(node.free_milli[i], i) for i in range(len(node.free_milli)) if i not in held
            and node.free_milli[i] >= task.gpu_milli and node.free_mem[i] >= memory]
    return (min(room)[1],) if room else None


def _judged(node_id: str, nodes: Mapping[str, NodeFree], views: Mapping[str, NodeFree] | None) -> NodeFree | None:
    view = views.get(node_id) if views else None
    return view if view is not None else nodes.get(node_id)


class WarmFirst(ChooseThenTake):
    """A ``Placer`` that offers each task its warm GPU set first, then asks ``inner`` and keeps
    its node but not GPUs a warm process holds, when another set there fits (steps 1 and 2)."""

    def __init__(self, inner: Placer, warm: WarmMap) -> None:
        self.inner, self.warm = inner, warm
        self.nodes = inner.nodes  # the same dict: placers change its entries, never replace it

    def choose(self, task: TaskRequest, views: dict[str, NodeFree] | None = None) -> Placement | None:
        chosen = self.inner.choose(task, views)
        if chosen is None or not steered(task):
            return chosen
        found = warm_choice(task, self.warm, self.nodes, views)
        if found is not None and (not task.prefer or self._preference(found, task, views) <= self._preference(
                chosen, task, views)):
            return found
        if self.warm.evicts(chosen.node_id, chosen.gpu_indices):
            node = _judged(chosen.node_id, self.nodes, views)
            cold = cold_gpus(node, task, self.warm) if node is not None else None
            if cold is not None:
                return Placement(task.id, chosen.node_id, cold)
        return chosen

    def _preference(self, placement: Placement, task: TaskRequest, views: dict[str, NodeFree] | None) -> int:
        node = _judged(placement.node_id, self.nodes, views)
        return node.preference(task) if node is not None else 0

    def take(self, task: TaskRequest, placement: Placement) -> None:
        self.inner.take(task, placement)

    def __getattr__(self, name: str) -> Any:  # the rest of the inner placer's interface
        return getattr(self.inner, name)


def warm_first(placer: Placer, warm: WarmMap | None) -> Placer:
    """``placer``, minding warm processes when any GPU set is warm."""
    return WarmFirst(placer, warm) if warm else placer
