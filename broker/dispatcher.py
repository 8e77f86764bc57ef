"""The dispatcher: one cycle of numbered phases, woken by the scripts, never polling.

    1 reap      reclaim nodes whose lease expired (reap.lua); move delayed tasks whose time has
                come to the queue (promote.lua) and cancel those past their expiry or that a
                producer asked to cancel (expire.lua); now and then, take in tasks Celery
                producers pushed past the broker and forget nodes down for node_forget_after_s
    2 snapshot  read free capacity per GPU and the head of the pending queue (on the spine's
                lazy path most of it rides in phase 1's round trip: an idle cycle is 3 or 4)
    3 plan      pure-Python policy proposes placements (broker.scheduling)
    4 commit    reserve.lua re-checks and commits them in batches; preempt.lua marks
                victims the plan chose; quarantine.lua ends FAILED the pending tasks whose
                stored request the snapshot could not read (the others were planned as usual)
    5 record    log and export what the cycle did, publish each waiting task's reason

Phases 3 and 4 interleave batch by batch: while Redis runs one reserve.lua batch, the
dispatcher plans the next, so Redis and Python each keep a core busy. Each phase's time is the
sum over its turns.

Two planners: the spine's lazy best-fit (``placement.best_fit.propose``) runs when the pool's
scheduling is the spine (priority order, skip-ahead, best fit), since it reads the queue only as
far as it gets; every other configuration, and a full pass at most every ``explain_interval_s``
after the lazy one when tasks are left waiting, runs ``scheduling.planner.Planner`` over the
whole window with the running tasks (for backfill, preemption, fair share, and the reasons and
estimated starts the queue view shows).

Several dispatchers may run on one pool: correctness comes from reserve.lua, which refuses a
placement that no longer fits; a losing dispatcher just wastes a cycle.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import redis

from broker.cycle import EXPRESS, PLACED, PREEMPTED, QUARANTINED, REFUSED, CycleReport, Timer, record
from broker.express import Express, drain
from broker.handoff import HandoffSwitch
from broker.metrics import COLLECTOR, WantedNodes
from broker.native.ingest import Ingest
from broker.scan_gate import Mark, ScanGate, mark_commands, mark_of, read_mark
from broker.scheduling.model import Placement, Plan, Snapshot
from broker.scheduling.ordering import queue_order
from broker.scheduling.placement.best_fit import propose
from broker.scheduling.planner import Planner
from broker.settings import Settings
from broker.store import gangs, history, reads, records, stats, timers
from broker.store.connection import as_broker_error, connect, transient
from broker.store.free_view import FreeView
from broker.store.keys import PoolKeys
from broker.store.scripts import Clock, ForgetCode, PreemptCode, QuarantineCode, ReserveCode, Scripts, wall_clock_ms

log = logging.getLogger(__name__)

#: The full pass after the lazy one runs at most every explain_interval_s, and no more often than
#: SPARE times its own last duration: at most about a tenth of the dispatcher's time.
SPARE = 10
#: Pending ids read with the scan gate's mark, in its round trip: the head, when that covers it.
EARLY_HEAD = 64

#: How a victim of preemption is told to stop: ``stopper(task_id, node_id)``. Live workers
#: watch their own tasks (workers.agent), so the dispatcher's default does nothing; the
#: simulator passes one that ends the victim at once.
Stopper = Callable[[str, str], None]


class Dispatcher:
    def __init__(self, settings: Settings, clock: Clock = wall_clock_ms,
                 client: redis.Redis | None = None, stopper: Stopper | None = None, explain: bool = True) -> None:
        """``explain=False``: full passes decide but do not word why tasks wait (nobody reads the
        queue view, as in the simulator); the lazy planner's occasional pass keeps it."""
        self.settings = settings
        self.keys = PoolKeys(settings.pool)
        self.redis = client or connect(settings)
        self.scripts = Scripts(self.redis, self.keys, clock)
        self.clock = clock
        self.stopper = stopper
        s = settings.scheduling
        self.lazy = s.is_spine
        self.planner = Planner(s if explain or self.lazy else s.model_copy(update={"explain_limit": 0}))
        self._view = FreeView()  # what is free on each node, read again only where a script changed it
        self._gate = ScanGate()  # skips reading the queue while nothing changed since it placed nothing
        self._last_head = (0, False)  # what the last read of the queue's head found: tasks read, window full
        self._explained: Mark | None = None  # what the last full pass after the lazy one saw
        self._last_full_ms: int | None = None
        self._timer: int | None = None  # when the next delayed task or expiry is due, as the lazy pass read it
        self._early: tuple[int, list[Any], list[Any]] | None = None  # view and mark replies, read with the upkeep
        self._full_cost_ms = 0.0  # what the last full pass after the lazy one took (wall time)
        self._handoff = HandoffSwitch(self.redis, self.keys, settings.handoff)
        self._express = Express(settings.express)
        self._published = False
        self._catalogue = reads.Catalogue()
        self._ingest = Ingest(settings, self.redis, clock)
        self._next_forget_ms = 0
        self._unreadable_nodes: dict[str, str] = {}  # node id -> why, as logged (once per reason)
        self._next_stats_ms = 0
        self._next_beat_ms = 0  # when to record the cycle time again (P cycle, for health checks)
        self._next_trim_ms = 0  # when to trim the history index again
        self._gangs_wait = False  # the lazy pass's window held a gang (it forces a full pass)
        self._waiting: Snapshot | None = None  # the last full pass's, while tasks wait (gpubroker_wanted_nodes)
        self._wanted = WantedNodes(s, int(settings.explain_interval_s * 5000))
        COLLECTOR.update(settings.pool, stats.Stats(), clock(), {})  # its series at 0 until the first cycle
        for code in (c for c in ReserveCode if c is not ReserveCode.OK):
            REFUSED.labels(settings.pool, code.name)
        for how in (PreemptCode.REQUEUED, PreemptCode.STOPPING):
            PREEMPTED.labels(settings.pool, how.name.lower())
        for kind in ("task", "node"):
            QUARANTINED.labels(settings.pool, kind)
        PLACED.labels(settings.pool), EXPRESS.labels(settings.pool)

    def publish_config(self) -> None:
        """Tell clients and the CLI which scheduling this pool runs with (they order the queue view by it)."""
        self.redis.set(self.keys.scheduling, self.settings.scheduling.model_dump_json())
        self._handoff.publish(self.lazy)  # whether finish.lua may pass an ended attempt's place on
        self._published = True

    def run_cycle(self) -> CycleReport:
        report = CycleReport()
        if not self._published:
            self.publish_config()
        with Timer(report, "1_reap"):
            # reap.lua, promote.lua, expire.lua, then the lazy pass's node view, mark and head: one round trip
            now = self.clock()
            view = self._view.refresh_commands(self.keys, now) if self.lazy else []
            done = timers.upkeep(self.scripts, [*view, *mark_commands(self.scripts, EARLY_HEAD)] if self.lazy else ())
            report.reaped, report.promoted, report.expired = done.reaped, done.promoted, done.expired
            gangs.settle_all(self.scripts, int(self.settings.gang_stop_grace_s * 1000), done.gangs)  # one fate each
            report.ingested = self._ingest.maybe()
            fresh = self.lazy and not (done.gangs or report.ingested)  # else read again: they changed things
            self._early = (now, done.after[:len(view)], done.after[len(view):]) if fresh else None
            self._forget_departed(report)
            self._trim_history()
        full = self._lazy_pass(report) if self.lazy else True
        if full:
            # After the lazy planner, the full pass is for preemption and the queue view: the
            # head of the queue is enough; but the lazy planner stops at a gang, so then the full
            # pass places the gang and what is behind it, over the whole window.
            lazy_only = self.lazy and not self._gangs_wait
            started = time.perf_counter()
            self._full_pass(report, self.settings.scheduling.explain_limit if lazy_only else None)
            self._full_cost_ms = (time.perf_counter() - started) * 1000 if self.lazy else 0.0
        with Timer(report, "5_record"):
            self._note_unreadable_nodes()
            # The lazy pass read the timers; a full pass may requeue (preemption): read them after it.
            timer = reads.next_timer_ms(self.redis, self.keys) if full else self._timer
            if timer is not None:
                report.wake_at_ms = timer if report.wake_at_ms is None else min(report.wake_at_ms, timer)
            record(report, self.settings.pool)
            self._refresh_metrics()
            self._beat()
        return report

    def _lazy_pass(self, report: CycleReport) -> bool:
        """The spine's lazy best-fit over the head of the queue; whether a full pass is due.
        Skipped, window unread, while nothing changed since a pass that placed nothing (scan_gate)."""
        with Timer(report, "2_snapshot"):
            now, view, marked = self._early or (self.clock(), None, None)
            self._view.refresh(self.redis, self.keys, now, view)  # and its index, where nodes changed
            first = min(self._view.index.free_slots, self.settings.dispatch_window)
            mark, early = (mark_of(marked, self._view.seen) if marked is not None
                           else read_mark(self.scripts, self._view.seen, EARLY_HEAD))
            self._timer = early.timer
        report.nodes_seen = len(self._view.index.nodes)
        skipped = self._gate.may_skip(mark, report.promoted + report.ingested)
        if skipped:
            report.pending_seen, report.window_full = self._last_head
        else:
            with Timer(report, "2_snapshot"):
                whole = len(early.scored) >= max(1, first) or len(early.scored) == mark.pending
                head = reads.PendingHead(self.redis, self.keys, self.settings.dispatch_window, first=first or 1,
                                         head=(early.scored, early.wires) if whole else None)
                limits = reads.read_rate_limits(self.redis, self.keys, self.clock(), self._catalogue)
            gangs_seen: list[str] = []  # gangs go to the full planner, which places them whole
            tasks = gangs.singles((task for chunk in head.chunks() for task in queue_order(chunk)), gangs_seen)
            tokens = {name: left for name, (_rate, left) in limits.items()}
            self._plan_and_commit(report, propose(tasks, self._view.index, tokens, self._view.warm))
            self._express.tokens = tokens  # the starts rate-limited names have left after this cycle
            self._gangs_wait = bool(gangs_seen)  # read once the lazy planner has taken its tasks
            with Timer(report, "4_commit"):
                self._quarantine(report, head.poisoned)
            self._wake_for_rates(report, limits, tokens)
            report.scanned = report.pending_seen = head.read
            report.window_full = head.window_full
            self._last_head = (head.read, head.window_full)
            self._gate.after(mark, not (report.placed or report.refused or head.poisoned)
                             and all(t >= 1 for t in tokens.values()))
        # Tasks left waiting (the queue's length: the head read stops at the free slots): now and
        # then, a full pass for preemption and the queue view.
        left = max(report.pending_seen, mark.pending) > report.placed or report.window_full
        self._handoff.after_cycle(left)
        self._express.ready = not (left or self._gangs_wait)
        if self._express.ready and report.placed:  # the view express plans on must hold these placements
            self._view.refresh(self.redis, self.keys, self.clock())
        interval_ms = max(self.settings.explain_interval_s * 1000, self._full_cost_ms * SPARE)
        due = self._last_full_ms is None or self.clock() - self._last_full_ms >= interval_ms
        sched = self.settings.scheduling
        if not left and self._last_full_ms is not None:
            self.redis.delete(self.keys.queueinfo)  # nothing waits: no stale reasons
            self._waiting = None
            self._last_full_ms = None
        full = (left and due and (sched.explain_limit > 0 or sched.preemption)) or self._gangs_wait
        if full and skipped and self._explained == mark and not (sched.preemption and due):
            return False  # nothing changed since the last full pass: its queue view (and gang plan) still holds
        self._explained = mark if full else self._explained
        return full

    def place_express(self, woken: Sequence[bytes]) -> int:
        """Place the submits ``woken`` names (broker.express) if the last cycle left the cluster idle; how many."""
        tasks = self._express.tasks(woken) if self.lazy else []
        report, size = CycleReport(), self.settings.commit_batch
        placements = list(propose(tasks, self._view.index, {**self._express.tokens}, self._view.warm)) if tasks else []
        for batch in (placements[first:first + size] for first in range(0, len(placements), size)):
            self._tally(report, batch, self.scripts.reserve(batch))  # a call each, on the held connection
        record(report, self.settings.pool)
        EXPRESS.labels(self.settings.pool).inc(report.placed)
        return report.placed

    def _beat(self) -> None:  # that a cycle ran (gpubroker health dispatcher), at most once a second
        now = self.clock()
        if now >= self._next_beat_ms:
            self.redis.set(self.keys.cycle, now)
            self._next_beat_ms = now + 1000

    def _trim_history(self) -> None:  # entries whose records expired, once a minute (readers skip them)
        now = self.clock()
        if now >= self._next_trim_ms:
            history.trim_finished(self.redis, self.keys)
            self._next_trim_ms = now + 60_000

    def _refresh_metrics(self) -> None:
        """The pool gauges and outcome counters (broker.metrics): the queue count at most once per
        explain_interval_s (a long queue: less often, stats.interval_ms); nodes from the cycle's cache."""
        now = self.clock()
        if now < self._next_stats_ms:
            return
        read = stats.read_stats(self.redis, self.keys)
        self._next_stats_ms = now + stats.interval_ms(int(self.settings.explain_interval_s * 1000), read)
        COLLECTOR.update(self.settings.pool, read, now, self._view.nodes,
                         self._wanted.figures(now, self._waiting, self._view.nodes.values()))

    def _forget_departed(self, report: CycleReport) -> None:
        """Remove the nodes down for node_forget_after_s (forget.lua), looking now and then."""
        now, after_ms = self.clock(), int(self.settings.node_forget_after_s * 1000)
        if now < self._next_forget_ms:
            return
        self._next_forget_ms = now + min(60_000, max(1, after_ms // 4))
        for node_id, down_at in reads.down_nodes(self.redis, self.keys).items():
            if now - down_at >= after_ms and self.scripts.forget(node_id)[0] is ForgetCode.REMOVED:
                log.info("node %s forgotten: down for over %gs", node_id, self.settings.node_forget_after_s)
                report.forgotten.append(node_id)

    def _wake_for_rates(self, report: CycleReport, limits: dict[str, tuple[float, float]],
                        left: dict[str, float]) -> None:
        """Wake when a rate-limited name that ran out of starts this cycle may start again."""
        now = self.clock()
        for name, tokens in left.items():
            if tokens < 1:
                at = now + int((1 - tokens) / limits[name][0] * 1000) + 1
                report.wake_at_ms = at if report.wake_at_ms is None else min(report.wake_at_ms, at)

    def _full_pass(self, report: CycleReport, limit: int | None = None) -> None:
        sched = self.settings.scheduling
        report.full_pass = True
        self._last_full_ms = now = self.clock()
        window = self.settings.dispatch_window if limit is None else max(1, min(limit, self.settings.dispatch_window))
        poisoned: records.Poisoned = {}
        with Timer(report, "2_snapshot"):
            found = self._view.read(self.redis, self.keys, now, draining=True)
            snap, preempting = reads.read_snapshot(self.redis, self.keys, now, window, sched.preemptible_default,
                                                   found, self._catalogue, poisoned)
            # Preemptors no longer pending (placed, cancelled) wait for nothing.
            waiting = {t.id for t in snap.pending}
            done = [task_id for task_id in preempting if task_id not in waiting]
            if done:
                self.redis.hdel(self.keys.preempting, *done)
            snap.preempting_for, snap.warm = {k: v for k, v in preempting.items() if k in waiting}, self._view.warm
            snap.index = self._view.index  # best fit starts from it (the same nodes, kept across cycles)
        report.nodes_seen = max(report.nodes_seen, len(snap.nodes))
        report.pending_seen = max(report.pending_seen, len(snap.pending))
        self._waiting = snap if snap.pending else None
        with Timer(report, "3_plan"):
            plan = self.planner.plan(snap)
        self._wake_for_rates(report, snap.rate_limits, plan.tokens)
        self._plan_and_commit(report, iter(plan.placements))
        with Timer(report, "4_commit"):
            self._commit_gangs(report, plan)
            self._preempt(report, plan)
            self._quarantine(report, poisoned)
        with Timer(report, "5_record"):
            self._publish_waiting(plan)

    def _commit_gangs(self, report: CycleReport, plan: Plan) -> None:
        """Each gang the plan placed, all members or none, in one reserve_gang.lua call."""
        for placed in plan.gangs:
            code, _rank = gangs.reserve_gang(self.scripts, placed)
            if code is code.OK:
                report.placed += len(placed.members)
                report.placed_tasks.extend(placed.members)
            else:
                report.refused[code.name] += 1
                for node_id in placed.nodes if code is not code.NOT_PENDING else ():  # not as the cache had it
                    self._view.forget(node_id)

    def _preempt(self, report: CycleReport, plan: Plan) -> None:
        grace_ms = int(self.settings.scheduling.preempt_grace_s * 1000)
        for p in plan.preemptions:
            log.info("preempting %s on %s for %s (%s)", ", ".join(p.victims), p.node_id, p.task_id, p.reason)
            for victim in p.victims:
                code = self.scripts.preempt(victim, p.node_id, p.task_id, grace_ms)
                if code in (PreemptCode.REQUEUED, PreemptCode.STOPPING):
                    report.preempted.append(victim)
                    PREEMPTED.labels(self.settings.pool, code.name.lower()).inc()
                if code is PreemptCode.STOPPING and self.stopper is not None:
                    self.stopper(victim, p.node_id)
        gangs.note_waits(self.redis, self.keys, plan.preemptions)

    def _quarantine(self, report: CycleReport, poisoned: records.Poisoned) -> None:
        """End FAILED (quarantine.lua) the pending tasks whose stored request could not be read:
        left in the queue, each would be read and refused by every cycle of every dispatcher."""
        for task_id, (text, problem) in poisoned.items():
            code = self.scripts.quarantine(task_id, text, records.quarantine_reason(problem))
            if code is QuarantineCode.NOT_PENDING:  # placed, cancelled or quarantined by another dispatcher
                continue
            report.quarantined.append(task_id)
            QUARANTINED.labels(self.settings.pool, "task").inc()
            where = "FAILED" if code is QuarantineCode.FAILED else f"dead-lettered in {self.keys.deadletter}"
            log.error("task %s: %s -> %s", task_id, records.quarantine_reason(problem), where)

    def _note_unreadable_nodes(self) -> None:
        """Log and count, once per node and reason, the node hashes read_free could not read: such a
        node is left out of scheduling (the others are not) until a script changes it."""
        for node_id, why in self._view.unreadable.items():
            if self._unreadable_nodes.get(node_id) != why:
                log.error("node %s left out of scheduling: its hash cannot be read (%s)", node_id, why)
                QUARANTINED.labels(self.settings.pool, "node").inc()
        self._unreadable_nodes = dict(self._view.unreadable)

    def _publish_waiting(self, plan: Plan) -> None:
        """Each waiting task's position, reason and estimated start, for ``client.queue()``/``status``."""
        info = {task_id: json.dumps({"position": w.position, "reason": w.reason, "eta": w.estimated_start},
                                    separators=(",", ":")) for task_id, w in plan.waiting.items()}
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self.keys.queueinfo)
        if info:
            pipe.hset(self.keys.queueinfo, mapping=info)  # type: ignore[arg-type]
        pipe.execute()

    def _plan_and_commit(self, report: CycleReport, proposals: Iterator[Placement]) -> None:
        """Phases 3 and 4: plan and encode batch i+1 while reserve.lua runs batch i, then read
        i's codes and send i+1 at once."""
        size, in_flight, sent = self.settings.commit_batch, None, cast(list[Placement], [])
        try:
            while True:
                with Timer(report, "3_plan"):
                    batch = list(itertools.islice(proposals, size))
                    prepared = self.scripts.prepare_reserve(batch) if batch else None
                with Timer(report, "4_commit"):
                    if in_flight is not None:
                        done, in_flight = in_flight, None
                        self._tally(report, sent, done.codes())
                    if prepared is None:
                        return
                    prepared.send()
                    in_flight, sent = prepared, batch
                    report.proposed += len(batch)
        finally:
            if in_flight is not None:  # planning failed: still read the reply, freeing its connection
                with contextlib.suppress(redis.RedisError):
                    self._tally(report, sent, in_flight.codes())

    def _tally(self, report: CycleReport, batch: Sequence[Placement], codes: list[ReserveCode]) -> None:
        for placement, code in zip(batch, codes, strict=True):
            if code is ReserveCode.OK:
                report.placed += 1
                report.placed_tasks.append(placement)
            else:
                report.refused[code.name] += 1
                if code is not ReserveCode.NOT_PENDING:  # the node is not as the cache had it: read it anew
                    self._view.forget(placement.node_id)

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
                    woken = drain(pubsub)
                    if not (woken or (report.window_full and report.placed)):
                        wait = self.settings.reap_interval_s
                        if report.wake_at_ms is not None:
                            wait = max(0.0, min(wait, (report.wake_at_ms - self.clock()) / 1000))
                        woken = drain(pubsub, wait)
                    self.place_express(woken)  # before the cycle: submits on an idle cluster, at once
            except redis.RedisError as exc:
                if not transient(exc):  # refused credentials or permissions, a script's bug
                    raise
                # Lost, full (maxmemory), a replica, loading, busy: all pass; nothing was half written.
                log.warning("Redis unavailable (%s); retrying in %.1fs", as_broker_error(exc), backoff)
                # A restarted Redis may have lost its last writes, and new ones can bring the
                # change sequence back past what was cached: read every node afresh.
                self._view, self._express.ready = FreeView(), False
                stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                pubsub.close()

