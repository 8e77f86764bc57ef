"""Trace-driven simulation through the real dispatcher and the real Lua scripts.

Only execution is simulated. Jobs are submitted through submit.lua, placed by the real
``Dispatcher.run_cycle`` (policy, planner, reserve.lua, preempt.lua), started through
start.lua and ended through finish.lua, on a real redis-server, under a virtual clock that
every component reads (``now`` in every script). A simulated worker starts each task the
moment it is reserved and finishes it ``duration_s`` later; nothing else is modelled.

The event loop: take the next instant with events, end the tasks due then (capacity first),
submit the arrivals, then run dispatcher cycles while anything is pending, as wake-ups
would: again at once when a cycle filled its window or stopped victims of preemption. An order
that moves with time alone where the head blocks or holds (``orders_by_time``) is re-planned
``reap_interval_s`` after each change, as the live dispatcher's idle wake-ups do, then at
doubling intervals while nothing changes (a month-long trace would be millions of cycles).
Stopped victims end at once (finish.lua requeues them uncharged) and resume from their last
checkpoint (``TraceJob.checkpoint_interval_s``; none: from scratch). No cycle runs when idle.
"""

from __future__ import annotations

import heapq
import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from broker.cycle import CycleReport
from broker.dispatcher import Dispatcher
from broker.errors import InvalidRequest
from broker.message import MessageTemplates
from broker.models import MILLI, SubmitRequest
from broker.scheduling.config import SchedulingConfig
from broker.scheduling.model import Placement
from broker.scheduling.shortfall import shortfall
from broker.settings import Settings
from broker.sim.gangs import GangBook, GangPlanner, gang_shape
from broker.sim.localcluster import private_redis
from broker.sim.results import EPOCH_MS, Batch, JobOutcome, Series, SimResult, SimulationError, VirtualClock
from broker.sim.static import static_problems
from broker.sim.traces import ClusterNode, TraceJob
from broker.store import reads
from broker.store.keys import PoolKeys
from broker.store.records import StoredRequest, gpus_arg
from broker.store.scripts import CancelCode, FinishCode, Scripts, StartCode, SubmitCode

LEASE_MS = 100 * 365 * 86_400_000  # simulated workers never heartbeat: their leases outlive any trace

Progress = Callable[[int, int, float], None]  # (events done, events expected, virtual seconds)


@dataclass(slots=True)
class _Running:
    index: int  # into the job list
    node: str
    tag: str
    gpus: tuple[int, ...]
    started_s: float = 0.0


