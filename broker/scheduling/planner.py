"""The scheduling planner: one pure pass from a ``Snapshot`` to a ``Plan``.

The dispatcher commits ``Plan.placements`` through reserve.lua, stops ``Plan.preemptions``'
victims and publishes ``Plan.waiting``; the simulator calls the same code. One pass, in
phases (as kueue's cycle):

    1 estimate  each task's runtime: its own, else the learned mean for its name and GPU
                kind, then its name, else ``default_runtime_s``, else unknown
    2 order     ``ordering.ORDERINGS``: fifo | priority (+ aging) | sjf, srtf | hrrn | fair
                (weighted DRF between tenants, recomputed as the pass places tasks)
    3 admit     per task, in that order: quota (fair), its name's rate limit; place now where nothing held for a
                higher-ranked task is delayed; else preempt (``preemption``: fewest victims on
                one node); else (backfill) hold its earliest start; strict stops at the first
                that waits. A gang (``gang``) is one unit throughout: all its members
                placed now or none, its members' sum against its tenant, else preempt
                (``gang_preemption``: the cheapest victims across nodes), else one hold per
                member at the gang's earliest start; a running gang is one victim (all members).
                An elastic request (``elastic``) is granted the largest amount from the
                rule's target down that places now, else waits as its minimum
    4 explain   position, reason and estimated start of the first ``explain_limit`` waiting
                (``explain``)
"""

from __future__ import annotations

import operator

from broker.scheduling import elastic, gang
from broker.scheduling.config import Mode, Ordering, SchedulingConfig
from broker.scheduling.explain import Cause, explain
from broker.scheduling.fairshare import Ledger
from broker.scheduling.gang_preemption import WAITS, preempt_gang
from broker.scheduling.model import GangPlacement, GpuKind, NodeFree, Placement, Plan, Snapshot, TaskRequest, demand
from broker.scheduling.ordering import ORDERINGS, Ranking
from broker.scheduling.placement import PlacementKind, make_placer
from broker.scheduling.placement.base import Placer
from broker.scheduling.placement.best_fit import BestFitPlacer
from broker.scheduling.placement.warm import warm_first
from broker.scheduling.preemption import Preemptor
from broker.scheduling.timeline import INF, Hold, Timeline, Usage, expected_end

MAX_HOLDS = 100  # backfill: blocked tasks that get a hold (and an exact start) per pass, highest-ranked first


class Planner:
    def __init__(self, config: SchedulingConfig, max_holds: int = MAX_HOLDS) -> None:
        self.config = config
        self.max_holds = max_holds

    def plan(self, snap: Snapshot) -> Plan:
        return _Pass(self.config, self.max_holds, snap).run()


def _check(snap: Snapshot) -> None:
    """Refuse a snapshot the planner would misread, naming the field."""
    gpus = {}
    for i, node in enumerate(snap.nodes):
        if len(node.free_mem) != len(node.free_milli):
            raise ValueError(f"nodes[{i}].free_mem: {len(node.free_mem)} entries for {len(node.free_milli)} GPUs")
        gpus[node.id] = len(node.free_milli)
    seen: set[str] = set()
    for i, task in enumerate(snap.pending):
        if task.id in seen:
            raise ValueError(f"pending[{i}].id: {task.id!r} appears twice")
        seen.add(task.id)
        if task.estimate_s is not None and not task.estimate_s >= 0:
            raise ValueError(f"pending[{i}].estimate_s: must be a number >= 0 (got {task.estimate_s!r})")
        if task.replicas < 1:
            raise ValueError(f"pending[{i}].replicas: must be at least 1 (got {task.replicas!r})")
    for i, run in enumerate(snap.running):
        if run.node_id in gpus and any(not 0 <= g < gpus[run.node_id] for g in run.gpu_indices):
            raise ValueError(f"running[{i}].gpu_indices: {run.gpu_indices} outside node {run.node_id}'s "
                             f"{gpus[run.node_id]} GPUs")


def _placer(config: SchedulingConfig, snap: Snapshot) -> Placer:
    """Best fit from the dispatcher's kept index when it holds exactly ``snap.nodes`` (at 10,000
    nodes, building best fit's buckets from every node was a fifth of a full pass), else a fresh
    placer over them."""
    index = snap.index
    if (config.placement is PlacementKind.BEST_FIT and index is not None and len(index.ranked) == len(snap.nodes)
            and all(map(operator.is_, index.ranked, snap.nodes))):
        return BestFitPlacer.from_index(index)
    return make_placer(config.placement, snap.nodes, snap.mix)


