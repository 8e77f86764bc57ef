"""Autoscaling demand: how many more nodes of each registered node shape would let the pending
tasks be placed now, as the planner itself answers it (``gpubroker_wanted_nodes``).

A shape is what a node registered with: its GPUs, GPU memory per GPU, CPUs and RAM. For each
shape the planner runs again on the same snapshot with as many extra empty nodes of that shape
as it could use (copies of the first registered node of it, by id: its labels, task names and
slots too; one per task that fits one, a gang's members each counted, at most ``MAX_NODES``),
after the existing nodes, with best-fit placement, which fills a node before it opens the next:
the answer is how many of the extra nodes it put tasks on. A greedy bin-pack of what the
existing nodes cannot take, by the pool's own ordering, quotas and rate limits, in one pass per
shape. So it counts only what nodes can fix: a task refused by its tenant's quota or a rate
limit, or that no node of the shape could hold (too many GPUs, a label it lacks), adds nothing
to that shape. Like Ray's autoscaler demand, each shape's answer assumes only that shape is
added: the answers are alternatives, not a sum.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from broker.models import MILLI
from broker.scheduling import elastic, gang
from broker.scheduling.config import PlacementKind, SchedulingConfig
from broker.scheduling.model import NodeFree, Snapshot
from broker.scheduling.planner import Planner

NodeShape = tuple[int, int, int, int]  # GPUs, GPU memory of each (MiB), CPUs (milli), RAM (MiB)
MAX_NODES = 1000  # the most extra nodes of one shape asked for (a bound on the passes, not a policy)


def shape_of(node: NodeFree) -> NodeShape:
    return (len(node.free_milli), node.gpu_memory_mb, node.cap_cpu_milli, node.cap_memory_mb)


def shape_label(shape: NodeShape) -> str:
    """The ``shape`` label value, in the worker's own option names:
    ``gpus=8,gpu_memory_mb=81920,cpus=64,memory_mb=524288``."""
    gpus, gpu_mem, cpu_milli, mem = shape
    return f"gpus={gpus},gpu_memory_mb={gpu_mem},cpus={cpu_milli / MILLI:g},memory_mb={mem}"


def templates(nodes: Iterable[NodeFree]) -> dict[NodeShape, NodeFree]:
    """The first node (by id) of each shape among ``nodes``."""
    found: dict[NodeShape, NodeFree] = {}
    for node in sorted(nodes, key=lambda n: n.id):
        found.setdefault(shape_of(node), node)
    return found


def fresh(template: NodeFree, node_id: str) -> NodeFree:
    """An empty node like ``template``."""
    gpus = len(template.free_milli)
    return replace(template.copy(), id=node_id, free_milli=[MILLI] * gpus, free_mem=[template.gpu_memory_mb] * gpus,
                   free_cpu_milli=template.cap_cpu_milli, free_memory_mb=template.cap_memory_mb,
                   free_slots=template.cap_slots, draining=False)


def wanted_nodes(config: SchedulingConfig, snap: Snapshot, shapes: dict[NodeShape, NodeFree]) -> dict[NodeShape, int]:
    """For each shape in ``shapes`` (shape -> a node of it), how many more of it the planner would
    start tasks of ``snap`` on now, given as many as it could use."""
    planner = Planner(config.model_copy(update={"explain_limit": 0, "placement": PlacementKind.BEST_FIT}))
    wanted: dict[NodeShape, int] = {}
    for shape, template in shapes.items():
        empty = fresh(template, "")
        # An elastic request counts where its minimum fits (gang.member_of: one member's resources).
        upper = min(MAX_NODES, sum(t.replicas for t in snap.pending
                                   if empty.could_hold(gang.member_of(elastic.least(t)))))
        extra = {f"(wanted {i})": i for i in range(upper)}  # no real node id has a space
        if not upper:
            wanted[shape] = 0
            continue
        plan = planner.plan(replace(snap, nodes=[*snap.nodes, *(fresh(template, n) for n in extra)]))
        used = {p.node_id for p in plan.placements} | {m.node_id for g in plan.gangs for m in g.members}
        wanted[shape] = len(used & extra.keys())
    return wanted
