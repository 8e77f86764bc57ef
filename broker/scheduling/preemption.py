"""Preemption: the fewest running tasks on one node whose stopping lets a more urgent task fit.

Rules (Kueue's and Slurm's, see docs/scheduling.md): only tasks submitted preemptible, after
``min_runtime_s``; under fair share across tenants only to reclaim a guarantee from a
borrower; otherwise a lower priority (or equal, with ``preempt_equal_priority``), or under
srtf a task with ``srtf_factor`` times more left to run. Candidates are taken greedily
(borrowers, then lowest priority, then least work lost: time since its last checkpoint, else
since it started) until the task fits, then every victim it fits without is dropped again.
Among nodes: fewest victims, then fewest GPUs stopped, then least work lost, then node order.
A task already stopped ``max_preemptions`` times is not stopped again. What stopping victims
free is held for the preemptor from now.

A running gang (issue 13) is one victim unit: its members may be stopped only together (one
fate), so each node lists the gang once, standing for all its members; choosing it stops every
member on every node, and its cost counts them all (victims, GPUs, work lost). A pending gang
preempts through ``gang_preemption``, over several nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from broker.scheduling.config import Ordering, SchedulingConfig
from broker.scheduling.explain import Cause
from broker.scheduling.fairshare import ZERO, Ledger
from broker.scheduling.model import NodeFree, Preemption, RunningTask, TaskRequest, Vector, demand, held
from broker.scheduling.ordering import Ranking
from broker.scheduling.placement.base import Placer
from broker.scheduling.timeline import INF, Hold, Timeline, Usage

_Victims = tuple[list[tuple[RunningTask, str]], list[int]]  # (victim, why) in greedy order, and the GPUs freed


@dataclass(slots=True)
class Preemptor:
    """One pass's preemption state over the pass's placer, timeline and ledger."""

    config: SchedulingConfig
    now: float
    placer: Placer
    timeline: Timeline
    ledger: Ledger
    ranking: Ranking
    node_order: dict[str, int]
    preemptions: list[Preemption] = field(default_factory=list)
    usage: dict[str, Usage] = field(default_factory=dict)  # running task -> what it holds
    ends: dict[str, float | None] = field(default_factory=dict)  # running task -> expected end
    stopping: set[str] = field(default_factory=set)  # asked to stop (before or in this pass): capacity coming back
    stopping_nodes: set[str] = field(default_factory=set)
    victims: dict[str, list[RunningTask]] = field(default_factory=dict)  # node -> preemptible running tasks
    no_victims: set[object] = field(default_factory=set)
    victims_memo: dict[tuple[str, object, int], tuple[int, _Victims | None]] = field(default_factory=dict)
    stopping_memo: dict[tuple[str, object, float], tuple[int, bool]] = field(default_factory=dict)
    members: dict[str, list[RunningTask]] = field(default_factory=dict)  # running gang -> its members
    units: dict[str, RunningTask] = field(default_factory=dict)  # running gang -> it as one victim (all members)

    @property
    def fair(self) -> bool:
        return self.config.ordering is Ordering.FAIR

    def add_running(self, run: RunningTask, usage: Usage, end: float | None) -> None:
        self.usage[run.id], self.ends[run.id] = usage, end
        if run.preempting:
            self.stopping.add(run.id)
            self.stopping_nodes.add(run.node_id)
            if run.gang is not None:
                self.stopping.add(run.gang)  # its gang is being stopped: not a victim again
        elif run.preemptible and run.gang is not None:
            self._add_member(run, end)
        elif run.preemptible:
            self.victims.setdefault(run.node_id, []).append(run)

    def _add_member(self, run: RunningTask, end: float | None) -> None:
        """Fold a gang member into its gang's unit: held amounts add up, the earliest start
        (the most work lost) and the latest end stand for all."""
        gang_id = str(run.gang)
        unit = self.units.get(gang_id)
        nodes = {m.node_id for m in self.members.get(gang_id, ())}
        self.members.setdefault(gang_id, []).append(run)
        if unit is None:
            unit = self.units[gang_id] = replace(run, id=gang_id)
            self.ends[gang_id] = end
        else:
            unit.gpu_indices += run.gpu_indices
            unit.cpu_milli += run.cpu_milli
            unit.memory_mb += run.memory_mb
            unit.started_at = min(unit.started_at, run.started_at)
            unit.checkpoint_at = (None if unit.checkpoint_at is None or run.checkpoint_at is None
                                  else min(unit.checkpoint_at, run.checkpoint_at))
            last = self.ends[gang_id]
            self.ends[gang_id] = None if last is None or end is None else max(last, end)
        if run.node_id not in nodes:
            self.victims.setdefault(run.node_id, []).append(unit)

    def tasks_of(self, run: RunningTask) -> list[RunningTask]:
        """The running tasks stopping ``run`` stops: a gang's members, else itself."""
        return self.members.get(run.id, [run]) if run.gang is not None else [run]

    def ids_of(self, victims: list[tuple[RunningTask, str]]) -> set[str]:
        return {t.id for r, _ in victims for t in self.tasks_of(r)}

    def cost(self, victims: list[tuple[RunningTask, str]]) -> tuple[float, float, float]:
        """Tasks stopped, GPUs stopped, GPU-seconds of work lost (a gang: all its members)."""
        tasks = [t for r, _ in victims for t in self.tasks_of(r)]
        return (len(tasks), sum(t.gpus for t in tasks), sum(t.gpus * t.work_at_risk(self.now) for t in tasks))

    def stop(self, task_id: str, victims: list[tuple[RunningTask, str]], last: str) -> list[str]:
        """Count ``victims`` as stopping now (capacity back now, out of their tenants' usage) and
        record them as ``task_id``'s preemptions, one per node (``last``'s node last: preempt.lua
        notes the node of its last call as the one the preemptor waits for). Returns those nodes."""
        per_node: dict[str, list[str]] = {}
        for run, _ in victims:
            self.stopping.add(run.id)
            self.ledger.remove(run.tenant, held(run))
            for t in self.tasks_of(run):
                self.stopping.add(t.id)
                self.timeline.release_now(t.node_id, t.id, self.usage[t.id])
                per_node.setdefault(t.node_id, []).append(t.id)
        self.stopping_nodes.update(per_node)
        self.ranking.reorder = True
        why = "; ".join(dict.fromkeys(reason for _, reason in victims))
        for node_id in sorted(per_node, key=lambda n: (n == last, self.node_order[n])):
            self.preemptions.append(Preemption(task_id, node_id, tuple(per_node[node_id]), why))
        return list(per_node)

    def hold(self, task: TaskRequest, node_id: str, duration: float) -> None:
        """Keep what ``task`` needs on ``node_id`` from now, counting capacity that is stopping."""
        end = self.now + self.config.preempt_grace_s + duration
        gpus = self._spare_free(node_id, task, self.timeline.window(node_id, self.now, end))
        if gpus is not None:
            self.timeline.hold(Hold(node_id, self.now, end, Usage.of(task, self.placer.nodes[node_id], gpus)))

    def _spare_free(self, node_id: str, task: TaskRequest, state: NodeFree) -> list[int] | None:
        """GPUs to hold from now: whole GPUs that are busy now (stopping, overdue) before free ones,
        so that lower-ranked tasks keep what is free now."""
        gpus = state.gpus_for(task)
        if gpus is None or not task.whole_gpus:
            return gpus
        free = self.placer.nodes[node_id]
        return sorted(state.whole_indices(), key=lambda i: (free.gpu_is_whole(i), i))[: task.whole_gpus]

    def preempt(self, task: TaskRequest, duration: float) -> Cause | None:
        """Stop the fewest running tasks on one node that make ``task`` fit; None if none can."""
        end = self.now + self.config.preempt_grace_s + duration
        for node_id in sorted(self.stopping_nodes, key=self.node_order.__getitem__):
            memo = (node_id, task.shape, duration if node_id in self.timeline.later else 0)
            cached = self.stopping_memo.get(memo)
            if cached is None or cached[0] != self.timeline.version[node_id]:
                fits = (self.placer.nodes[node_id].matches(task)
                        and self.timeline.window(node_id, self.now, end).gpus_for(task) is not None)
                cached = self.stopping_memo[memo] = (self.timeline.version[node_id], fits)
            if cached[1]:
                self.hold(task, node_id, duration)  # what is stopping there is enough: preempt no more
                return Cause("stopping", node_id)
        reclaim = self.fair and self.ledger.within_guarantee(task.tenant, demand(task))
        # The runtime matters only for srtf and where a hold starts later (preemptors' holds start now).
        timed = self.config.ordering is Ordering.SRTF
        key = (task.shape, task.priority, task.tenant if self.fair else "",
               duration if timed or self.timeline.later else 0, reclaim)
        if not self.victims or key in self.no_victims:
            return None
        epoch = self.ledger.epoch if self.fair else 0  # under fair, who borrows changes as usage does
        best: tuple[tuple[float, ...], str, list[tuple[RunningTask, str]], list[int]] | None = None
        for node_id, running in self.victims.items():
            node = self.placer.nodes[node_id]
            if len(node.free_milli) < task.whole_gpus or not node.matches(task):
                continue
            # A node's answer holds until something changes there.
            memo_key = (node_id, (*key[:3], duration if timed or node_id in self.timeline.later else 0, reclaim),
                        epoch)
            answer = self.victims_memo.get(memo_key)
            if answer is None or answer[0] != self.timeline.version[node_id]:
                answer = (self.timeline.version[node_id], self._victims_on(node_id, task, end, running, reclaim))
                self.victims_memo[memo_key] = answer
            found = answer[1]
            if found is not None:
                chosen, gpus = found
                rank = (*self.cost(chosen), self.node_order[node_id])
                if best is None or rank < best[0]:
                    best = (rank, node_id, chosen, gpus)
        if best is None:
            self.no_victims.add(key)
            return None
        _, node_id, chosen, gpus = best
        self.stop(task.id, chosen, node_id)
        self.ledger.add(task.tenant, demand(task))
        state = self.timeline.window(node_id, self.now, end)
        gpus = self._spare_free(node_id, task, state) or gpus
        self.timeline.hold(Hold(node_id, self.now, end, Usage.of(task, self.placer.nodes[node_id], gpus)))
        return Cause("preempting", node_id, victims=int(self.cost(chosen)[0]))

    def _victims_on(self, node_id: str, task: TaskRequest, end: float, running: list[RunningTask],
                    reclaim: bool) -> _Victims | None:
        """Greedy (borrowers, then lowest priority, then least work lost) until ``task`` fits,
        then drop every victim it fits without."""
        eligible = self.eligible(task, running, reclaim)
        if not eligible or self._fits_with(node_id, task, end, eligible) is None:
            return None  # not even with all of them
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

    def eligible(self, task: TaskRequest, running: list[RunningTask], reclaim: bool) -> list[tuple[RunningTask, str]]:
        """The victims ``task`` may stop among ``running``, with why, in greedy order: borrowers,
        then lowest priority, then least work lost."""
        now = self.now
        found = [(r, why) for r in running if r.id not in self.stopping and (why := self.may_preempt(task, r, reclaim))]
        found.sort(key=lambda e: (not self.ledger.is_borrower(e[0].tenant), e[0].priority,
                                  e[0].work_at_risk(now), -e[0].started_at))
        return found

    def _fits_with(self, node_id: str, task: TaskRequest, end: float,
                   victims: list[tuple[RunningTask, str]]) -> list[int] | None:
        return self.timeline.window(node_id, self.now, end, self.ids_of(victims)).gpus_for(task)

    def may_preempt(self, task: TaskRequest, run: RunningTask, reclaim: bool) -> str:
        """Why ``run`` may be stopped for ``task`` ("" if it may not)."""
        config = self.config
        if not run.preemptible or self.now - run.started_at < config.min_runtime_s:
            return ""
        if config.max_preemptions is not None and run.preemptions >= config.max_preemptions:
            return ""
        if self.fair and run.tenant != task.tenant:
            if reclaim and self.ledger.is_borrower(run.tenant):
                return f"reclaim: tenant {task.tenant} under its guarantee, {run.tenant} borrowing"
            return ""
        if run.priority < task.priority or (config.preempt_equal_priority and run.priority == task.priority):
            return f"priority {task.priority} > {run.priority}" if run.priority < task.priority else "equal priority"
        duration, end = self.ranking.duration[task.id], self.ends.get(run.id)
        if (config.ordering is Ordering.SRTF and run.priority <= task.priority and duration < INF and end is not None
                and end - self.now > config.srtf_factor * duration):
            return f"srtf: {end - self.now:.0f}s left > {config.srtf_factor:g} x {duration:.0f}s"
        return ""