class _Pass:
    def __init__(self, config: SchedulingConfig, max_holds: int, snap: Snapshot) -> None:
        _check(snap)
        self.config, self.max_holds, self.snap, self.now = config, max_holds, snap, snap.now
        self.fair = config.ordering is Ordering.FAIR
        # 1 estimate
        self.duration = {t.id: self._estimate(t.name, t.gpu_kind, t.estimate_s) for t in snap.pending}
        self.placer = warm_first(_placer(config, snap), snap.warm)
        self.timeline = Timeline(self.now, self.placer.nodes)
        self.node_order = {n: i for i, n in enumerate(self.placer.nodes)}
        self.ledger = Ledger(config, snap.nodes, snap.running)
        self.ranking = Ranking(self.now, self.duration, config.aging_per_minute, config.aging_cap,
                               config.within_tenant, self.ledger)
        self.preemptor = Preemptor(config, self.now, self.placer, self.timeline, self.ledger, self.ranking,
                                   self.node_order)
        for run in snap.running:
            if run.node_id not in self.placer.nodes:
                continue  # on a node that is no longer schedulable: counts for its tenant only
            estimate = self._estimate(run.name, run.gpu_kind, run.estimate_s)
            end = expected_end(run.started_at, estimate, self.now)
            usage = Usage(run.id, run.gpu_indices, run.gpu_milli, run.gpu_mem, run.cpu_milli, run.memory_mb)
            self.timeline.release(run.node_id, self.now if run.preempting else end, usage)
            self.preemptor.add_running(run, usage, end)
        self.plan = Plan()
        self.waiting: list[tuple[int, TaskRequest, Cause]] = []
        self.failed: dict[object, Cause] = {}  # capacity only shrinks within a pass
        self.held: dict[object, tuple[float, Cause]] = {}  # shape -> shortest run held from starting now
        self.holds = 0
        self.tokens = {name: tokens for name, (_rate, tokens) in snap.rate_limits.items()}
        self.active = {t.tenant for t in snap.pending} | {r.tenant for r in snap.running}  # elastic "fair"

    def _estimate(self, name: str, kind: GpuKind, own: float | None) -> float:
        if own is not None:
            return own
        learned = self.snap.runtimes.get((name, kind))
        if learned is None:
            learned = self.snap.runtimes.get((name, None))
        if learned is None:
            learned = self.config.default_runtime_s
        return INF if learned is None else learned

    def run(self) -> Plan:
        strict = self.config.mode is Mode.STRICT
        blocker = ""
        # 2 order, 3 admit
        for rank, task in enumerate(ORDERINGS[self.config.ordering](self.snap.pending, self.ranking), 1):
            cause = Cause("strict", blocker) if blocker else self._admit(task)
            if cause is not None:
                self.waiting.append((rank, elastic.least(task), cause))
                if strict and not blocker:
                    blocker = task.id
        self.plan.preemptions = self.preemptor.preemptions
        self.plan.tokens = self.tokens
        # 4 explain
        rates_left = {name: (rate, self.tokens[name]) for name, (rate, _) in self.snap.rate_limits.items()}
        self.plan.waiting = explain(self.waiting[: self.config.explain_limit], self.timeline, self.placer.nodes,
                                    self.node_order, self.duration, self.now, self.config.preempt_grace_s, rates_left,
                                    self.snap.draining)
        return self.plan

    def _admit(self, task: TaskRequest) -> Cause | None:
        duration = self.duration[task.id]
        if task.is_elastic:
            return self._admit_elastic(task, duration)
        if self.fair and not self.ledger.within_guarantee(task.tenant, demand(task)):
            refusal = self.ledger.refusal(task.tenant, demand(task))
            if refusal is not None:
                return Cause("quota", refusal)
        if self.tokens.get(task.name, 1) < 1:
            return Cause("rate", task.name)
        if task.is_gang:
            return self._admit_gang(task, duration)
        cause = self._place(task, duration)
        if cause is None:
            return None
        node_id = self.snap.preempting_for.get(task.id, "")
        if node_id not in self.placer.nodes:  # victims on several nodes (a gang's): its own node is the last
            node_id = node_id.rsplit(WAITS, 1)[-1]
        if node_id in self.placer.nodes:  # its victims are stopping there: keep that node's capacity for it
            self.preemptor.hold(task, str(node_id), duration)
            return Cause("stopping", str(node_id))
        if self.config.preemption and len(self.preemptor.preemptions) < self.config.preemptions_per_pass:
            preempting = self.preemptor.preempt(task, duration)
            if preempting is not None:
                return preempting
        if self.config.mode is Mode.BACKFILL and self.holds < self.max_holds:
            self.holds += 1
            found = self.timeline.earliest(task, duration, self.node_order, fits_now=False)
            if found is not None:
                start, node_id, gpus = found
                node = self.placer.nodes[node_id]
                self.timeline.hold(Hold(node_id, start, start + duration, Usage.of(task, node, gpus)))
                return Cause(cause.kind, cause.detail, start=start)
        return cause

    def _admit_elastic(self, task: TaskRequest, duration: float) -> Cause | None:
        """Grant the largest amount from the rule's target down that places now; else admit the
        minimum as any task (placed, or waiting, preempting and holding as the minimum)."""
        if self.tokens.get(task.name, 1) >= 1:
            for sized in elastic.grants(self.config.elastic, task, self.ledger, self.active, self.placer.nodes):
                if self.fair and self.ledger.refusal(task.tenant, demand(sized)) is not None:
                    continue
                placed = self._place_gang(sized, duration) if sized.is_gang else self._place(sized, duration)
                if placed is None:
                    return None
        return self._admit(elastic.least(task))

    def _admit_gang(self, task: TaskRequest, duration: float) -> Cause | None:
        """Place every member now, else hold what its victims free as they stop, else preempt
        (victims on several nodes), else (backfill) hold each member's node at the gang's earliest start."""
        cause = self._place_gang(task, duration)
        if cause is None:
            return None
        may_stop = self.config.preemption and len(self.preemptor.preemptions) < self.config.preemptions_per_pass
        waits_on = self.snap.preempting_for.get(task.id)
        if may_stop or waits_on:
            preempting = preempt_gang(self.preemptor, task, duration, may_stop, waits_on)
            if preempting is not None:
                return preempting
        if self.config.mode is not Mode.BACKFILL or self.holds >= self.max_holds:
            return cause
        self.holds += 1
        found = gang.earliest(task, duration, self.timeline, self.node_order)
        if found is None:
            return cause
        start, members = found
        member = gang.member_of(task)
        for p in members:
            usage = Usage.of(member, self.placer.nodes[p.node_id], p.gpu_indices)
            self.timeline.hold(Hold(p.node_id, start, start + duration, usage))
        return Cause(cause.kind, cause.detail, start=start)

    def _place_gang(self, task: TaskRequest, duration: float) -> Cause | None:
        """Place all of a gang's members now without delaying a hold, else why not."""
        known = self.failed.get(task.shape)
        if known is not None:
            return known
        views = self.timeline.views(duration) if self.timeline.holds else None
        members = gang.choose(task, self._states(views), self.node_order)
        if members is not None:
            self._take_gang(task, members, duration)
            return None
        free = gang.choose(task, self.placer.nodes, self.node_order) if views else None
        if free is None:
            cause = self.failed[task.shape] = Cause("fit")
            return cause
        held = next((p.node_id for p in free if p.node_id in self.timeline.holds), free[0].node_id)
        return Cause("held", self._holder(held, duration))

    def _states(self, views: dict[str, NodeFree] | None) -> dict[str, NodeFree]:
        nodes = self.placer.nodes
        return nodes if not views else {n: views.get(n, free) for n, free in nodes.items()}

    def _take_gang(self, task: TaskRequest, members: list[Placement], duration: float) -> None:
        member = gang.member_of(task)
        end = None if duration == INF else self.now + duration
        for p in members:
            self.placer.take(member, p)
            node = self.placer.nodes[p.node_id]
            self.timeline.release(node.id, end, Usage.of(member, node, p.gpu_indices))
        self.ledger.add(task.tenant, demand(task))
        if task.name in self.tokens:
            self.tokens[task.name] -= 1
        self.plan.gangs.append(GangPlacement(task.id, tuple(members)))

    def _place(self, task: TaskRequest, duration: float) -> Cause | None:
        """Place ``task`` now if it fits without delaying a hold; else why not."""
        known = self.failed.get(task.shape)
        if known is None and self.timeline.holds:
            # Capacity only shrinks within a pass and a longer run meets more holds: what was
            # held from a shorter task of this shape is held from this one too.
            shorter = self.held.get(task.shape)
            if shorter is not None and duration >= shorter[0]:
                known = shorter[1]
        if known is not None:
            return known
        views = self.timeline.views(duration) if self.timeline.holds else None
        placement = self.placer.choose(task, views)
        if placement is not None:
            self._take(task, placement, duration)
            return None
        free = self.placer.choose(task) if views else None
        if free is None:
            cause = self.failed[task.shape] = Cause("fit")
            return cause
        cause = Cause("held", self._holder(free.node_id, duration))
        self.held[task.shape] = (duration, cause)  # shorter than any held before (else it was known)
        return cause

    def _take(self, task: TaskRequest, placement: Placement, duration: float) -> None:
        self.placer.take(task, placement)
        node = self.placer.nodes[placement.node_id]
        end = None if duration == INF else self.now + duration
        self.timeline.release(node.id, end, Usage.of(task, node, placement.gpu_indices))
        self.ledger.add(task.tenant, demand(task))
        if task.name in self.tokens:
            self.tokens[task.name] -= 1
        self.plan.placements.append(placement)

    def _holder(self, node_id: str, duration: float) -> str:
        holds = [h for h in self.timeline.holds.get(node_id, ()) if h.start < self.now + duration]
        return min(holds, key=lambda h: h.start).usage.task_id if holds else "?"
