"""Capacity planning: the fewest nodes of one shape whose simulation meets every target.

``plan_capacity`` bisects on the node count, one full simulation per probe, assuming that
more nodes never make a target worse (true of waits for the usual policies, up to noise at
the boundary). The first upper guess is the peak GPU demand if no job ever waited; it is
doubled until the targets are met or ``max_nodes`` is passed.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.errors import InvalidRequest
from broker.sim.report import duration, metrics, pyplot
from broker.sim.results import SimResult
from broker.sim.traces import ClusterNode, TraceJob, uniform_cluster

_OPS: dict[str, Callable[[float, float], bool]] = {"<=": operator.le, "<": operator.lt, ">=": operator.ge,
                                                   ">": operator.gt}
_UNITS = {"": 1.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_METRICS = {"wait": "wait", "jct": "jct", "completion": "jct", "slowdown": "slowdown", "bsld": "slowdown",
            "makespan": "makespan_s", "allocation": "allocation", "utilisation": "allocation",
            "utilization": "allocation"}
_TARGET = re.compile(r"^\s*(?:(mean|avg|p50|p95|p99|max)\s+)?([a-z]+)\s*(<=|>=|<|>)\s*([0-9]*\.?[0-9]+)\s*"
                     r"([a-z%]*)\s*$")


@dataclass(frozen=True)
class Target:
    """A bound on one figure of ``simreport.metrics``, e.g. ``p95 wait <= 30m``."""

    text: str
    key: str  # the metrics key
    op: str
    value: float  # seconds for times, a fraction for allocation

    def met(self, figures: dict[str, float]) -> bool:
        value = figures[self.key]
        return not math.isnan(value) and _OPS[self.op](value, self.value)

    @property
    def is_time(self) -> bool:
        return not self.key.startswith(("slowdown", "allocation"))


def parse_target(text: str) -> Target:
    """``[mean|p50|p95|p99|max] <wait|jct|slowdown|makespan|allocation> <op> <value>[s|m|h|d|%]``."""
    found = _TARGET.match(text.lower())
    if not found:
        raise InvalidRequest({"target": f"{text!r} is not like 'p95 wait <= 30m' "
                                        "([mean|p50|p95|p99|max] wait|jct|slowdown|makespan|allocation <op> value)"})
    stat, name, op, number, unit = found.groups()
    metric = _METRICS.get(name)
    if metric is None:
        raise InvalidRequest({"target": f"{name!r} is not one of {', '.join(sorted(_METRICS))}"})
    value = float(number)
    if metric == "makespan_s":
        if stat:
            raise InvalidRequest({"target": "makespan takes no statistic (it is one figure)"})
        key = metric
    elif metric == "allocation":
        if stat not in (None, "mean"):
            raise InvalidRequest({"target": "allocation is a time-weighted mean: write 'allocation >= 80%'"})
        key = "allocation_mean"
    else:
        key = f"{metric}_{'mean' if stat in (None, 'avg') else stat}"
    if metric == "allocation":
        if unit not in ("", "%"):
            raise InvalidRequest({"target": f"allocation is a fraction or a percentage, not {unit!r}"})
        value = value / 100 if unit == "%" or value > 1 else value
    elif metric == "slowdown":
        if unit:
            raise InvalidRequest({"target": f"slowdown has no unit (got {unit!r})"})
    else:
        if unit not in _UNITS:
            raise InvalidRequest({"target": f"{unit!r} is not a time unit (s, m, h, d)"})
        value *= _UNITS[unit]
    return Target(text.strip(), key, op, value)


@dataclass
class Probe:
    nodes: int
    figures: dict[str, float]
    met: bool


@dataclass
class CapacityPlan:
    shape: ClusterNode
    targets: list[Target]
    probes: list[Probe] = field(default_factory=list)  # in the order they ran
    answer: int | None = None  # fewest nodes that met every target; None: not within max_nodes
    left_out: int = 0  # jobs no node of this shape could ever run
    results: dict[int, SimResult] = field(default_factory=dict)

    def probe(self, nodes: int) -> Probe | None:
        return next((p for p in self.probes if p.nodes == nodes), None)


def zero_wait_peak_gpus(jobs: Sequence[TraceJob]) -> float:
    """Most GPUs in use at once if every job started on arrival."""
    events = sorted([(j.submit_s, j.gpus) for j in jobs] +
                    [(j.submit_s + j.duration_s, -j.gpus) for j in jobs if j.duration_s is not None],
                    key=lambda e: (e[0], e[1]))  # ends before starts at one instant
    level = peak = 0.0
    for _, change in events:
        level += change
        peak = max(peak, level)
    return peak


def fits_shape(job: TraceJob, shape: ClusterNode) -> bool:
    return (job.gpus <= max(shape.gpus, 0) and job.cpus <= shape.cpus and job.memory_mb <= shape.memory_mb
            and (job.gpu_memory_mb or 0) <= shape.gpu_memory_mb)


def plan_capacity(jobs: Sequence[TraceJob], shape: ClusterNode, targets: Sequence[Target],
                  run: Callable[[list[ClusterNode]], SimResult], min_nodes: int = 1,
                  max_nodes: int = 4096) -> CapacityPlan:
    """The fewest nodes of ``shape`` (between ``min_nodes`` and ``max_nodes``) meeting every target.

    ``run`` simulates the jobs on a given cluster. Jobs larger than one node are left out
    (no count of nodes runs them) and counted in ``left_out``."""
    if not targets:
        raise InvalidRequest({"target": "give at least one target, e.g. 'p95 wait <= 30m'"})
    if not 1 <= min_nodes <= max_nodes:
        raise InvalidRequest({"min_nodes": f"must be between 1 and max_nodes ({max_nodes})"})
    runnable = [j for j in jobs if fits_shape(j, shape)]
    result = CapacityPlan(shape, list(targets), left_out=len(jobs) - len(runnable))
    if not runnable:
        raise InvalidRequest({"shape": "no job of the trace fits on one node of this shape"})

    def ok(nodes: int) -> bool:
        known = result.probe(nodes)
        if known is None:
            outcome = run(uniform_cluster(shape, nodes))
            figures = metrics(outcome)
            known = Probe(nodes, figures, all(t.met(figures) for t in targets))
            result.probes.append(known)
            result.results[nodes] = outcome
        return known.met

    guess = math.ceil(zero_wait_peak_gpus(runnable) / shape.gpus) if shape.gpus else min_nodes
    high = min(max(guess, min_nodes), max_nodes)
    while not ok(high):
        if high >= max_nodes:
            return result
        high = min(2 * high, max_nodes)
    low = min_nodes - 1  # treated as failing: nothing below min_nodes is considered
    failed_below = [p.nodes for p in result.probes if not p.met and p.nodes < high]
    low = max([low, *failed_below])
    while high - low > 1:
        middle = (low + high) // 2
        if ok(middle):
            high = middle
        else:
            low = middle
    result.answer = high
    return result


def plan_table_rows(plan: CapacityPlan) -> list[list[str]]:
    """One row per probe, by node count: nodes, GPUs, each target's figure, met."""
    rows = []
    for p in sorted(plan.probes, key=lambda p: p.nodes):
        cells = [str(p.nodes), str(p.nodes * plan.shape.gpus)]
        for t in plan.targets:
            value = p.figures[t.key]
            cells.append(duration(value) if t.is_time else f"{value:.3g}")
        cells.append("yes" if p.met else "no")
        rows.append(cells)
    return rows


