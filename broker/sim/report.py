"""What a simulation run measured: metrics, the summary tables, the JSON result and the plots.

Definitions (all times in seconds from the trace's time 0):

- wait: first start - submit, over jobs that started.
- completion time (JCT): finish - submit, over jobs that finished.
- bounded slowdown: max(1, JCT / max(duration, 10 s)), over jobs that finished.
- GPU allocation: GPU capacity reserved (a share counts as its fraction) / cluster GPUs,
  time-weighted over [first submit, last event]; ``occupancy`` counts GPUs that hold any
  task. Reserved is not busy: the trace has no utilisation inside a task.
- makespan: last finish (or last event, when jobs never finish) - first submit.
- tenant share: the tenant's GPU-seconds among all GPU-seconds of finished jobs.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from broker.sim.results import JobOutcome, Series, SimResult

BOUND_S = 10.0  # bounded slowdown: runs shorter than this count as this long
STATS = ("mean", "p50", "p95", "p99", "max")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), interpolated between closest ranks; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _stats(prefix: str, values: Sequence[float]) -> dict[str, float]:
    return {f"{prefix}_mean": sum(values) / len(values) if values else math.nan,
            f"{prefix}_p50": percentile(values, 50), f"{prefix}_p95": percentile(values, 95),
            f"{prefix}_p99": percentile(values, 99), f"{prefix}_max": max(values) if values else math.nan}


def waits(jobs: Sequence[JobOutcome]) -> list[float]:
    return [o.started_s - o.job.submit_s for o in jobs if o.started_s is not None]


def _completions(jobs: Sequence[JobOutcome]) -> list[tuple[JobOutcome, float]]:
    return [(o, o.finished_s - o.job.submit_s) for o in jobs if o.finished_s is not None]


def _slowdown(outcome: JobOutcome, jct: float) -> float:
    return max(1.0, jct / max(outcome.job.duration_s or 0.0, BOUND_S))


def time_weighted_mean(series: Series, values: Sequence[float], start: float, end: float) -> float:
    """Mean of a step function (``values[i]`` holds from ``t_s[i]`` to ``t_s[i+1]``) over [start, end]."""
    if end <= start:
        return values[-1] if values else math.nan
    t, total = series.t_s, 0.0
    for i, value in enumerate(values):
        begin, until = max(t[i], start), min(t[i + 1] if i + 1 < len(t) else end, end)
        if until > begin:
            total += value * (until - begin)
    return total / (end - start)


def metrics(result: SimResult) -> dict[str, float]:
    """Every figure of one run, flat (the keys ``plan`` targets name)."""
    jobs, gpus = result.jobs, max(result.gpus, 1)
    done = _completions(jobs)
    first = min((o.job.submit_s for o in jobs), default=0.0)
    last = max([f for o in jobs if (f := o.finished_s) is not None] + result.series.t_s[-1:], default=first)
    out: dict[str, float] = {
        "jobs": len(jobs), "rejected": sum(1 for o in jobs if o.rejected),
        "completed": len(done), "never_started": sum(1 for o in jobs if o.started_s is None and not o.rejected),
        "preemptions": sum(o.preemptions for o in jobs), "preempted_max": max((o.preemptions for o in jobs), default=0),
        "lost_gpu_h": sum(o.lost_s * o.job.gpus for o in jobs) / 3600}
    out |= _stats("wait", waits(jobs))
    out |= _stats("jct", [jct for _, jct in done])
    out |= _stats("slowdown", [_slowdown(o, jct) for o, jct in done])
    # Gangs (jobs larger than any node) apart: before gangs they were refused, so the rest is
    # what compares with a run without them.
    gangs = [o for o in jobs if o.members > 1]
    out["gang_jobs"] = len(gangs)
    out |= _stats("gang_wait", waits(gangs))
    out |= _stats("single_wait", waits([o for o in jobs if o.members == 1]))
    s = result.series
    out["makespan_s"] = last - first
    out["allocation_mean"] = time_weighted_mean(s, s.allocated_gpus, first, last) / gpus
    out["allocation_peak"] = max(s.allocated_gpus, default=0.0) / gpus
    out["allocation_final"] = (s.allocated_gpus[-1] if s.allocated_gpus else 0.0) / gpus
    out["occupancy_mean"] = time_weighted_mean(s, s.occupied_gpus, first, last) / gpus
    out["cycles"], out["handoffs"], out["wall_s"] = result.cycles, result.handoffs, result.wall_s
    out["jobs_per_s"] = len(jobs) / result.wall_s if result.wall_s else math.nan
    return out


def tenants(result: SimResult) -> list[dict[str, Any]]:
    """Per tenant: jobs, share of the GPU-seconds of finished jobs, waits and slowdown."""
    by_tenant: dict[str, list[JobOutcome]] = defaultdict(list)
    for o in result.jobs:
        by_tenant[o.job.tenant].append(o)
    gpu_s = {t: sum(o.job.gpus * (o.job.duration_s or 0.0) for o in js if o.finished_s is not None)
             for t, js in by_tenant.items()}
    total = sum(gpu_s.values()) or 1.0
    rows = []
    for tenant, js in sorted(by_tenant.items(), key=lambda kv: -gpu_s[kv[0]]):
        w, done = waits(js), _completions(js)
        slow = [_slowdown(o, jct) for o, jct in done]
        rows.append({"tenant": tenant, "jobs": len(js), "gpu_hours": gpu_s[tenant] / 3600,
                     "share": gpu_s[tenant] / total, "wait_mean": sum(w) / len(w) if w else math.nan,
                     "wait_p95": percentile(w, 95), "slowdown_mean": sum(slow) / len(slow) if slow else math.nan,
                     "slowdown_p95": percentile(slow, 95)})
    return rows


# ---- text ------------------------------------------------------------------------------------


def duration(seconds: float) -> str:
    """Seconds as a short human figure: 42 s, 3.5 min, 2.1 h, 4.0 d."""
    if math.isnan(seconds):
        return "-"
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if abs(seconds) >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s" if seconds else "0 s"


def _number(value: float, digits: int = 2) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


_ROWS: list[tuple[str, str, str]] = [  # label, metric key, format
    ("jobs (rejected / never started)", "jobs", "jobs"),
    ("completed", "completed", "int"),
    *[(f"wait {stat}", f"wait_{stat}", "time") for stat in STATS[:4]],
    *[(f"completion time {stat}", f"jct_{stat}", "time") for stat in STATS[:4]],
    ("bounded slowdown mean", "slowdown_mean", "num"), ("bounded slowdown p95", "slowdown_p95", "num"),
    ("bounded slowdown p99", "slowdown_p99", "num"),
    ("GPU allocation mean", "allocation_mean", "pct"), ("GPU allocation peak", "allocation_peak", "pct"),
    ("GPU allocation at end", "allocation_final", "pct"), ("GPUs occupied mean", "occupancy_mean", "pct"),
    ("gangs (jobs larger than a node)", "gang_jobs", "int"),
    ("gang wait mean", "gang_wait_mean", "time"), ("gang wait max", "gang_wait_max", "time"),
    ("wait mean, single-node jobs", "single_wait_mean", "time"),
    ("makespan", "makespan_s", "time"), ("preemptions", "preemptions", "int"),
    ("most preemptions of one job", "preempted_max", "int"), ("GPU-hours redone after preemption", "lost_gpu_h", "num"),
    ("dispatcher cycles", "cycles", "int"), ("places handed off at a finish", "handoffs", "int"),
    ("wall time", "wall_s", "time"), ("jobs/s simulated", "jobs_per_s", "int"),
]


def _cell(m: dict[str, float], key: str, kind: str) -> str:
    value = m[key]
    if kind == "jobs":
        return f"{int(value):,} ({int(m['rejected']):,} / {int(m['never_started']):,})"
    if kind == "time":
        return duration(value)
    if kind == "pct":
        return "-" if math.isnan(value) else f"{100 * value:.1f} %"
    if kind == "int":
        return _number(value, 0)
    return _number(value)


def summary_table(results: Sequence[SimResult], title: str = "simulation") -> Table:
    """One column per run, one row per figure."""
    table = Table(title=title)
    table.add_column("")
    all_metrics = [metrics(r) for r in results]
    for r in results:
        table.add_column(f"{r.label}\n{r.nodes} nodes, {r.gpus} GPUs", justify="right")
    for label, key, kind in _ROWS:
        table.add_row(label, *(_cell(m, key, kind) for m in all_metrics))
    return table


def tenant_table(result: SimResult, limit: int = 20) -> Table:
    table = Table(title=f"per tenant: {result.label}")
    for name in ("tenant", "jobs", "GPU share", "wait mean", "wait p95", "slowdown mean", "slowdown p95"):
        table.add_column(name, justify="left" if name == "tenant" else "right")
    for row in tenants(result)[:limit]:
        table.add_row(row["tenant"], f"{row['jobs']:,}", f"{100 * row['share']:.1f} %", duration(row["wait_mean"]),
                      duration(row["wait_p95"]), _number(row["slowdown_mean"]), _number(row["slowdown_p95"]))
    return table


# ---- JSON --------------------------------------------------------------------------------------


def _clean(value: Any) -> Any:
    """NaN is not JSON: null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def binned(series: Series, values: Sequence[float], bins: int = 1000) -> tuple[list[float], list[float]]:
    """The step function ``values`` over ``series.t_s`` averaged in ``bins`` equal time bins."""
    t = series.t_s
    if not t:
        return [], []
    start, end = t[0], t[-1]
    if end <= start:
        return [start], [values[-1]]
    area = [0.0]  # the integral from start up to t[i]
    for i in range(1, len(t)):
        area.append(area[-1] + values[i - 1] * (t[i] - t[i - 1]))

    def integral(x: float) -> float:
        i = bisect.bisect_right(t, x) - 1
        return area[i] + values[i] * (x - t[i])

    width = (end - start) / bins
    edges = [integral(start + k * width) for k in range(bins)] + [area[-1]]
    return [start + (k + 0.5) * width for k in range(bins)], [(edges[k + 1] - edges[k]) / width for k in range(bins)]


