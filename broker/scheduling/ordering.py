"""Orderings: the order in which a planning pass considers the pending tasks.

One function per ``Ordering``, listed in ``ORDERINGS``; a new ordering is a function here and
one entry in ``Ordering`` and ``ORDERINGS``. Each takes the pending tasks and the pass's
``Ranking`` (its clock, each task's estimated runtime, the aging settings, and under ``fair``
the tenants' usage) and yields the tasks in order. ``fair`` is lazy: it recomputes its tenant
keys as the pass places tasks (``Ranking.reorder`` after a preemption moves usage around).
"""

from __future__ import annotations

import enum
import heapq
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from broker.scheduling.model import TaskRequest, demand

if TYPE_CHECKING:  # the ledger is handed in by the planner; fairshare itself reads the config
    from broker.scheduling.fairshare import Ledger

RATIO_FLOOR_S = 10.0  # hrrn: shorter runs count as this long (as bounded slowdown's 10 s)


class Ordering(enum.StrEnum):
    FIFO = "fifo"  # submit order only
    PRIORITY = "priority"  # higher priority first (with aging when aging_per_minute > 0), then submit order
    SJF = "sjf"  # shortest estimated runtime first
    SRTF = "srtf"  # sjf, and a much shorter arrival may preempt the longest-remaining running task
    HRRN = "hrrn"  # highest response ratio (wait + estimate) / estimate first: sjf that ages
    FAIR = "fair"  # weighted dominant-resource fairness between tenants, with quotas


class WithinTenant(enum.StrEnum):
    """How ``fair`` orders one tenant's tasks."""

    PRIORITY = "priority"  # priority (with aging), then submit order
    SJF = "sjf"  # shortest estimated runtime first, then priority, then submit order
    HRRN = "hrrn"  # highest response ratio first (as ordering "hrrn"), then priority, then submit order


@dataclass(slots=True)
class Ranking:
    """What an ordering reads besides the tasks."""

    now: float  # seconds
    duration: dict[str, float]  # task id -> estimated runtime in seconds (inf: unknown)
    aging_per_minute: float = 0.0
    aging_cap: float = math.inf
    within_tenant: WithinTenant = WithinTenant.PRIORITY
    ledger: Ledger | None = None  # fair only
    reorder: bool = field(default=False)  # fair: usage moved (a preemption); recompute every tenant's key

    def effective(self, task: TaskRequest) -> float:
        """Priority plus aging: ``aging_per_minute`` per minute waited, at most ``aging_cap``."""
        waited = max(0.0, self.now - task.submitted_at) / 60
        return task.priority + min(self.aging_cap, self.aging_per_minute * waited)

    def ratio(self, task: TaskRequest) -> float:
        """Response ratio 1 + wait / estimate: its slowdown were it to start now (0 when no
        estimate: last, as under sjf). Waiting raises every task, the shortest fastest; equal
        ratios (nobody has waited) go shortest first."""
        duration = self.duration[task.id]
        if duration == math.inf:
            return 0.0
        return 1 + max(0.0, self.now - task.submitted_at) / max(duration, RATIO_FLOOR_S)


def queue_order(tasks: Iterable[TaskRequest]) -> list[TaskRequest]:
    """The pending queue's own order (its score): higher priority first, then submit order."""
    return sorted(tasks, key=lambda t: (-t.priority, t.seq))


def fifo(pending: Sequence[TaskRequest], r: Ranking) -> Iterator[TaskRequest]:
    return iter(sorted(pending, key=lambda t: (t.submitted_at, t.seq)))


def priority(pending: Sequence[TaskRequest], r: Ranking) -> Iterator[TaskRequest]:
    if not r.aging_per_minute:
        return iter(queue_order(pending))
    return iter(sorted(pending, key=lambda t: (-r.effective(t), t.seq)))


def shortest_first(pending: Sequence[TaskRequest], r: Ranking) -> Iterator[TaskRequest]:
    """sjf and srtf: shortest estimated runtime first, then priority, then submit order."""
    return iter(sorted(pending, key=lambda t: (r.duration[t.id], -t.priority, t.seq)))


def hrrn(pending: Sequence[TaskRequest], r: Ranking) -> Iterator[TaskRequest]:
    return iter(sorted(pending, key=lambda t: (-r.ratio(t), r.duration[t.id], -t.priority, t.seq)))


def fair(pending: Sequence[TaskRequest], r: Ranking) -> Iterator[TaskRequest]:
    """Tenants under their guarantee first, then lowest weighted dominant share; within a
    tenant, ``within_tenant`` (priority with aging, sjf or hrrn). Keys are recomputed as the
    pass changes usage."""
    ledger = r.ledger
    assert ledger is not None, "fair ordering needs the pass's ledger"
    if r.within_tenant is WithinTenant.SJF:
        ranked = sorted(pending, key=lambda t: (r.duration[t.id], -r.effective(t), t.seq))
    elif r.within_tenant is WithinTenant.HRRN:
        ranked = sorted(pending, key=lambda t: (-r.ratio(t), r.duration[t.id], -r.effective(t), t.seq))
    else:
        ranked = sorted(pending, key=lambda t: (-r.effective(t), t.seq))
    queues: dict[str, deque[TaskRequest]] = {}
    for task in ranked:
        queues.setdefault(task.tenant, deque()).append(task)

    def key(tenant: str) -> tuple[bool, float, float, int, str]:
        head = queues[tenant][0]
        return (not ledger.within_guarantee(tenant, demand(head)), ledger.dominant_share(tenant),
                -r.effective(head), head.seq, tenant)

    heap = [key(t) for t in queues]
    heapq.heapify(heap)
    while heap:
        if r.reorder:
            heap = [key(k[-1]) for k in heap]
            heapq.heapify(heap)
            r.reorder = False
        tenant = heapq.heappop(heap)[-1]
        yield queues[tenant].popleft()
        if queues[tenant]:
            heapq.heappush(heap, key(tenant))


#: ordering -> a function from the pending tasks (in queue order) and the pass's Ranking to the
#: tasks in the order the pass considers them.
ORDERINGS: dict[Ordering, Callable[[Sequence[TaskRequest], Ranking], Iterator[TaskRequest]]] = {
    Ordering.FIFO: fifo,
    Ordering.PRIORITY: priority,
    Ordering.SJF: shortest_first,
    Ordering.SRTF: shortest_first,
    Ordering.HRRN: hrrn,
    Ordering.FAIR: fair,
}
