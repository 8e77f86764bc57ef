"""The dispatcher: one cycle of numbered phases, woken by the scripts, never polling.

    1 reap      reclaim nodes whose lease expired (reap.lua)
    2 snapshot  read free capacity per GPU and the head of the pending queue
    3 plan      pure-Python policy proposes placements (broker.policy)
    4 commit    reserve.lua re-checks and commits them in batches
    5 record    log and export what the cycle did and how long each phase took

Phases 3 and 4 interleave batch by batch: while Redis runs one reserve.lua batch,
the dispatcher plans the next, so Redis and Python each keep a core busy. Each
phase's time is the sum over its turns.

Several dispatchers may run on one pool: correctness comes from reserve.lua,
which refuses a placement that no longer fits; a losing dispatcher just wastes
a cycle.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import redis
from prometheus_client import Counter as MetricCounter
from prometheus_client import Histogram

from broker import policy, state
from broker.client import connect
from broker.keys import PoolKeys
from broker.policy import Placement
from broker.scripts import Clock, ReserveCode, Scripts, wall_clock_ms
from broker.settings import Settings

log = logging.getLogger(__name__)

PLACED = MetricCounter("gpubroker_placements_total", "Tasks reserved onto a node", ["pool"])
REFUSED = MetricCounter("gpubroker_placements_refused_total", "Placements reserve.lua refused", ["pool", "code"])
PHASE = Histogram("gpubroker_dispatch_phase_seconds", "Time per dispatcher cycle phase", ["pool", "phase"])


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


class _Timer:
    def __init__(self, report: CycleReport, phase: str) -> None:
        self.report, self.phase = report, phase

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        seconds = self.report.seconds
        seconds[self.phase] = seconds.get(self.phase, 0.0) + time.perf_counter() - self.t0


class Dispatcher:
    def __init__(self, settings: Settings, clock: Clock = wall_clock_ms,
                 client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.keys = PoolKeys(settings.pool)
        self.redis = client or connect(settings)
        self.scripts = Scripts(self.redis, self.keys, clock)
        self.clock = clock
        self._node_shapes: dict[str, state.NodeShape] = {}  # read_free's memory of what nodes registered with

    def run_cycle(self) -> CycleReport:
        report = CycleReport()
        with _Timer(report, "1_reap"):
            report.reaped = self.scripts.reap()
        with _Timer(report, "2_snapshot"):
            nodes = state.read_free(self.redis, self.keys, self.clock(), self._node_shapes)
            head = state.PendingHead(self.redis, self.keys, self.settings.dispatch_window,
                                     first=sum(n.free_slots for n in nodes))
        report.nodes_seen = len(nodes)
        tasks = (task for chunk in head.chunks() for task in policy.order(chunk))
        self._plan_and_commit(report, policy.propose(tasks, nodes))
        report.pending_seen, report.window_full = head.read, head.window_full
        with _Timer(report, "5_record"):
            self._record(report)
        return report

    def _plan_and_commit(self, report: CycleReport, proposals: Iterator[Placement]) -> None:
        """Phases 3 and 4: plan and encode batch i+1 while reserve.lua runs batch i, then read
        i's codes and send i+1 at once."""
        size, in_flight = self.settings.commit_batch, None
        try:
            while True:
                with _Timer(report, "3_plan"):
                    batch = list(itertools.islice(proposals, size))
                    prepared = self.scripts.prepare_reserve(batch) if batch else None
                with _Timer(report, "4_commit"):
                    if in_flight is not None:
                        done, in_flight = in_flight, None
                        self._tally(report, done.codes())
                    if prepared is None:
                        return
                    prepared.send()
                    in_flight = prepared
                    report.proposed += len(batch)
        finally:
            if in_flight is not None:  # planning failed: still read the reply, freeing its connection
                with contextlib.suppress(redis.RedisError):
                    self._tally(report, in_flight.codes())

    @staticmethod
    def _tally(report: CycleReport, codes: list[ReserveCode]) -> None:
        for code in codes:
            if code is ReserveCode.OK:
                report.placed += 1
            else:
                report.refused[code.name] += 1

    def _record(self, report: CycleReport) -> None:
        pool = self.settings.pool
        PLACED.labels(pool).inc(report.placed)
        for code, count in report.refused.items():
            REFUSED.labels(pool, code).inc(count)
        for phase, seconds in report.seconds.items():
            PHASE.labels(pool, phase).observe(seconds)
        if report.placed or report.refused or report.reaped:
            timings = " ".join(f"{p[2:]}={s * 1000:.1f}ms" for p, s in report.seconds.items())
            log.info("cycle: %d pending, %d nodes, placed %d, refused %s, reaped %s (%s)",
                     report.pending_seen, report.nodes_seen, report.placed, dict(report.refused) or 0,
                     report.reaped or 0, timings)

    def run_forever(self, stop: threading.Event | None = None) -> None:
        """Cycle whenever a script publishes a wake-up; reap at least every reap_interval_s."""
        stop = stop or threading.Event()
        backoff = 0.1
        while not stop.is_set():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.keys.wake)
                backoff = 0.1
                while not stop.is_set():
                    report = self.run_cycle()
                    # Wake-ups that arrived during the cycle were buffered on the subscription.
                    woken = self._drain(pubsub)
                    if woken or (report.window_full and report.placed):
                        continue
                    if pubsub.get_message(timeout=self.settings.reap_interval_s) is not None:
                        self._drain(pubsub)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("Redis unavailable (%s); retrying in %.1fs", exc, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                pubsub.close()

    @staticmethod
    def _drain(pubsub: redis.client.PubSub) -> bool:
        woken = False
        while pubsub.get_message(timeout=0) is not None:
            woken = True
        return woken
