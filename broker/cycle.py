"""What one dispatcher cycle did (``CycleReport``), how long each phase took, and the dispatcher's
own Prometheus series (``broker.dispatcher``, ``broker.metrics``)."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from prometheus_client import Counter as MetricCounter
from prometheus_client import Histogram

from broker.scheduling.model import Placement

log = logging.getLogger("broker.dispatcher")  # the dispatcher's log, as before

PLACED = MetricCounter("gpubroker_placements_total", "Tasks reserved onto a node", ["pool"])
EXPRESS = MetricCounter("gpubroker_express_placements_total", "Tasks placed from their submit's wake-up on an "
                        "idle cluster, before a cycle (setting express; in gpubroker_placements_total too)", ["pool"])
REFUSED = MetricCounter("gpubroker_placements_refused_total", "Placements reserve.lua refused", ["pool", "code"])
PHASE = Histogram("gpubroker_dispatch_phase_seconds", "Time per dispatcher cycle phase", ["pool", "phase"])
PREEMPTED = MetricCounter("gpubroker_preemptions_total", "Tasks stopped or requeued for a more urgent one",
                          ["pool", "how"])
QUARANTINED = MetricCounter("gpubroker_quarantined_total", "Records the dispatcher could not read, taken out of "
                            "scheduling: a pending task's request (ended FAILED or dead-lettered) or a node hash",
                            ["pool", "record"])


@dataclass
class CycleReport:
    reaped: list[str] = field(default_factory=list)
    pending_seen: int = 0
    nodes_seen: int = 0
    proposed: int = 0
    placed: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    seconds: dict[str, float] = field(default_factory=dict)
    window_full: bool = False
    placed_tasks: list[Placement] = field(default_factory=list)  # what reserve.lua accepted, in order
    preempted: list[str] = field(default_factory=list)  # victims marked or requeued this cycle
    full_pass: bool = False  # the full planner ran
    promoted: int = 0  # delayed tasks whose time came
    expired: list[str] = field(default_factory=list)
    ingested: int = 0  # tasks taken in from Celery's own queues
    forgotten: list[str] = field(default_factory=list)  # nodes down for node_forget_after_s, removed
    quarantined: list[str] = field(default_factory=list)  # pending tasks whose request could not be read
    scanned: int = 0  # pending tasks the lazy planner read (none when the scan gate skipped the window)
    wake_at_ms: int | None = None  # something is due then (a delayed task, an expiry, a rate limit's next start)


class Timer:
    """Adds the time spent in its block to ``report.seconds[phase]``."""

    def __init__(self, report: CycleReport, phase: str) -> None:
        self.report, self.phase = report, phase

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        seconds = self.report.seconds
        seconds[self.phase] = seconds.get(self.phase, 0.0) + time.perf_counter() - self.t0


def record(report: CycleReport, pool: str) -> None:
    """Export what the cycle did (its placements, refusals, phase times) and log a cycle that did anything."""
    PLACED.labels(pool).inc(report.placed)
    for code, count in report.refused.items():
        REFUSED.labels(pool, code).inc(count)
    for phase, seconds in report.seconds.items():
        PHASE.labels(pool, phase).observe(seconds)
    if report.placed or report.refused or report.reaped or report.preempted or report.expired:
        timings = " ".join(f"{p[2:]}={s * 1000:.1f}ms" for p, s in report.seconds.items())
        log.info("cycle: %d pending, %d nodes, placed %d, refused %s, reaped %s, preempted %s, expired %s (%s)",
                 report.pending_seen, report.nodes_seen, report.placed, dict(report.refused) or 0,
                 report.reaped or 0, report.preempted or 0, report.expired or 0, timings)
