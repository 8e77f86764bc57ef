"""A Hypothesis state machine drives random sequences of the Lua transitions against a real Redis.

Each step is one script call, as a worker, a dispatcher or a client would make it
(register, re-register, heartbeat, submit, reserve, start, finish, cancel, reap), or
the clock moving past leases. After every step the pool's invariants are read back
from Redis (``tests/invariants.py``): one state per task with matching membership;
free + held = capacity per node and GPU index; no reservation without a live task;
every RESERVED task's message on its node's queue (or taken by its worker); attempts
and retries never going back; final states staying final; no task vanishing. Each
call's return code is also checked against what the script's header promises for
the state it was called in.
"""

from __future__ import annotations

import json
from collections import Counter

import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from broker.dispatcher import Dispatcher
from broker.message import build_message
from broker.models import Resources, SubmitRequest
from broker.scheduling.model import GangPlacement, Placement
from broker.scheduling.ordering import queue_order
from broker.scheduling.placement.best_fit import plan
from broker.settings import Settings
from broker.store import gangs, reads
from broker.store.keys import PoolKeys
from broker.store.scripts import (
    CancelCode,
    FinishCode,
    GangReserveCode,
    HeartbeatCode,
    RegisterCode,
    ReserveCode,
    Scripts,
    StartCode,
    SubmitCode,
)
from tests.conftest import Clock
from tests.invariants import (
    FINAL_STATES,
    LIVE_STATES,
    MAX_PAYLOAD,
    PROBE,
    Progress,
    all_tasks,
    assert_pool_invariants,
    assert_progress,
    node_hash,
    node_task_ids,
    progress_of,
    submit_raw,
    task_hash,
)

NODE_IDS = ("n0", "n1", "n2")
LEASE_MS = 10_000
NODE_LABELS = ({}, {"gpu": "a100"}, {"gpu": "h100"}, {"gpu": "a100", "zone": "z1"})
TASK_LABELS = ({}, {}, {"gpu": "a100"}, {"gpu": "h100"}, {"zone": "z1"})
IDEMPOTENCY_KEYS = ("job-a", "job-b")

# Members small enough that most clusters drawn hold a gang of them (else gangs only ever wait).
GANG_MEMBERS = (Resources(gpus=1), Resources(gpus=0.25), Resources(cpus=0.5))
Shape = tuple[int, int, int, int, int]  # gpus, gpu_mem (MiB), cpu (milli), RAM (MiB), slots


@st.composite
def node_shapes(draw: st.DrawFn) -> Shape:
    gpus = draw(st.sampled_from([0, 1, 2, 4]))
    gpu_mem = draw(st.sampled_from([16_384, 40_960])) if gpus else 0
    return (gpus, gpu_mem, draw(st.sampled_from([1000, 4000, 8000])), draw(st.sampled_from([2048, 16_384])),
            draw(st.integers(1, 4)))


def task_resources() -> st.SearchStrategy[Resources]:
    labels = st.sampled_from(TASK_LABELS)
    cpus = st.sampled_from([0.0, 0.5, 1.0, 2.0])
    memory = st.sampled_from([0, 512, 4096])
    whole = st.builds(Resources, gpus=st.sampled_from([1.0, 2.0, 3.0]),
                      gpu_memory_mb=st.sampled_from([None, 16_384, 30_000]), cpus=cpus, memory_mb=memory,
                      labels=labels, min_gpus=st.sampled_from([None, None, 1]))  # 1: elastic (issue 13)
    share = st.builds(Resources, gpus=st.sampled_from([0.1, 0.25, 0.5, 0.75]),
                      gpu_memory_mb=st.sampled_from([None, 4096, 20_000]), cpus=cpus, memory_mb=memory,
                      labels=labels)
    cpu_only = st.builds(Resources, cpus=st.sampled_from([0.5, 1.0, 4.0]), memory_mb=memory, labels=labels)
    return st.one_of(whole, share, cpu_only)