class Simulator:
    """One run of one trace on one cluster under one scheduling configuration."""

    def __init__(self, jobs: Sequence[TraceJob], nodes: Sequence[ClusterNode], redis_url: str,
                 scheduling: SchedulingConfig | None = None, estimates: str = "learned", label: str = "",
                 settings: Settings | None = None, gangs: bool = True) -> None:
        """``gangs=False``: refuse jobs larger than any node (capacity planning leaves them out)."""
        if estimates not in ("true", "learned"):
            raise InvalidRequest({"estimates": f"{estimates!r} is not 'true' or 'learned'"})
        if not nodes:
            raise InvalidRequest({"cluster": "has no nodes"})
        self.jobs = sorted(jobs, key=lambda j: j.submit_s)
        self.nodes = list(nodes)
        self.true_estimates = estimates == "true"
        self.clock = VirtualClock()
        base = settings or Settings()
        self.settings = Settings(**{**base.model_dump(), "redis_url": redis_url,
                                    "pool": f"sim-{uuid.uuid4().hex[:12]}",
                                    "scheduling": scheduling or base.scheduling})
        self.label = label or self.settings.scheduling.ordering.value
        self.keys = PoolKeys(self.settings.pool)
        self.redis = redis.Redis.from_url(redis_url)
        self.scripts = Scripts(self.redis, self.keys, self.clock)
        self.messages = MessageTemplates(self.settings.max_payload_bytes)
        self._stops: list[tuple[str, str]] = []
        # No queue view (nobody reads reasons here); the lazy planner's full passes stay as live.
        self.dispatcher = Dispatcher(self.settings, clock=self.clock, client=self.redis, explain=False,
                                     stopper=lambda task_id, node_id: self._stops.append((task_id, node_id)))
        self.outcomes = [JobOutcome(job) for job in self.jobs]
        # Jobs larger than any node replay as gangs of whole nodes (broker.sim.gangs).
        self._gang_shapes = {i: shape for i, job in enumerate(self.jobs)
                             if gangs and (shape := gang_shape(job, self.nodes))}
        self.gangs = GangBook()
        if self._gang_shapes:  # the lazy spine places task by task: gangs need the full planner
            self.dispatcher.lazy = False
            self.dispatcher.planner = GangPlanner(self.dispatcher.planner, self.gangs)
        self.series = Series()
        self.placements: list[tuple[str, str, tuple[int, ...], float]] = []
        self._task_index: dict[str, int] = {}
        self._running: dict[str, _Running] = {}  # task id -> its current attempt
        self._finishes: list[tuple[int, int, str, str]] = []  # heap of (due ms, seq, task id, tag)
        self._holders: dict[tuple[str, int], int] = {}  # (node, GPU) -> tasks holding a share of it
        self._allocated_milli = 0
        self._pending = 0
        self._cycles = self._events = self._seq = self._handoffs = 0
        self._requests: dict[tuple[Any, ...], tuple[SubmitRequest, StoredRequest] | str] = {}
        self._dispatcher_s = 0.0
        self._phase_s: dict[str, float] = {}

    # ---- the run --------------------------------------------------------------------------

    def run(self, progress: Progress | None = None) -> SimResult:
        started = time.perf_counter()
        logging.getLogger("broker.dispatcher").setLevel(logging.WARNING)  # a line per cycle is too many here
        try:
            self._register_nodes()
            self._loop(progress)
            self._check_pending()
        finally:
            self._drop_pool()
            self.redis.close()
        return self._result(started)

    def run_batches(self, ends: Sequence[int]) -> tuple[SimResult, list[Batch]]:
        """Static packing (the FGD protocol), one cycle per batch: see ``broker.sim.static``."""
        problems = static_problems(self.settings.scheduling, self.jobs, ends, bool(self._gang_shapes))
        if problems:
            raise InvalidRequest(problems)
        started = time.perf_counter()
        logging.getLogger("broker.dispatcher").setLevel(logging.WARNING)
        batches = []
        try:
            self._register_nodes()
            for index in range(len(self.jobs)):
                self._submit(index)
            first = 0
            for end in ends:
                ids = {task_id for task_id, index in self._task_index.items() if first <= index < end}
                placed = self._place_batch(ids) if ids else set()
                for task_id in ids - placed:
                    code, state_was = self.scripts.cancel(task_id, None)
                    if code is not CancelCode.CANCELLED:
                        raise SimulationError(f"cancel.lua did not drop pending task {task_id} ({code.name}, "
                                              f"{state_was})")
                    self._pending -= 1
                self._sample()
                batches.append(Batch(end - first, len(placed), end - first - len(placed),
                                     self._allocated_milli / MILLI))
                first = end
            self._check_pending()
        finally:
            self._drop_pool()
            self.redis.close()
        return self._result(started), batches

    def _place_batch(self, ids: set[str]) -> set[str]:
        """One cycle over exactly the batch ``ids`` (the head of the queue); the ids it placed."""
        # No queue view: best fit's lazy planner would otherwise run a full pass over the
        # explain_limit tasks at the head, which may reach past the batch.
        scheduling = self.settings.scheduling.model_copy(update={"explain_limit": 0})
        settings = self.settings.model_copy(update={"dispatch_window": len(ids), "scheduling": scheduling})
        report = self._cycle(Dispatcher(settings, clock=self.clock, client=self.redis))
        placed = {p.task_id for p in report.placed_tasks}
        if placed - ids or report.refused:
            raise SimulationError(f"the batch's cycle placed {len(placed - ids)} tasks outside the batch and had "
                                  f"{dict(report.refused)} refused by reserve.lua")
        self._start(report.placed_tasks, set())
        return placed

    def _check_pending(self) -> None:
        queued = self.redis.zcard(self.keys.pending)
        if queued != self._pending:  # nothing lost, nothing counted twice
            raise SimulationError(f"{queued} tasks are pending in Redis; the simulation counted {self._pending}")

    def _result(self, started: float) -> SimResult:
        return SimResult(self.label, self.settings.scheduling.model_dump(mode="json"), len(self.nodes),
                         sum(n.gpus for n in self.nodes), self.outcomes, self.series, self.placements, self._cycles,
                         self._events, time.perf_counter() - started, self._dispatcher_s, self._phase_s,
                         self._handoffs)

    def _register_nodes(self) -> None:
        for n in self.nodes:
            self.scripts.register(n.id, "sim", LEASE_MS, n.gpus, n.gpu_memory_mb, round(n.cpus * MILLI), n.memory_mb,
                                  n.slots, n.labels)
        self._views = reads.read_nodes(self.redis, self.keys)

    def _loop(self, progress: Progress | None) -> None:
        arrivals, next_arrival, heap = self.jobs, 0, self._finishes
        expected = len(arrivals) + sum(1 for j in arrivals if j.duration_s is not None)
        arrival_ms = [EPOCH_MS + round(j.submit_s * 1000) for j in arrivals]
        shown, replan_ms = 0.0, round(self.settings.reap_interval_s * 1000)
        wait_ms = replan_ms
        while next_arrival < len(arrivals) or heap:
            due = [arrival_ms[next_arrival]] if next_arrival < len(arrivals) else []
            if self._pending and self.settings.scheduling.orders_by_time:
                due.append(self.clock.now_ms + wait_ms)  # a wake-up with no event: the order moved
            now = min([*due, heap[0][0]]) if heap else min(due)
            self.clock.now_ms, mark = now, (self._events, len(self.placements))
            while heap and heap[0][0] == now:
                _due, _seq, task_id, tag = heapq.heappop(heap)
                self._finish(task_id, tag)
            while next_arrival < len(arrivals) and arrival_ms[next_arrival] == now:
                self._submit(next_arrival)
                next_arrival += 1
            if self._pending:
                self._dispatch()
            # Wake-ups that change nothing come twice as far apart each time (at most an hour).
            wait_ms = replan_ms if (self._events, len(self.placements)) != mark else min(2 * wait_ms, 3_600_000)
            self._sample()
            if progress is not None and time.perf_counter() - shown > 0.2:
                shown = time.perf_counter()
                progress(self._events, expected, self.clock.seconds)
        if progress is not None:
            progress(self._events, expected, self.clock.seconds)

    # ---- what clients and workers would do ---------------------------------------------------

    def _submit(self, index: int) -> None:
        """Client.submit, less what a simulation cannot use: the Celery task-sent event (no
        Flower), and a read of every node per submit (the cluster is fixed, so each request
        shape is checked once against it, and each distinct request validated once)."""
        job = self.jobs[index]
        self._events += 1
        shape = self._gang_shapes.get(index)
        if shape is not None:
            self.outcomes[index].members = shape.replicas
            job = shape.member
        estimate = job.duration_s if self.true_estimates and job.duration_s else None
        key = (job.name, job.gpus, job.gpu_memory_mb, job.cpus, job.memory_mb, tuple(sorted(job.labels.items())),
               job.priority, job.tenant, job.preemptible, estimate, shape is not None)
        request = self._requests.get(key)
        if request is None:
            request = self._requests[key] = self._request(job, estimate, member=shape is not None)
        if isinstance(request, str):
            self.outcomes[index].rejected = request
            return
        req, stored = request
        task_id = f"{job.id}-{uuid.uuid4().hex[:8]}"
        ids = [task_id] if shape is None else [f"{task_id}-m{rank}" for rank in range(shape.replicas)]
        if shape is not None:
            self.gangs.add(task_id, ids)
        for member_id in ids:
            self._task_index[member_id] = index
            code, _ = self.scripts.submit(member_id, req, self.messages(member_id, req.task_name), stored)
            if code is not SubmitCode.CREATED:
                raise SimulationError(f"submit.lua refused job {job.id} ({code.name})")
            self._pending += 1

    def _request(self, job: TraceJob, estimate: float | None, member: bool = False
                 ) -> tuple[SubmitRequest, StoredRequest] | str:
        """The validated request and what is stored of it; or why no node could ever run it."""
        resources = job.resources()
        if short := shortfall(resources, self._views):
            return "; ".join(f"{k}: {v}" for k, v in short.items())
        preemptible = False if member else job.preemptible  # a gang's member may not be stopped alone
        req = SubmitRequest(task_name=job.name, resources=resources, priority=job.priority, tenant=job.tenant,
                            estimated_runtime_s=estimate, preemptible=preemptible)
        return req, StoredRequest.of(req)

    def _milli(self, index: int) -> int:
        """GPU capacity one task of job ``index`` holds: a gang member holds its own part."""
        return (shape.member if (shape := self._gang_shapes.get(index)) else self.jobs[index]).gpu_milli

    def _dispatch(self) -> None:
        while True:
            report = self._cycle(self.dispatcher)
            dropped = self._start(report.placed_tasks, set(report.preempted))
            stopped = self._stop_victims()
            # As the wake-ups of preempt.lua and finish.lua would: victims' capacity is free now.
            if not (stopped or dropped) and not (report.window_full and report.placed):
                return

    def _cycle(self, dispatcher: Dispatcher) -> CycleReport:
        began = time.perf_counter()
        report = dispatcher.run_cycle()
        self._dispatcher_s += time.perf_counter() - began
        self._cycles += 1
        for phase, seconds in report.seconds.items():
            self._phase_s[phase] = self._phase_s.get(phase, 0.0) + seconds
        self._pending -= report.placed
        return report

    def _start(self, placed: list[Placement], preempted: set[str]) -> int:
        """The simulated workers: take each message off its node queue and start the task.

        A task reserved and then preempted in the same cycle (preempt.lua requeues a task
        that has not started) is refused by start.lua, and its message dropped, as a live
        worker would. Returns how many were so dropped."""
        if not placed:
            return 0
        self.gangs.check_placed(placed)
        node_ids = sorted({p.node_id for p in placed})
        pipe = self.redis.pipeline(transaction=False)
        for node_id in node_ids:
            pipe.lrange(self.keys.queue(node_id), 0, -1)
            pipe.delete(self.keys.queue(node_id))
        queued = pipe.execute()[::2]
        tags = {}
        for node_id, messages in zip(node_ids, queued, strict=True):
            for raw in messages:
                message = json.loads(raw)
                tags[message["headers"]["id"]] = (node_id, message["properties"]["delivery_tag"])
        now_s, dropped = self.clock.seconds, 0
        for p in placed:
            node_id, tag = tags.pop(p.task_id, ("", ""))
            if node_id != p.node_id:
                raise SimulationError(f"task {p.task_id} was reserved on {p.node_id} but its message is on "
                                      f"{node_id or 'no queue'}")
            code, gpus = self.scripts.start(p.task_id, p.node_id, tag)
            if code is StartCode.STALE and p.task_id in preempted:
                self._pending += 1
                dropped += 1
                continue
            if code is not StartCode.OK or gpus != gpus_arg(p.gpu_indices):
                raise SimulationError(f"start.lua refused task {p.task_id} on {p.node_id} ({code.name}, {gpus!r})")
            index = self._task_index[p.task_id]
            job, outcome = self.jobs[index], self.outcomes[index]
            if outcome.started_s is None:
                outcome.started_s = now_s
            outcome.node, outcome.gpus, outcome.order = p.node_id, p.gpu_indices, len(self.placements)
            self.placements.append((job.id, p.node_id, p.gpu_indices, now_s))
            self._running[p.task_id] = _Running(index, p.node_id, tag, p.gpu_indices, now_s)
            self._hold(p.node_id, p.gpu_indices, self._milli(index), +1)
            if job.duration_s is not None:
                self._seq += 1
                left = job.duration_s - outcome.saved_s
                heapq.heappush(self._finishes, (self.clock.now_ms + round(left * 1000), self._seq, p.task_id, tag))
        if tags:
            raise SimulationError(f"messages without a reservation this cycle: {sorted(tags)[:5]}")
        return dropped

    def _finish(self, task_id: str, tag: str) -> None:
        run = self._running.get(task_id)
        if run is None or run.tag != tag:
            return  # that attempt was stopped for preemption
        self._events += 1
        code, after, head = self.scripts.end(task_id, run.node, tag, "succeeded", "null")
        if code is not FinishCode.OK or after != "SUCCEEDED":
            raise SimulationError(f"finish.lua refused task {task_id} ({code.name}, {after})")
        self.outcomes[run.index].finished_s = self.clock.seconds
        self._release(task_id, run)
        if head:  # its place passed to the head of the queue (setting handoff): the same node and GPUs
            self._pending -= 1
            self._handoffs += 1
            self._start([Placement(head, run.node, run.gpus)], set())

    def _stop_victims(self) -> int:
        """End, now, the running tasks the dispatcher asked to stop: finish.lua requeues a
        preempted task without charging a retry."""
        stopped = 0
        for task_id, node_id in self._stops:
            run = self._running.get(task_id)
            if run is None or run.node != node_id:
                continue
            code, after = self.scripts.finish(task_id, node_id, run.tag, "failed", "preempted")
            if code is not FinishCode.OK or after != "PENDING":
                raise SimulationError(f"finish.lua did not requeue preempted task {task_id} ({code.name}, {after})")
            stopped += 1
            self._requeued(task_id, run)
        self._stops.clear()
        return stopped

    def _requeued(self, task_id: str, run: _Running) -> None:
        self.outcomes[run.index].stopped(self.clock.seconds - run.started_s, self.jobs[run.index].checkpoint_interval_s)
        self._pending += 1
        self._release(task_id, run)

    def _release(self, task_id: str, run: _Running) -> None:
        del self._running[task_id]
        self._hold(run.node, run.gpus, self._milli(run.index), -1)

    def _hold(self, node_id: str, gpus: tuple[int, ...], milli: int, sign: int) -> None:
        self._allocated_milli += sign * milli
        holders = self._holders
        for g in gpus:
            holders[(node_id, g)] = holders.get((node_id, g), 0) + sign
            if holders[(node_id, g)] == 0:
                del holders[(node_id, g)]

    def _sample(self) -> None:
        s = self.series
        s.t_s.append(self.clock.seconds)
        s.allocated_gpus.append(self._allocated_milli / MILLI)
        s.occupied_gpus.append(len(self._holders))
        s.pending.append(self._pending)
        s.running.append(len(self._running))

    def _drop_pool(self) -> None:
        """Delete the pool's keys: runs share a server, and a finished run's tasks are not needed."""
        batch: list[bytes] = []
        for key in self.redis.scan_iter(match=self.keys.prefix + "*", count=5000):
            batch.append(key)
            if len(batch) >= 5000:
                self.redis.unlink(*batch)
                batch.clear()
        if batch:
            self.redis.unlink(*batch)


def simulate(jobs: Sequence[TraceJob], nodes: Sequence[ClusterNode], scheduling: SchedulingConfig | None = None,
             *, redis_url: str | None = None, estimates: str = "learned", label: str = "",
             progress: Progress | None = None, settings: Settings | None = None, gangs: bool = True) -> SimResult:
    """Run ``jobs`` on ``nodes``; on a private redis-server unless ``redis_url`` is given (the
    run uses a fresh pool there and deletes it afterwards)."""
    if redis_url is None:
        with private_redis() as url:
            return Simulator(jobs, nodes, url, scheduling, estimates, label, settings, gangs).run(progress)
    return Simulator(jobs, nodes, redis_url, scheduling, estimates, label, settings, gangs).run(progress)
