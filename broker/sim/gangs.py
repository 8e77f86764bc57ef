"""Trace jobs larger than any node, replayed as gangs of whole nodes.

Philly has jobs of 12 to 128 GPUs on 8-GPU nodes; without gangs the simulator refuses them.
Here such a job becomes a gang of ``ceil(gpus / node GPUs)`` members of one node's GPUs
each (16 GPUs: 2 members of 8; 12 GPUs: 2 members of 8, as a job of whole nodes), planned as
one unit by ``broker.scheduling.gang``.

Until the store can hold a gang (issue 13's Redis part: one record, one reserve.lua call for
every member), the simulator stands in for it: each member is submitted as its own task,
``GangPlanner`` folds the pending members of a gang back into one gang request before the
real planner runs, and turns the gang's placement into one placement per member, all
committed in the same cycle (the simulator checks that every member was reserved in it: one
dispatcher and no racing client, so reserve.lua's re-check never refuses a member here).
Members are not preemptible here: stopping one would need every other member stopped too
(one fate), which the stand-in does not do; a folded gang does preempt (gang_preemption).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from broker.scheduling.model import Placement, Plan, Snapshot, TaskRequest
from broker.scheduling.planner import Planner
from broker.sim.results import SimulationError
from broker.sim.traces import ClusterNode, TraceJob


@dataclass(frozen=True, slots=True)
class GangShape:
    replicas: int
    member: TraceJob  # the job as one member asks for it


def gang_shape(job: TraceJob, nodes: Sequence[ClusterNode]) -> GangShape | None:
    """The gang a job larger than every node replays as, or None for a job some node can hold
    (or one no gang of whole nodes can: a share, a CPU-only job, too few nodes: refused as before)."""
    largest = max((n.gpus for n in nodes), default=0)
    if largest < 1 or job.gpus < 1 or job.gpus <= largest:
        return None
    replicas = math.ceil(job.gpus / largest)
    if replicas > sum(1 for n in nodes if n.gpus == largest):
        return None
    member = replace(job, gpus=float(largest), cpus=job.cpus / replicas, memory_mb=math.ceil(job.memory_mb / replicas))
    return GangShape(replicas, member)


class GangBook:
    """Which submitted tasks are members of which gang, in rank order."""

    def __init__(self) -> None:
        self.members: dict[str, list[str]] = {}  # gang id -> member task ids, rank order
        self.gang_of: dict[str, str] = {}  # member task id -> gang id

    def add(self, gang_id: str, member_ids: list[str]) -> None:
        self.members[gang_id] = member_ids
        for member_id in member_ids:
            self.gang_of[member_id] = gang_id

    def check_placed(self, placed: Sequence[Placement]) -> None:
        """Every gang with a member reserved in this cycle has all of them reserved in it."""
        counts: dict[str, int] = {}
        for p in placed:
            gang_id = self.gang_of.get(p.task_id)
            if gang_id is not None:
                counts[gang_id] = counts.get(gang_id, 0) + 1
        for gang_id, count in counts.items():
            if count != len(self.members[gang_id]):
                raise SimulationError(f"gang {gang_id}: {count} of {len(self.members[gang_id])} members reserved "
                                      "in one cycle (all or nothing broken)")


class GangPlanner(Planner):
    """The real planner, over a queue whose gang members are folded back into gangs."""

    def __init__(self, planner: Planner, book: GangBook) -> None:
        super().__init__(planner.config, planner.max_holds)
        self.book = book

    def plan(self, snap: Snapshot) -> Plan:
        snap.pending = self._fold(snap.pending)
        plan = super().plan(snap)
        for g in plan.gangs:
            ids = self.book.members[g.task_id]
            plan.placements.extend(Placement(ids[rank], p.node_id, p.gpu_indices) for rank, p in enumerate(g.members))
        for gang_id in list(plan.waiting):
            for member_id in self.book.members.get(gang_id, ()):
                plan.waiting[member_id] = plan.waiting[gang_id]
        return plan

    def _fold(self, pending: list[TaskRequest]) -> list[TaskRequest]:
        """One gang request, at its first member's place in the queue, for each gang whose
        members are all in this pass's window (a gang cut by the window waits for the next)."""
        seen: dict[str, list[TaskRequest]] = {}
        for task in pending:
            gang_id = self.book.gang_of.get(task.id)
            if gang_id is not None:
                seen.setdefault(gang_id, []).append(task)
        if not seen:
            return pending
        out = []
        for task in pending:
            gang_id = self.book.gang_of.get(task.id)
            if gang_id is None:
                out.append(task)
            elif seen[gang_id][0] is task and len(seen[gang_id]) == len(self.book.members[gang_id]):
                out.append(replace(task, id=gang_id, replicas=len(self.book.members[gang_id])))
        return out