def result_json(results: Sequence[SimResult], **context: Any) -> dict[str, Any]:
    """Everything the tables show, plus the allocation over time (binned), for each run."""
    runs = []
    for r in results:
        times, allocated = binned(r.series, r.series.allocated_gpus)
        _, occupied = binned(r.series, r.series.occupied_gpus)
        _, pending = binned(r.series, r.series.pending)
        runs.append({"label": r.label, "scheduling": r.scheduling, "nodes": r.nodes, "gpus": r.gpus,
                     "metrics": metrics(r), "tenants": tenants(r),
                     "series": {"t_s": times, "allocated_gpus": allocated, "occupied_gpus": occupied,
                                "pending": pending}})
    document: dict[str, Any] = _clean({**context, "runs": runs})
    return document


# ---- plots -------------------------------------------------------------------------------------


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_wait_cdf(results: Sequence[SimResult], path: Path) -> Path:
    """Fraction of started jobs that waited at most x, one line per run (symlog x)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    longest = 1.0
    for r in results:
        w = sorted(waits(r.jobs))
        if w:
            ax.step([0.0, *w], [0.0, *[(i + 1) / len(w) for i in range(len(w))]], where="post", label=r.label)
            longest = max(longest, w[-1])
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlim(0, longest * 1.5)
    ax.set_xlabel("wait (s)")
    ax.set_ylabel("fraction of jobs")
    ax.set_ylim(0, 1.01)
    return _save(plt, fig, ax, "Wait-time CDF", path)


def plot_allocation(results: Sequence[SimResult], path: Path) -> Path:
    """Reserved GPU capacity over time, one line per run (averaged in 1,000 bins)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    span = max((r.series.t_s[-1] for r in results if r.series.t_s), default=0.0)
    unit, size = ("days", 86400.0) if span > 3 * 86400 else ("hours", 3600.0) if span > 3 * 3600 else ("s", 1.0)
    for r in results:
        times, allocated = binned(r.series, r.series.allocated_gpus)
        ax.plot([t / size for t in times], [100 * a / max(r.gpus, 1) for a in allocated], label=r.label, lw=1)
    ax.set_xlabel(f"time ({unit})")
    ax.set_ylabel("GPU allocation (%)")
    ax.set_ylim(0, 105)
    return _save(plt, fig, ax, "GPU allocation over time", path)


def _save(plt: Any, fig: Any, ax: Any, title: str, path: Path) -> Path:
    """Grid, legend and title, then write the PNG and free the figure."""
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
