"""Why a pending task waits, in words with the numbers, and when it is expected to start.

The planner records a ``Cause`` for each task it leaves waiting; only the first
``explain_limit`` are turned into words (``explain``), since the queue view shows the head of
the queue and the words cost more than the decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from broker.models import MILLI
from broker.scheduling import gang
from broker.scheduling.model import NodeFree, TaskRequest, Waiting

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from broker.scheduling.timeline import Timeline


@dataclass(slots=True)
class Cause:
    """Why a task waits; turned into words only for the tasks that are explained."""

    kind: str  # fit | held | strict | quota | rate | preempting | stopping
    detail: str = ""  # the task it waits for or behind, the quota's words, or the node
    victims: int = 0
    start: float | None = None  # its own backfill hold starts then


def explain(waiting: list[tuple[int, TaskRequest, Cause]], timeline: Timeline, nodes: Mapping[str, NodeFree],
            node_order: Mapping[str, int], duration: Mapping[str, float], now: float, grace_s: float,
            rate_limits: Mapping[str, tuple[float, float]], draining: Sequence[NodeFree] = ()) -> dict[str, Waiting]:
    """Position, reason and estimated start of each of ``waiting`` (rank, task, cause);
    ``rate_limits``: per rate-limited name, (starts per second, starts its bucket has left);
    ``draining``: nodes that take no new tasks, named when only they could hold a task."""
    out: dict[str, Waiting] = {}
    queued: dict[str, int] = {}  # rate-limited tasks of each name waiting so far, in rank order
    starts: dict[str, float | None] = {}
    reasons: dict[object, str] = {}
    grace = now + grace_s
    for rank, task, cause in waiting:
        kind, detail = cause.kind, cause.detail
        start: float | None = None
        if kind == "fit":
            if task.shape not in reasons:
                words = why_gang if task.is_gang else why
                reasons[task.shape] = words(task, nodes, draining)
            reason = reasons[task.shape]
        elif kind == "held":
            reason = f"held for higher-ranked task {detail} (backfill)"
        elif kind == "strict":
            reason = f"behind {detail} (strict order)"
        elif kind == "quota":
            reason = detail
        elif kind == "rate":
            rate, tokens = rate_limits[detail]
            queued[detail] = behind = queued.get(detail, 0) + 1
            reason = f"rate limited: task {detail} starts at most {rate:g} times a second in this pool"
            start = now + max(0.0, behind - tokens) / rate
        elif kind == "preempting":
            reason, start = f"preempting {cause.victims} task{'s' * (cause.victims > 1)} on node {detail}", grace
        else:
            reason, start = f"waiting for preempted tasks to stop on node {detail}", grace
        if cause.start is not None:
            start = cause.start
        elif kind in ("fit", "held", "strict"):
            if task.is_gang:
                gang_found = gang.earliest(task, duration[task.id], timeline, node_order)
                start = None if gang_found is None else gang_found[0]
            else:
                found = timeline.earliest(task, duration[task.id], node_order, kind == "strict")
                start = None if found is None else found[0]
            if kind == "strict":
                ahead = starts.get(detail)
                start = None if start is None or ahead is None else max(start, ahead)
        starts[task.id] = start
        out[task.id] = Waiting(rank, reason, start)
    return out


def why_gang(task: TaskRequest, free: Mapping[str, NodeFree], draining: Sequence[NodeFree] = ()) -> str:
    """What a gang lacks now: how many nodes could take a member, or why none can."""
    room = gang.nodes_with_room(task, free)
    if not room:
        member = gang.member_of(task)
        return f"needs {gang.describe(task)}; no node can hold a member now: {why(member, free, draining)}"
    return f"needs {gang.describe(task)}; {room} node{'s' * (room != 1)} can hold members now"


def why(task: TaskRequest, free: Mapping[str, NodeFree], draining: Sequence[NodeFree] = ()) -> str:
    """What is missing now, with the numbers."""
    only = [n.id for n in draining if n.could_hold(task)]
    if only and not any(n.could_hold(task) for n in free.values()):
        return (f"only draining node{'s' * (len(only) > 1)} {', '.join(only)} could hold it: it waits until one is "
                "undrained (gpubroker undrain NODE) or a node that fits it joins")
    if not free:
        return "no node is up (none registered yet, or every node is down)"
    if all(n.serves is not None and task.name not in n.serves for n in free.values()):
        return f"no node runs task {task.name}: start a worker with its module (gpubroker worker --tasks MODULE)"
    nodes = [n for n in free.values() if n.matches(task)]
    if not nodes:
        wanted = [f"{k}={v}" for k, v in task.labels] + [f"{k}={'|'.join(v)}" for k, v in task.prefer]
        return f"no node has labels {', '.join(wanted)}"
    along = ""
    if task.whole_gpus:
        count = task.whole_gpus
        big = [n for n in nodes if len(n.free_milli) >= count and n.gpu_memory_mb >= task.gpu_memory_mb]
        memory = f" with {task.gpu_memory_mb} MiB each" if task.gpu_memory_mb else ""
        if not big:
            return f"needs {count} GPUs{memory} on one node; no matching node has that many"
        block = max(len(n.whole_indices()) for n in big)
        if block < count:
            return f"needs {count} GPU{'s' * (count > 1)}{memory} on one node; largest free block is {block}"
        nodes, along = [n for n in big if len(n.whole_indices()) >= count], " beside its GPUs"
    elif task.gpu_milli:
        shares = [(m, mem, n) for n in nodes for m, mem in zip(n.free_milli, n.free_mem, strict=True)]
        largest = max((m for m, _, _ in shares), default=0)
        if largest < task.gpu_milli:
            return f"needs {task.gpu_milli / MILLI:g} of one GPU; largest free share is {largest / MILLI:g}"
        fit = [n for m, mem, n in shares if m >= task.gpu_milli and mem >= n.share_memory(task)]
        if not fit:
            most = max(mem for m, mem, _ in shares if m >= task.gpu_milli)
            return (f"needs {task.gpu_milli / MILLI:g} of one GPU with its memory; "
                    f"most GPU memory free is {most} MiB")
        nodes, along = fit, " beside its GPU share"
    cpus = max(n.free_cpu_milli for n in nodes)
    if cpus < task.cpu_milli:
        return f"needs {task.cpu_milli / MILLI:g} CPUs on one node{along}; most free is {cpus / MILLI:g}"
    memory_mb = max(n.free_memory_mb for n in nodes)
    if memory_mb < task.memory_mb:
        return f"needs {task.memory_mb} MiB of memory on one node{along}; most free is {memory_mb}"
    if max(n.free_slots for n in nodes) < 1:
        return f"no free task slot on a node{along or ' that fits it'}"
    return "no single node has its GPUs, CPUs and memory free together"
