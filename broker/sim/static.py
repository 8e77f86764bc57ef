"""Static packing (the FGD protocol) in one cycle per batch instead of one per job
(``Simulator.run_batches``), and what it needs.

Every job is submitted first, so the pool's request mix counts the whole workload (as the
offline harness bench/frag_offline.py gives it). Then for each batch (``ends``: cumulative job
counts), one cycle of a dispatcher whose window is that batch walks it in submit order and
places each job that fits; its jobs still pending are cancelled (dropped). Jobs never finish,
so capacity only shrinks: this places exactly what submitting the jobs one at a time, dropping
each that fits nowhere, would.

Needs jobs without a duration, and scheduling that walks the queue in submit order and skips
what does not fit: ordering priority (no aging) or fifo, mode best_effort, no preemption. A
placement outside the batch (possible only if the batch placed every job and best fit's lazy
planner then ran its full pass on the next job) is a SimulationError.
"""

from __future__ import annotations

from collections.abc import Sequence

from broker.scheduling.config import Mode, Ordering, SchedulingConfig
from broker.sim.traces import TraceJob


def static_problems(s: SchedulingConfig, jobs: Sequence[TraceJob], ends: Sequence[int], gangs: bool) -> dict[str, str]:
    """Why a static run of ``jobs`` in batches ending at ``ends`` cannot be made: field -> reason."""
    problems = {}
    if not ends or list(ends) != sorted(set(ends)) or ends[0] < 1 or ends[-1] != len(jobs):
        problems["batches"] = f"must rise strictly from 1 to the number of jobs ({len(jobs)}); got {list(ends)}"
    if any(j.duration_s is not None for j in jobs):
        problems["jobs"] = "static batches need jobs that never finish (duration_s None)"
    if not (s.ordering is Ordering.FIFO or (s.ordering is Ordering.PRIORITY and s.aging_per_minute == 0)):
        problems["scheduling.ordering"] = "must be fifo, or priority without aging (submit order)"
    if s.mode is not Mode.BEST_EFFORT:
        problems["scheduling.mode"] = "must be best_effort (a job that fits nowhere is dropped, not waited for)"
    if s.preemption:
        problems["scheduling.preemption"] = "must be off (jobs are dropped, never make room)"
    if gangs:
        problems["jobs"] = "static batches do not replay gangs (jobs larger than every node)"
    return problems
