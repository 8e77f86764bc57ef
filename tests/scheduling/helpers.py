"""Builders for the planner tables: nodes by capacity, running tasks taken out of them, and plans read back."""

from __future__ import annotations

from typing import Any

from broker.scheduling.config import SchedulingConfig
from broker.scheduling.model import NodeFree, Plan, RunningTask, Snapshot, TaskRequest
from broker.scheduling.planner import Planner

GiB = 1024
MIN = 60.0


def node(node_id: str, gpus: int = 0, mem: int = 80 * GiB, cpus: int = 64, ram: int = 512 * GiB, slots: int = 64,
         **labels: str) -> NodeFree:
    """An idle node; running tasks given to ``snapshot`` are taken out of it."""
    return NodeFree(node_id, mem, [1000] * gpus, [mem] * gpus, cpus * 1000, ram, slots, labels,
                    cpus * 1000, ram, slots)


def task(task_id: str, gpus: float = 0, *, gpu_mem: int = 0, cpus: float = 0, ram: int = 0, priority: int = 0,
         seq: int = 0, tenant: str = "default", name: str = "", est: float | None = None, at: float = 0.0,
         prefer: dict[str, list[str]] | None = None, **labels: str) -> TaskRequest:
    whole = int(gpus) if gpus >= 1 else 0
    milli = round(gpus * 1000) if 0 < gpus < 1 else 0
    return TaskRequest(task_id, whole, milli, gpu_mem, round(cpus * 1000), ram, tuple(sorted(labels.items())),
                       priority, seq, tenant, name, est, at, False,
                       tuple(sorted((k, tuple(v)) for k, v in (prefer or {}).items())))


def running(task_id: str, node_id: str, gpus: tuple[int, ...] = (), *, share: int = 1000, cpus: float = 0,
            ram: int = 0, priority: int = 0, tenant: str = "default", started: float = 0.0, est: float | None = None,
            preemptible: bool = False, preempting: bool = False, name: str = "", gpu_mem: int | None = None,
            ) -> RunningTask:
    mem = gpu_mem if gpu_mem is not None else 80 * GiB * share // 1000
    return RunningTask(task_id, node_id, gpus, share, mem, round(cpus * 1000), ram, priority, tenant, name, started,
                       est, preemptible, preempting)


def snapshot(nodes: list[NodeFree], pending: list[TaskRequest], run: list[RunningTask] | tuple[()] = (),
             now: float = 0.0, **extra: Any) -> Snapshot:
    """Take each running task's holdings out of its node, numbering pending tasks in list order."""
    by_id = {n.id: n for n in nodes}
    for r in run:
        n = by_id[r.node_id]
        for i in r.gpu_indices:
            n.free_milli[i] -= r.gpu_milli
            n.free_mem[i] -= r.gpu_mem
        n.free_cpu_milli -= r.cpu_milli
        n.free_memory_mb -= r.memory_mb
        n.free_slots -= 1
    for i, t in enumerate(pending):
        t.seq = t.seq or i + 1
    return Snapshot(now, nodes, pending, list(run), **extra)


def planner(**config: Any) -> Planner:
    config.setdefault("preemption", False)
    return Planner(SchedulingConfig.parse(config))


def placed(plan: Plan) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {p.task_id: (p.node_id, p.gpu_indices) for p in plan.placements}


def order_of(plan: Plan) -> list[str]:
    """Placed first in placement order."""
    return [p.task_id for p in plan.placements]