# ---- what each script's header promises, given the state it was called in -------------


def expected_start(t: dict[str, str], node_id: str, tag: str) -> StartCode:
    if not t:
        return StartCode.NOT_FOUND
    if t["state"] == "CANCELLED":
        return StartCode.CANCELLED
    if t.get("tag") != tag or t.get("node") != node_id:
        return StartCode.STALE
    if t["state"] == "RUNNING":
        return StartCode.ALREADY_RUNNING
    return StartCode.OK if t["state"] == "RESERVED" else StartCode.STALE


def expected_finish(t: dict[str, str], node_id: str, tag: str, outcome: str) -> tuple[FinishCode, str]:
    if not t:
        return FinishCode.NOT_FOUND, ""
    if t.get("tag") != tag or t.get("node") != node_id or t["state"] not in LIVE_STATES:
        return FinishCode.STALE, t["state"]
    if outcome not in ("succeeded", "failed", "lost"):
        return FinishCode.BAD_OUTCOME, t["state"]
    if "cancel_at" in t and outcome != "succeeded":  # being cancelled: it ends CANCELLED
        return FinishCode.OK, "CANCELLED"
    if outcome == "lost":
        retries_left = int(t["retries"]) + 1 <= int(t["max_retries"])
        return FinishCode.OK, "PENDING" if retries_left else "FAILED"
    return FinishCode.OK, "SUCCEEDED" if outcome == "succeeded" else "FAILED"


def expected_cancel(t: dict[str, str], node_id: str | None) -> tuple[CancelCode, str]:
    if not t:
        return CancelCode.NOT_FOUND, ""
    if t["state"] in FINAL_STATES:
        return CancelCode.ALREADY_FINAL, t["state"]
    if t["state"] == "RUNNING":  # marked: its worker stops it, finish.lua ends it
        return CancelCode.STOPPING, t["node"]
    if t["state"] != "PENDING" and t["node"] != (node_id or ""):
        return CancelCode.MOVED, t["node"]
    return CancelCode.CANCELLED, t["state"]


def reserve_gate(t: dict[str, str], node: dict[str, str], lease: float | None, now: int,
                 indices: tuple[int, ...]) -> ReserveCode | None:
    """The code reserve.lua must give before it looks at labels and capacity; None if it gets that far."""
    if t.get("state") != "PENDING":
        return ReserveCode.NOT_PENDING
    if node.get("state") != "up" or lease is None or lease < now:
        return ReserveCode.NODE_DOWN
    request = json.loads(t["req"])
    wanted = 1 if request["m"] else request["g"]
    least = request.get("mg", wanted)  # an elastic request: any grant from min_gpus to gpus
    gpus = int(node["cap_gpus"])
    if not least <= len(indices) <= wanted or len(set(indices)) != len(indices) or not all(0 <= i < gpus
                                                                                          for i in indices):
        return ReserveCode.BAD_PLACEMENT
    return None


