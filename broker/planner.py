"""The scheduling planner: one pure pass from a ``Snapshot`` to a ``Plan``.

The dispatcher commits ``Plan.placements`` through reserve.lua, stops ``Plan.preemptions``'
victims and publishes ``Plan.waiting``; the simulator calls the same code. One pass, in
phases (as kueue's cycle):

    1 estimate  each task's runtime: its own, else the learned mean for its name and shape,
                then its name, else ``default_runtime_s``, else unknown
    2 order     fifo | priority (+ aging) | sjf, srtf (shortest first) | hrrn (highest
                (wait + estimate) / estimate first) | fair (weighted DRF between tenants,
                guarantees first, recomputed as the pass places tasks)
    3 admit     per task, in that order: quota (fair); place now where nothing held for a
                higher-ranked task is delayed; else preempt (fewest victims on one node);
                else (backfill) hold its earliest start; strict stops at the first that waits
    4 explain   position, reason and estimated start of the first ``explain_limit`` waiting
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from broker.fairshare import ZERO, Ledger, Vector, demand, held
from broker.placement import gpus_on, labels_match, make_placer
from broker.policy import (
    MILLI,
    NodeFree,
    Placement,
    Plan,
    Preemption,
    RunningTask,
    Snapshot,
    TaskRequest,
    Waiting,
    mix_key,
)
from broker.scheduling import Mode, Ordering, SchedulingConfig, WithinTenant
from broker.timeline import INF, Hold, Timeline, Usage

_Victims = tuple[list[tuple[RunningTask, str]], list[int]]  # (victim, why) in greedy order, and the GPUs freed
RATIO_FLOOR_S = 10.0  # hrrn: shorter runs count as this long (as bounded slowdown's 10 s)
MAX_HOLDS = 100  # backfill: blocked tasks that get a hold (and an exact start) per pass, highest-ranked first


@dataclass(slots=True)
class _Cause:
    """Why a task waits; turned into words only for the tasks that are explained."""

    kind: str  # fit | held | strict | quota | preempting | stopping
    detail: str = ""  # the task it waits for or behind, the quota's words, or the node
    victims: int = 0
    start: float | None = None  # its own backfill hold starts then


class Planner:
    def __init__(self, config: SchedulingConfig, max_holds: int = MAX_HOLDS) -> None:
        self.config = config
        self.max_holds = max_holds

    def plan(self, snap: Snapshot) -> Plan:
        return _Pass(self.config, self.max_holds, snap).run()


def _running_key(task: RunningTask) -> str:
    whole = task.gpu_indices and task.gpu_milli >= MILLI
    return f"{len(task.gpu_indices) if whole else 0},{0 if whole or not task.gpu_indices else task.gpu_milli}"


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
    for i, run in enumerate(snap.running):
        if run.node_id in gpus and any(not 0 <= g < gpus[run.node_id] for g in run.gpu_indices):
            raise ValueError(f"running[{i}].gpu_indices: {run.gpu_indices} outside node {run.node_id}'s "
                             f"{gpus[run.node_id]} GPUs")


class _Pass:
    def __init__(self, config: SchedulingConfig, max_holds: int, snap: Snapshot) -> None:
        _check(snap)
        self.config, self.max_holds, self.snap, self.now = config, max_holds, snap, snap.now
        self.fair = config.ordering is Ordering.FAIR
        # 1 estimate
        self.duration = {t.id: self._estimate(t.name, mix_key(t), t.estimate_s) for t in snap.pending}
        self.placer = make_placer(config.placement, snap.nodes, snap.mix)
        self.timeline = Timeline(self.now, self.placer.nodes)
        self.node_order = {n: i for i, n in enumerate(self.placer.nodes)}
        self.ledger = Ledger(config, snap.nodes, snap.running)
        self.usage: dict[str, Usage] = {}
        self.ends: dict[str, float | None] = {}
        self.stopping: set[str] = set()  # asked to stop (before or in this pass): capacity coming back
        self.stopping_nodes: set[str] = set()
        self.victims: dict[str, list[RunningTask]] = {}  # node -> preemptible running tasks
        for run in snap.running:
            if run.node_id not in self.placer.nodes:
                continue  # on a node that is no longer schedulable: counts for its tenant only
            estimate = self._estimate(run.name, _running_key(run), run.estimate_s)
            self.ends[run.id] = None if estimate == INF else max(self.now, run.started_at + estimate)
            self.usage[run.id] = usage = Usage(run.id, run.gpu_indices, run.gpu_milli, run.gpu_mem, run.cpu_milli,
                                               run.memory_mb)
            if run.preempting:
                self.stopping.add(run.id)
                self.stopping_nodes.add(run.node_id)
                self.timeline.release(run.node_id, self.now, usage)
                continue
            self.timeline.release(run.node_id, self.ends[run.id], usage)
            if run.preemptible:
                self.victims.setdefault(run.node_id, []).append(run)
        self.plan = Plan()
        self.waiting: list[tuple[int, TaskRequest, _Cause]] = []
        self.failed: dict[object, _Cause] = {}  # capacity only shrinks within a pass
        self.held: dict[object, tuple[float, _Cause]] = {}  # shape -> shortest run held from starting now
        self.no_victims: set[object] = set()
        self.victims_memo: dict[tuple[str, object, int], tuple[int, _Victims | None]] = {}
        self.stopping_memo: dict[tuple[str, object, float], tuple[int, bool]] = {}
        self.ledger_epoch = 0  # fair: who borrows changes as usage does, and with it who may be preempted
        self.holds = 0
        self.reorder = False  # a preemption lowered other tenants' usage: fair order is recomputed

    def _estimate(self, name: str, shape: str, own: float | None) -> float:
        if own is not None:
            return own
        learned = self.snap.runtimes.get((name, shape))
        if learned is None:
            learned = self.snap.runtimes.get((name, ""))
        if learned is None:
            learned = self.config.default_runtime_s
        return INF if learned is None else learned

    def run(self) -> Plan:
        strict = self.config.mode is Mode.STRICT
        blocker = ""
        for rank, task in enumerate(self._ordered(), 1):
            cause = _Cause("strict", blocker) if blocker else self._admit(task)
            if cause is not None:
                self.waiting.append((rank, task, cause))
                if strict and not blocker:
                    blocker = task.id
        self._explain()
        return self.plan

    # 2 order

    def _effective(self, task: TaskRequest) -> float:
        waited = max(0.0, self.now - task.submitted_at) / 60
        return task.priority + min(self.config.aging_cap, self.config.aging_per_minute * waited)

    def _ordered(self) -> Iterator[TaskRequest]:
        ordering, pending = self.config.ordering, self.snap.pending
        if ordering is Ordering.FAIR:
            return self._fair()
        if ordering is Ordering.FIFO:
            return iter(sorted(pending, key=lambda t: (t.submitted_at, t.seq)))
        if ordering is Ordering.PRIORITY:
            if not self.config.aging_per_minute:
                return iter(sorted(pending, key=lambda t: (-t.priority, t.seq)))
            return iter(sorted(pending, key=lambda t: (-self._effective(t), t.seq)))
        if ordering is Ordering.HRRN:
            return iter(sorted(pending, key=lambda t: (-self._ratio(t), self.duration[t.id], -t.priority, t.seq)))
        return iter(sorted(pending, key=lambda t: (self.duration[t.id], -t.priority, t.seq)))  # sjf, srtf

    def _ratio(self, task: TaskRequest) -> float:
        """Response ratio 1 + wait / estimate: its slowdown were it to start now (0 when no
        estimate: last, as under sjf). Waiting raises every task, the shortest fastest; equal
        ratios (nobody has waited) go shortest first."""
        duration = self.duration[task.id]
        if duration == INF:
            return 0.0
        return 1 + max(0.0, self.now - task.submitted_at) / max(duration, RATIO_FLOOR_S)

    def _fair(self) -> Iterator[TaskRequest]:
        """Tenants under their guarantee first, then lowest weighted dominant share; within a
        tenant, priority with aging (or shortest first, ``within_tenant = "sjf"``). Keys are
        recomputed as the pass changes usage."""
        queues: dict[str, deque[TaskRequest]] = {}
        if self.config.within_tenant is WithinTenant.SJF:
            ranked = sorted(self.snap.pending, key=lambda t: (self.duration[t.id], -self._effective(t), t.seq))
        elif self.config.within_tenant is WithinTenant.HRRN:
            ranked = sorted(self.snap.pending,
                            key=lambda t: (-self._ratio(t), self.duration[t.id], -self._effective(t), t.seq))
        else:
            ranked = sorted(self.snap.pending, key=lambda t: (-self._effective(t), t.seq))
        for task in ranked:
            queues.setdefault(task.tenant, deque()).append(task)

        def key(tenant: str) -> tuple[bool, float, float, int, str]:
            head = queues[tenant][0]
            return (not self.ledger.within_guarantee(tenant, demand(head)), self.ledger.dominant_share(tenant),
                    -self._effective(head), head.seq, tenant)

        heap = [key(t) for t in queues]
        heapq.heapify(heap)
        while heap:
            if self.reorder:
                heap = [key(k[-1]) for k in heap]
                heapq.heapify(heap)
                self.reorder = False
            tenant = heapq.heappop(heap)[-1]
            yield queues[tenant].popleft()
            if queues[tenant]:
                heapq.heappush(heap, key(tenant))

    # 3 admit

    def _admit(self, task: TaskRequest) -> _Cause | None:
        duration = self.duration[task.id]
        if self.fair and not self.ledger.within_guarantee(task.tenant, demand(task)):
            refusal = self.ledger.refusal(task.tenant, demand(task))
            if refusal is not None:
                return _Cause("quota", refusal)
        cause = self._place(task, duration)
        if cause is None:
            return None
        node_id = self.snap.preempting_for.get(task.id)
        if node_id in self.placer.nodes:  # its victims are stopping there: keep that node's capacity for it
            self._hold(task, str(node_id), duration)
            return _Cause("stopping", str(node_id))
        if self.config.preemption and len(self.plan.preemptions) < self.config.preemptions_per_pass:
            preempting = self._preempt(task, duration)
            if preempting is not None:
                return preempting
        if self.config.mode is Mode.BACKFILL and self.holds < self.max_holds:
            self.holds += 1
            found = self.timeline.earliest(task, duration, self.node_order, fits_now=False)
            if found is not None:
                start, node_id, gpus = found
                node = self.placer.nodes[node_id]
                self.timeline.hold(Hold(node_id, start, start + duration, Usage.of(task, node, gpus)))
                return _Cause(cause.kind, cause.detail, start=start)
        return cause

    def _place(self, task: TaskRequest, duration: float) -> _Cause | None:
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
            cause = self.failed[task.shape] = _Cause("fit")
            return cause
        cause = _Cause("held", self._holder(free.node_id, duration))
        self.held[task.shape] = (duration, cause)  # shorter than any held before (else it was known)
        return cause

    def _take(self, task: TaskRequest, placement: Placement, duration: float) -> None:
        self.placer.take(task, placement)
        node = self.placer.nodes[placement.node_id]
        end = None if duration == INF else self.now + duration
        self.timeline.release(node.id, end, Usage.of(task, node, placement.gpu_indices))
        self.ledger.add(task.tenant, demand(task))
        self.ledger_epoch += self.fair
        self.plan.placements.append(placement)

    def _holder(self, node_id: str, duration: float) -> str:
        holds = [h for h in self.timeline.holds.get(node_id, ()) if h.start < self.now + duration]
        return min(holds, key=lambda h: h.start).usage.task_id if holds else "?"

    def _hold(self, task: TaskRequest, node_id: str, duration: float) -> None:
        """Keep what ``task`` needs on ``node_id`` from now, counting capacity that is stopping."""
        end = self.now + self.config.preempt_grace_s + duration
        gpus = self._spare_free(node_id, task, self.timeline.window(node_id, self.now, end))
        if gpus is not None:
            self.timeline.hold(Hold(node_id, self.now, end, Usage.of(task, self.placer.nodes[node_id], gpus)))

    def _spare_free(self, node_id: str, task: TaskRequest, state: NodeFree) -> list[int] | None:
        """GPUs to hold from now: whole GPUs that are busy now (stopping, overdue) before free ones,
        so that lower-ranked tasks keep what is free now."""
        gpus = gpus_on(state, task)
        if gpus is None or not task.whole_gpus:
            return gpus
        free = self.placer.nodes[node_id]
        return sorted(state.whole_indices(), key=lambda i: (free.gpu_is_whole(i), i))[: task.whole_gpus]

    def _preempt(self, task: TaskRequest, duration: float) -> _Cause | None:
        """Stop the fewest running tasks on one node that make ``task`` fit; None if none can."""
        end = self.now + self.config.preempt_grace_s + duration
        for node_id in sorted(self.stopping_nodes, key=self.node_order.__getitem__):
            memo = (node_id, task.shape, duration if node_id in self.timeline.later else 0)
            cached = self.stopping_memo.get(memo)
            if cached is None or cached[0] != self.timeline.version[node_id]:
                fits = (labels_match(self.placer.nodes[node_id], task)
                        and gpus_on(self.timeline.window(node_id, self.now, end), task) is not None)
                cached = self.stopping_memo[memo] = (self.timeline.version[node_id], fits)
            if cached[1]:
                self._hold(task, node_id, duration)  # what is stopping there is enough: preempt no more
                return _Cause("stopping", node_id)
        reclaim = self.fair and self.ledger.within_guarantee(task.tenant, demand(task))
        # The runtime matters only for srtf and where a hold starts later (preemptors' holds start now).
        timed = self.config.ordering is Ordering.SRTF
        key = (task.shape, task.priority, task.tenant if self.fair else "",
               duration if timed or self.timeline.later else 0, reclaim)
        if not self.victims or key in self.no_victims:
            return None
        best: tuple[tuple[float, ...], str, list[tuple[RunningTask, str]], list[int]] | None = None
        for node_id, running in self.victims.items():
            node = self.placer.nodes[node_id]
            if len(node.free_milli) < task.whole_gpus or not labels_match(node, task):
                continue
            # A node's answer holds until something changes there.
            memo = (node_id, (*key[:3], duration if timed or node_id in self.timeline.later else 0, reclaim),
                    self.ledger_epoch)
            answer = self.victims_memo.get(memo)
            if answer is None or answer[0] != self.timeline.version[node_id]:
                answer = (self.timeline.version[node_id], self._victims_on(node_id, task, end, running, reclaim))
                self.victims_memo[memo] = answer
            found = answer[1]
            if found is not None:
                chosen, gpus = found
                rank = (len(chosen), sum(r.gpus for r, _ in chosen), self.node_order[node_id])
                if best is None or rank < best[0]:
                    best = (rank, node_id, chosen, gpus)
        if best is None:
            self.no_victims.add(key)
            return None
        _, node_id, chosen, gpus = best
        for run, _ in chosen:
            self.stopping.add(run.id)
            self.timeline.release_now(node_id, run.id, self.usage[run.id])
            self.ledger.remove(run.tenant, held(run))
        self.stopping_nodes.add(node_id)
        self.ledger.add(task.tenant, demand(task))
        self.ledger_epoch += self.fair
        self.reorder = True
        state = self.timeline.window(node_id, self.now, end)
        gpus = self._spare_free(node_id, task, state) or gpus
        self.timeline.hold(Hold(node_id, self.now, end, Usage.of(task, self.placer.nodes[node_id], gpus)))
        why = "; ".join(dict.fromkeys(reason for _, reason in chosen))
        self.plan.preemptions.append(Preemption(task.id, node_id, tuple(r.id for r, _ in chosen), why))
        return _Cause("preempting", node_id, victims=len(chosen))

    def _victims_on(self, node_id: str, task: TaskRequest, end: float, running: list[RunningTask],
                    reclaim: bool) -> _Victims | None:
        """Greedy (borrowers, then lowest priority, then most recently started) until ``task`` fits,
        then drop every victim it fits without."""
        eligible = [(r, why) for r in running
                    if r.id not in self.stopping and (why := self._may_preempt(task, r, reclaim))]
        if not eligible or self._fits_with(node_id, task, end, eligible) is None:
            return None  # not even with all of them
        eligible.sort(key=lambda e: (not self.ledger.is_borrower(e[0].tenant), e[0].priority, -e[0].started_at))
        chosen: list[tuple[RunningTask, str]] = []
        taken: dict[str, Vector] = {}
        gpus = None
        for run, why in eligible:
            if why.startswith("reclaim") and not self.ledger.is_borrower(run.tenant, taken.get(run.tenant, ZERO)):
                continue  # that tenant is back within its guarantee
            chosen.append((run, why))
            before, more = taken.get(run.tenant, ZERO), held(run)
            taken[run.tenant] = (before[0] + more[0], before[1] + more[1], before[2] + more[2])
            gpus = self._fits_with(node_id, task, end, chosen)
            if gpus is not None:
                break
        if gpus is None:
            return None
        for entry in reversed(list(chosen)):
            rest = [c for c in chosen if c is not entry]
            fits = self._fits_with(node_id, task, end, rest)
            if fits is not None:
                chosen, gpus = rest, fits
        return chosen, gpus

    def _fits_with(self, node_id: str, task: TaskRequest, end: float,
                   victims: list[tuple[RunningTask, str]]) -> list[int] | None:
        return gpus_on(self.timeline.window(node_id, self.now, end, {r.id for r, _ in victims}), task)

    def _may_preempt(self, task: TaskRequest, run: RunningTask, reclaim: bool) -> str:
        """Why ``run`` may be stopped for ``task`` ("" if it may not)."""
        config = self.config
        if not run.preemptible or self.now - run.started_at < config.min_runtime_s:
            return ""
        if self.fair and run.tenant != task.tenant:
            if reclaim and self.ledger.is_borrower(run.tenant):
                return f"reclaim: tenant {task.tenant} under its guarantee, {run.tenant} borrowing"
            return ""
        if run.priority < task.priority or (config.preempt_equal_priority and run.priority == task.priority):
            return f"priority {task.priority} > {run.priority}" if run.priority < task.priority else "equal priority"
        duration, end = self.duration[task.id], self.ends.get(run.id)
        if (config.ordering is Ordering.SRTF and run.priority <= task.priority and duration < INF and end is not None
                and end - self.now > config.srtf_factor * duration):
            return f"srtf: {end - self.now:.0f}s left > {config.srtf_factor:g} x {duration:.0f}s"
        return ""

    # 4 explain

    def _explain(self) -> None:
        starts: dict[str, float | None] = {}
        reasons: dict[object, str] = {}
        grace = self.now + self.config.preempt_grace_s
        for rank, task, cause in self.waiting[: self.config.explain_limit]:
            kind, detail = cause.kind, cause.detail
            start: float | None = None
            if kind == "fit":
                if task.shape not in reasons:
                    reasons[task.shape] = self._why(task)
                reason = reasons[task.shape]
            elif kind == "held":
                reason = f"held for higher-ranked task {detail} (backfill)"
            elif kind == "strict":
                reason = f"behind {detail} (strict order)"
            elif kind == "quota":
                reason = detail
            elif kind == "preempting":
                reason, start = f"preempting {cause.victims} task{'s' * (cause.victims > 1)} on node {detail}", grace
            else:
                reason, start = f"waiting for preempted tasks to stop on node {detail}", grace
            if cause.start is not None:
                start = cause.start
            elif kind in ("fit", "held", "strict"):
                found = self.timeline.earliest(task, self.duration[task.id], self.node_order, kind == "strict")
                start = None if found is None else found[0]
                if kind == "strict":
                    ahead = starts.get(detail)
                    start = None if start is None or ahead is None else max(start, ahead)
            starts[task.id] = start
            self.plan.waiting[task.id] = Waiting(rank, reason, start)

    def _why(self, task: TaskRequest) -> str:
        """What is missing now, with the numbers."""
        nodes = [n for n in self.placer.nodes.values() if labels_match(n, task)]
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

