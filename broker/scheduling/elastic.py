"""Elastic requests (issue 13): how much of a min-max request the planner grants.

``Resources(gpus=8, min_gpus=2)`` runs with any whole number of GPUs from 2 to 8 on one node;
``replicas=8, min_replicas=2`` with any number of members from 2 to 8 (Slurm's
``--nodes=2-8``, Kueue's partial admission). The planner grants a concrete amount, and
reserve.lua / reserve_gang.lua re-check exactly that amount, so a stale grant can only be
refused, never over-commit. CPU and memory stay as asked: per task, or per member.

``SchedulingConfig.elastic`` says how much to aim for (``target``); the planner then tries
that amount and each smaller one down to the minimum, and takes the first that it can place
now (quota, holds and rate limits as for any task). A task that fits nowhere now waits,
preempts and holds (backfill) as its minimum: it never waits for more than it needs.

- ``max``: the most it asks for (the largest amount that fits now wins).
- ``min``: its minimum, leaving the rest for others.
- ``fair``: its tenant's fair share of the pool less what the tenant holds already, counted
  in the request's dominant resource (GPUs for a GPU request; CPUs or memory for a CPU gang):
  ``share = capacity * weight / Σ weights of the active tenants`` (those with running or
  pending tasks in this pass, its own included); ``grant = floor((share - held) / per_unit)``
  where ``per_unit`` is one GPU (``min_gpus``) or one member's amount (``min_replicas``),
  clamped to [minimum, maximum]. ``held`` counts what the pass has placed already.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

from broker.scheduling import gang
from broker.scheduling.model import NodeFree, TaskRequest, demand

if TYPE_CHECKING:
    from broker.scheduling.fairshare import Ledger


class Elastic(enum.StrEnum):
    MAX = "max"  # as much as fits now, up to what it asks for
    MIN = "min"  # its minimum
    FAIR = "fair"  # its tenant's fair share less what the tenant holds, clamped to [minimum, maximum]


def bounds(task: TaskRequest) -> tuple[int, int]:
    """(fewest, most) of what an elastic request varies: whole GPUs, or a gang's members."""
    if 0 < task.min_replicas < task.replicas:
        return task.min_replicas, task.replicas
    return task.min_gpus, task.whole_gpus


def sized(task: TaskRequest, amount: int) -> TaskRequest:
    """``task`` granted ``amount`` (GPUs, or members of a gang): a fixed request. A gang keeps
    ``min_replicas`` set, so one granted a single member is still placed as a gang."""
    if task.min_replicas:
        return replace(task, replicas=amount, min_replicas=amount)
    return replace(task, whole_gpus=amount, min_gpus=0)


def least(task: TaskRequest) -> TaskRequest:
    """What an elastic task waits, preempts and holds for: its minimum; any other task as it is."""
    return sized(task, bounds(task)[0]) if task.is_elastic else task


def fair_amount(task: TaskRequest, ledger: Ledger, active: Iterable[str]) -> int:
    """``fair``'s grant before clamping (see the module's doc): may be below the minimum or above the most."""
    unit = demand(sized(task, 1))  # one GPU, or one member
    dominant = max(range(3), key=lambda r: unit[r] / ledger.capacity[r] if ledger.capacity[r] > 0 else 0.0)
    if unit[dominant] <= 0:
        return bounds(task)[1]
    weights = ledger.config.tenant(task.tenant).weight + sum(
        ledger.config.tenant(t).weight for t in set(active) - {task.tenant})
    share = ledger.capacity[dominant] * ledger.config.tenant(task.tenant).weight / weights
    return math.floor((share - ledger.used(task.tenant)[dominant]) / unit[dominant] + 1e-9)


def target(rule: Elastic, task: TaskRequest, ledger: Ledger, active: Iterable[str]) -> int:
    """The amount ``rule`` aims for, within the task's [minimum, maximum]."""
    low, high = bounds(task)
    if rule is Elastic.MIN:
        return low
    if rule is Elastic.MAX:
        return high
    return max(low, min(high, fair_amount(task, ledger, active)))


def most_now(task: TaskRequest, nodes: Mapping[str, NodeFree]) -> int:
    """An upper bound on what could be placed on ``nodes`` now (their free capacity, before any
    backfill hold): the most wholly free GPUs of one node that has room for the task, or the
    members that fit on all of them. It keeps a request of up to 1024 from trying every amount."""
    if task.min_replicas:
        return gang.room(task, nodes)
    return max((len(n.whole_indices()) for n in nodes.values()
                if n.gpu_memory_mb >= task.gpu_memory_mb and n.host_fits(task)), default=0)


def grants(rule: Elastic, task: TaskRequest, ledger: Ledger, active: Iterable[str],
           nodes: Mapping[str, NodeFree]) -> Iterator[TaskRequest]:
    """The sized requests to try placing now, largest first: the target (at most what could fit
    now), then each smaller amount down to just above the minimum (the minimum itself is tried
    as ``least``)."""
    low = bounds(task)[0]
    for amount in range(min(target(rule, task, ledger, active), most_now(task, nodes)), low, -1):
        yield sized(task, amount)