class BrokerMachine(RuleBasedStateMachine):
    """Random transitions on one pool; ``taken`` is what the simulated workers popped and still hold."""

    def __init__(self, client: redis.Redis, seen: Counter[str]) -> None:
        super().__init__()
        self.seen = seen
        client.flushdb()
        self.redis = client
        self.keys = PoolKeys("sm")
        self.clock = Clock()
        self.scripts = Scripts(client, self.keys, self.clock)
        self.dispatcher = Dispatcher(Settings(pool="sm", commit_batch=2, dispatch_window=50), self.clock, client)
        self.incarnations: dict[str, str] = {}
        self.shapes: dict[str, Shape] = {}
        self.task_ids: list[str] = []
        self.gang_ids: list[str] = []
        self.idempotent: dict[str, str] = {}
        self.taken: set[tuple[str, str]] = set()
        self.progress: Progress = {}
        self.serial = 0

    def _fresh(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}-{self.serial}"

    def _task(self, task_id: str) -> dict[str, str]:
        return task_hash(self.redis, self.keys, task_id)

    @initialize(shapes=st.lists(node_shapes(), min_size=1, max_size=len(NODE_IDS)),
                labels=st.sampled_from(NODE_LABELS), tasks=st.lists(task_resources(), max_size=6))
    def cluster(self, shapes: list[Shape], labels: dict[str, str], tasks: list[Resources]) -> None:
        """Most runs start with nodes and work, so that short step sequences get somewhere."""
        for node_id, shape in zip(NODE_IDS, shapes, strict=False):
            self.register(node_id, shape, labels, True)
        for resources in tasks:
            self.submit([resources], 0, 1, None)

    # ---- nodes ------------------------------------------------------------------------

    @rule(node_id=st.sampled_from(NODE_IDS), shape=node_shapes(), labels=st.sampled_from(NODE_LABELS),
          new_incarnation=st.booleans())
    def register(self, node_id: str, shape: Shape, labels: dict[str, str], new_incarnation: bool) -> None:
        known = node_id in self.incarnations
        incarnation = self._fresh("inc") if new_incarnation or not known else self.incarnations[node_id]
        held = node_task_ids(self.redis, self.keys, node_id)
        code, reclaimed = self.scripts.register(node_id, incarnation, LEASE_MS, *shape, labels)
        if not known:
            assert (code, reclaimed) == (RegisterCode.CREATED, 0)
        elif incarnation != self.incarnations[node_id]:
            assert (code, reclaimed) == (RegisterCode.REPLACED, len(held))
            self.taken = {(n, tag) for n, tag in self.taken if n != node_id}  # that worker process is gone
        else:
            expected = RegisterCode.REFRESHED if shape == self.shapes[node_id] else RegisterCode.SHAPE_CHANGED
            assert (code, reclaimed) == (expected, 0)
        if code in (RegisterCode.CREATED, RegisterCode.REPLACED):
            self.incarnations[node_id], self.shapes[node_id] = incarnation, shape
        self.seen[code.name] += 1

    @precondition(lambda self: self.incarnations)
    @rule(data=st.data())
    def reregister_same_process(self, data: st.DataObject) -> None:
        """The agent's reconnect, or its answer to REAPED: same incarnation, same shape."""
        node_id = data.draw(st.sampled_from(sorted(self.incarnations)))
        held = node_task_ids(self.redis, self.keys, node_id)
        code, reclaimed = self.scripts.register(node_id, self.incarnations[node_id], LEASE_MS,
                                                *self.shapes[node_id], {})
        assert (code, reclaimed) == (RegisterCode.REFRESHED, 0)
        self.seen[code.name] += 1
        assert node_task_ids(self.redis, self.keys, node_id) == held, "a reconnect keeps the reservations"

    @rule(node_id=st.sampled_from(NODE_IDS), stale=st.booleans())
    def heartbeat(self, node_id: str, stale: bool) -> None:
        incarnation = "inc-stale" if stale else self.incarnations.get(node_id, "inc-none")
        node = node_hash(self.redis, self.keys, node_id)
        code = self.scripts.heartbeat(node_id, incarnation, LEASE_MS)
        if not node:
            assert code is HeartbeatCode.NOT_REGISTERED
        elif node["incarnation"] != incarnation:
            assert code is HeartbeatCode.FENCED
        else:
            assert code is (HeartbeatCode.OK if node["state"] == "up" else HeartbeatCode.REAPED)

    @rule(seconds=st.sampled_from([0.5, 3, 9, 11, 25]))
    def advance_clock(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def reap(self) -> None:
        now = self.clock()
        expired = {n.decode() for n, lease in self.redis.zrange(self.keys.leases, 0, -1, withscores=True)
                   if lease < now}
        reaped = self.scripts.reap()
        assert sorted(reaped) == sorted(expired)
        self.seen["reaped"] += len(reaped)
        for node_id in reaped:
            assert node_hash(self.redis, self.keys, node_id)["state"] == "down"
            assert not node_task_ids(self.redis, self.keys, node_id)
            assert self.redis.llen(self.keys.queue(node_id)) == 0

    # ---- tasks ------------------------------------------------------------------------

    @rule(batch=st.lists(task_resources(), min_size=1, max_size=3), priority=st.integers(-2, 2),
          max_retries=st.integers(0, 2), idempotency_key=st.one_of(st.none(), st.sampled_from(IDEMPOTENCY_KEYS)))
    def submit(self, batch: list[Resources], priority: int, max_retries: int, idempotency_key: str | None) -> None:
        for resources in batch:
            task_id = f"t{len(self.task_ids)}"
            code, existing = submit_raw(self.scripts, task_id, resources=resources, priority=priority,
                                        max_retries=max_retries, idempotency_key=idempotency_key)
            if idempotency_key in self.idempotent:
                assert (code, existing) == (SubmitCode.DUPLICATE, self.idempotent[idempotency_key])
                continue
            assert (code, existing) == (SubmitCode.CREATED, task_id)
            self.task_ids.append(task_id)
            if idempotency_key:
                self.idempotent[idempotency_key] = task_id

    @rule(window=st.integers(1, 12))
    def reserve_planned(self, window: int) -> None:
        """What the dispatcher proposes from a fresh snapshot, reserve.lua must accept whole."""
        nodes = reads.read_free(self.redis, self.keys, self.clock())
        singles = [t for t in reads.pending_requests(self.redis, self.keys, window) if t.replicas == 1]
        placements = plan(queue_order(singles), nodes)
        codes = self.scripts.reserve(placements)
        assert codes == [ReserveCode.OK] * len(placements), list(zip(placements, codes, strict=True))
        self.seen["placed"] += len(codes)

    @rule()
    def dispatcher_cycle(self) -> None:
        report = self.dispatcher.run_cycle()
        assert not report.refused, report
        self.seen["reaped"] += len(report.reaped)
        self.seen["placed"] += report.placed

    @rule(split=st.integers(1, 3))
    def racing_dispatchers(self, split: int) -> None:
        """Two dispatchers plan from one snapshot; the second commits after the first."""
        nodes = reads.read_free(self.redis, self.keys, self.clock())
        tasks = queue_order([t for t in reads.pending_requests(self.redis, self.keys, 50) if t.replicas == 1])
        first, second = plan(tasks[::split], nodes), plan(tasks, nodes)
        assert self.scripts.reserve(first) == [ReserveCode.OK] * len(first)
        self._reserve_checked(second)

    @precondition(lambda self: self.task_ids)
    @rule(data=st.data(), count=st.integers(1, 4))
    def reserve_random(self, data: st.DataObject, count: int) -> None:
        """Placements no policy would propose: wrong nodes, indices out of range, repeats, non-pending tasks."""
        placements = [Placement(data.draw(st.sampled_from(self.task_ids), label="task"),
                                data.draw(st.sampled_from((*NODE_IDS, "ghost")), label="node"),
                                tuple(data.draw(st.lists(st.integers(-1, 4), max_size=3), label="gpus")))
                      for _ in range(count)]
        self._reserve_checked(placements)

    def _reserve_checked(self, placements: list[Placement]) -> None:
        now = self.clock()
        before = {p.task_id: self._task(p.task_id) for p in placements}
        nodes = {p.node_id: node_hash(self.redis, self.keys, p.node_id) for p in placements}
        leases = {p.node_id: self.redis.zscore(self.keys.leases, p.node_id) for p in placements}
        codes = self.scripts.reserve(placements)
        placed: set[str] = set()
        for p, code in zip(placements, codes, strict=True):
            t = {**before[p.task_id], "state": "RESERVED"} if p.task_id in placed else before[p.task_id]
            gate = reserve_gate(t, nodes[p.node_id], leases[p.node_id], now, p.gpu_indices)
            if gate is not None:
                assert code is gate, (p, code, gate)
            if code is ReserveCode.OK:
                placed.add(p.task_id)
                self.seen["placed"] += 1
                after = self._task(p.task_id)
                assert (after["state"], after["node"], after["gpus"]) == (
                    "RESERVED", p.node_id, ",".join(map(str, p.gpu_indices))), after
        for task_id, t in before.items():
            if task_id not in placed:
                assert self._task(task_id) == t, f"refused placement changed task {task_id}"

    def _busy_node(self, data: st.DataObject) -> str:
        """A node with messages queued, if any (an idle worker's step would do nothing)."""
        busy = [n for n in NODE_IDS if self.redis.llen(self.keys.queue(n))]
        return data.draw(st.sampled_from(busy or NODE_IDS), label="node")

    @rule(data=st.data(), start=st.booleans())
    def worker_takes_message(self, data: st.DataObject, start: bool) -> None:
        """The node's worker pops the next message (kombu takes the list's tail); with ``start`` it
        passes the fence at once, else a later step does (a reap may come in between)."""
        node_id = self._busy_node(data)
        raw = self.redis.rpop(self.keys.queue(node_id))
        if raw is None:
            return
        tag = json.loads(raw)["properties"]["delivery_tag"]
        self.taken.add((node_id, tag))
        if start and self._start(tag.rpartition(".")[0], node_id, tag) is not StartCode.OK:
            self.taken.discard((node_id, tag))

    @rule(data=st.data(),
          outcomes=st.lists(st.sampled_from(["succeeded", "failed", "lost"]), min_size=1, max_size=4))
    def worker_runs_next(self, data: st.DataObject, outcomes: list[str]) -> None:
        """A worker's life for a while: take each message, pass the fence (stale ones are dropped
        there), run, report; until it ran one task per drawn outcome or its queue is empty."""
        node_id = self._busy_node(data)
        while outcomes and (raw := self.redis.rpop(self.keys.queue(node_id))) is not None:
            tag = json.loads(raw)["properties"]["delivery_tag"]
            task_id = tag.rpartition(".")[0]
            if self._start(task_id, node_id, tag) is StartCode.OK:
                self._finish(task_id, node_id, tag, outcomes.pop())

    @precondition(lambda self: self.taken)
    @rule(data=st.data())
    def worker_starts_taken(self, data: st.DataObject) -> None:
        node_id, tag = data.draw(st.sampled_from(sorted(self.taken)))
        code = self._start(tag.rpartition(".")[0], node_id, tag)
        if code is not StartCode.OK:
            self.taken.discard((node_id, tag))  # fenced: the worker acks and drops it

    @precondition(lambda self: self.task_ids)
    @rule(data=st.data(), which=st.sampled_from(["older", "newer", "other node"]))
    def start_fenced(self, data: st.DataObject, which: str) -> None:
        """A redelivered or misrouted message: an older or newer attempt, or the right tag elsewhere."""
        task_id = data.draw(st.sampled_from(self.task_ids))
        t = self._task(task_id)
        attempts, node_id = int(t["attempts"]), t.get("node", "n0")
        if which == "other node":
            node_id = data.draw(st.sampled_from([n for n in NODE_IDS if n != t.get("node")]))
        tag = f"{task_id}.{attempts + {'older': -1, 'newer': 1}.get(which, 0)}"
        assert self._start(task_id, node_id, tag) is not StartCode.OK

    def _start(self, task_id: str, node_id: str, tag: str) -> StartCode:
        expected = expected_start(self._task(task_id), node_id, tag)
        code, gpus = self.scripts.start(task_id, node_id, tag)
        assert code is expected, (task_id, node_id, tag, code, expected)
        if code is StartCode.OK:
            assert gpus == self._task(task_id)["gpus"]
            self.seen["RUNNING"] += 1
        return code

    @precondition(lambda self: self.taken)
    @rule(data=st.data(), outcome=st.sampled_from(["succeeded", "failed", "lost"]))
    def worker_finishes_taken(self, data: st.DataObject, outcome: str) -> None:
        node_id, tag = data.draw(st.sampled_from(sorted(self.taken)))
        self.taken.discard((node_id, tag))
        self._finish(tag.rpartition(".")[0], node_id, tag, outcome)

    @precondition(lambda self: self.task_ids)
    @rule(data=st.data(), outcome=st.sampled_from(["succeeded", "failed", "lost", "exploded"]),
          which=st.sampled_from(["current", "older", "other node"]))
    def finish_reported(self, data: st.DataObject, outcome: str, which: str) -> None:
        """A report from the worker's parent process (the child is gone), or a late or stray one."""
        live = [task_id for task_id, (task_state, *_) in self.progress.items() if task_state in LIVE_STATES]
        task_id = data.draw(st.sampled_from(live or self.task_ids))
        t = self._task(task_id)
        node_id, attempts = t.get("node", "n0"), int(t["attempts"])
        if which == "other node":
            node_id = data.draw(st.sampled_from([n for n in NODE_IDS if n != t.get("node")]))
        tag = f"{task_id}.{attempts - 1 if which == 'older' else attempts}"
        self._finish(task_id, node_id, tag, outcome)

    def _finish(self, task_id: str, node_id: str, tag: str, outcome: str) -> None:
        before = self._task(task_id)
        expected = expected_finish(before, node_id, tag, outcome)
        result = self.scripts.finish(task_id, node_id, tag, outcome, json.dumps({"outcome": outcome}))
        assert result == expected, (task_id, node_id, tag, outcome, result, expected)
        if result[0] is not FinishCode.OK:
            assert self._task(task_id) == before, "a refused finish changed the task"

    @precondition(lambda self: self.task_ids)
    @rule(data=st.data(), wrong_node=st.booleans())
    def cancel(self, data: st.DataObject, wrong_node: bool) -> None:
        task_id = data.draw(st.sampled_from(self.task_ids))
        t = self._task(task_id)
        node_id = t.get("node")  # what Client.cancel passes
        if wrong_node:
            node_id = data.draw(st.sampled_from([None, *[n for n in NODE_IDS if n != node_id]]))
        expected = expected_cancel(t, node_id)
        assert self.scripts.cancel(task_id, node_id) == expected
        if expected[0] not in (CancelCode.CANCELLED, CancelCode.STOPPING):
            assert self._task(task_id) == t, "a refused cancel changed the task"

    # ---- gangs (issue 13): members are tasks of their own once placed --------------------

    @rule(replicas=st.integers(2, 3), resources=st.one_of(st.sampled_from(GANG_MEMBERS), task_resources()),
          spread=st.booleans(), max_retries=st.integers(0, 1), min_replicas=st.sampled_from([None, None, 1, 2]))
    def submit_gang(self, replicas: int, resources: Resources, spread: bool, max_retries: int,
                    min_replicas: int | None) -> None:
        gang_id = f"g{len(self.gang_ids)}"
        resources = resources.model_copy(update={"min_gpus": None})  # a gang's members take fixed GPUs
        req = SubmitRequest(task_name=PROBE, resources=resources, replicas=replicas, spread=spread,
                            max_retries=max_retries, min_replicas=min_replicas)
        message = build_message(gang_id, PROBE, [], {}, MAX_PAYLOAD)
        assert gangs.submit_gang(self.scripts, gang_id, req, message) == (SubmitCode.CREATED, gang_id)
        self.gang_ids.append(gang_id)

    @precondition(lambda self: self.gang_ids)
    @rule(data=st.data())
    def reserve_gang_random(self, data: st.DataObject) -> None:
        """Placements no planner would propose: a refusal must change nothing at all."""
        gang_id = data.draw(st.sampled_from(self.gang_ids), label="gang")
        replicas = int(self._task(gang_id)["replicas"])
        count = data.draw(st.sampled_from([replicas, replicas, replicas - 1]), label="members")
        members = tuple(Placement(gang_id, data.draw(st.sampled_from((*NODE_IDS, "ghost")), label="node"),
                                  tuple(data.draw(st.lists(st.integers(-1, 4), max_size=2), label="gpus")))
                        for _ in range(count))
        before = all_tasks(self.redis, self.keys)
        free = {n: node_hash(self.redis, self.keys, n) for n in NODE_IDS}
        code, _rank = gangs.reserve_gang(self.scripts, GangPlacement(gang_id, members))
        if code is GangReserveCode.OK:
            self.seen["gang reserved"] += 1
            assert int(self._task(gang_id)["granted"]) == count  # an elastic gang: fewer than replicas
            assert {self._task(f"{gang_id}:m{r}")["state"] for r in range(count)} == {"RESERVED"}
        else:
            assert all_tasks(self.redis, self.keys) == before, f"refused gang placement ({code.name}) changed tasks"
            assert {n: node_hash(self.redis, self.keys, n) for n in NODE_IDS} == free

    @rule()
    def settle_gangs(self) -> None:
        for code in gangs.settle_all(self.scripts, 1000).values():
            self.seen[f"gang {code.name}"] += 1

    @precondition(lambda self: self.gang_ids)
    @rule(data=st.data())
    def cancel_gang(self, data: st.DataObject) -> None:
        """As Client.cancel: the gang's record, then each live member where it is held."""
        gang_id = data.draw(st.sampled_from(self.gang_ids))
        code, _ = self.scripts.cancel(gang_id, self._task(gang_id).get("node"))
        assert code in (CancelCode.CANCELLED, CancelCode.ALREADY_FINAL), code
        for member in gangs.live_members(self.redis, self.keys, gang_id):
            self.scripts.cancel(member, None if self._task(member)["state"] == "RUNNING" else
                                self._task(member)["node"])

    # ---- after every step ---------------------------------------------------------------

    @invariant()
    def pool_invariants(self) -> None:
        every = assert_pool_invariants(self.redis, self.keys, self.taken)
        members = {task_id for task_id, t in every.items() if "gang" in t}
        assert {t["gang"] for t in (every[m] for m in members)} <= set(self.gang_ids), "a member of no gang"
        # A member's record is made afresh for each attempt of its gang: its progress is the gang's.
        tasks = {task_id: t for task_id, t in every.items() if task_id not in members}
        assert sorted(tasks) == sorted(self.task_ids + self.gang_ids), "a task appeared or vanished"
        progress = progress_of(tasks)
        assert_progress(self.progress, progress)
        for task_id, (task_state, _attempts, _retries) in progress.items():
            self.seen[task_state] += 1
            if task_id in self.gang_ids:
                self.seen[f"gang {task_state}"] += 1
            if task_state == "PENDING" and int(tasks[task_id]["attempts"]) > 0:
                self.seen["requeued"] += 1
        self.progress = progress


SETTINGS = settings(max_examples=35, stateful_step_count=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def test_random_transitions_keep_every_invariant(redis_client: redis.Redis) -> None:
    seen: Counter[str] = Counter()
    run_state_machine_as_test(lambda: BrokerMachine(redis_client, seen), settings=SETTINGS)
    # A machine that never gets anywhere would pass too: every state and path must have been reached.
    # (SUCCEEDED and FAILED each go missing in a few percent of runs; both at once, never seen.)
    wanted = {"PENDING", "RESERVED", "RUNNING", "CANCELLED", "requeued", "reaped", "REPLACED", "REFRESHED",
              "SHAPE_CHANGED", "placed"}
    assert wanted <= set(seen), f"never reached {wanted - set(seen)}: {seen}"
    assert seen["SUCCEEDED"] + seen["FAILED"], f"no task ever finished: {seen}"
    # Gangs were submitted and went through the same invariants. Whether the dispatcher reserves
    # one within a run is not reliable since the scan gate and free index merged (seen missing in a
    # clean clone's run, issue 13's note): tests/e2e/test_gangs.py and test_lua_gang.py cover it.
    assert seen["gang PENDING"], seen