def plot_plan(plan: CapacityPlan, path: Path) -> Path:
    """Each target's figure against the node count, with the target and the answer marked."""
    plt = pyplot()
    fig, axes = plt.subplots(len(plan.targets), 1, figsize=(7, 3.2 * len(plan.targets)), squeeze=False)
    probes = sorted(plan.probes, key=lambda p: p.nodes)
    for ax, t in zip(axes[:, 0], plan.targets, strict=True):
        scale = 60.0 if t.is_time else 1.0
        ax.plot([p.nodes for p in probes], [p.figures[t.key] / scale for p in probes], "o-")
        ax.axhline(t.value / scale, color="red", ls="--", label=f"target: {t.text}")
        if plan.answer is not None:
            ax.axvline(plan.answer, color="green", ls=":", label=f"answer: {plan.answer} nodes")
        ax.set_xlabel(f"nodes ({plan.shape.gpus} GPUs each)")
        ax.set_ylabel(t.key + (" (min)" if t.is_time else ""))
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plan_json(plan: CapacityPlan) -> dict[str, Any]:
    return {"shape": _shape_dict(plan.shape),
            "targets": [t.text for t in plan.targets], "answer_nodes": plan.answer,
            "answer_gpus": None if plan.answer is None else plan.answer * plan.shape.gpus,
            "left_out_jobs": plan.left_out,
            "probes": [{"nodes": p.nodes, "met": p.met, "figures": {t.key: p.figures[t.key] for t in plan.targets}}
                       for p in sorted(plan.probes, key=lambda p: p.nodes)]}


def _shape_dict(shape: ClusterNode) -> dict[str, Any]:
    return {"gpus": shape.gpus, "gpu_memory_mb": shape.gpu_memory_mb, "cpus": shape.cpus,
            "memory_mb": shape.memory_mb, "slots": shape.slots, "labels": shape.labels}
