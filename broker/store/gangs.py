"""Gangs in Redis (issue 13): one job of ``replicas`` members, stored, reserved and read as one.

**Records.** A gang is one task hash under its own id, in the pending queue as one entry, with
a request that carries its shape (``k``, ``sp``, ``sl``: request_records) and, besides the
fields of any task, ``member_req`` (what one member asks for), ``replicas`` and ``message:<r>``:
member r's Celery message, task id ``<id>:m<r>`` (Celery's own envelope for the gang's call,
with that id; ``root_id`` stays the gang's, so Flower shows every member's attempt under it).
reserve_gang.lua commits a whole placement in one call: the gang goes RESERVED and each member
becomes a task record of its own (``<id>:m<r>``, RESERVED on its node, with ``gang``, ``rank``,
``world``, ``local_rank``, ``local_world``, ``node_rank``, ``master_node`` and ``master_port``)
whose message is on its node's queue. From there a member is fenced, started and finished
as any task (start.lua, finish.lua), and releases its own capacity. An elastic gang (``mk`` in
its request: ``min_replicas``) is reserved with as many members as the planner granted, from
``mk`` to ``replicas``; the gang's record keeps that count as ``granted`` while it is reserved
(``attempt_members``), and each member's ``world`` is it.

**One fate** (settle_gang.lua, each dispatcher cycle, for each gang in ``P gangs``): once a
member ends other than SUCCEEDED (a member is never requeued alone: _release.lua ends it
FAILED), every other member is stopped, and once all are final the gang is requeued whole (one
retry) or FAILED; all SUCCEEDED: the gang SUCCEEDED with rank 0's result. Cancelling the gang
(``Client.cancel``) cancels its record and every live member.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, cast

import redis

from broker.errors import InvalidRequest, Unsatisfiable
from broker.models import MemberView, NodeView, SubmitRequest, TaskState, TaskStatus
from broker.scheduling.gang_preemption import WAITS
from broker.scheduling.model import GangPlacement, Preemption, TaskRequest
from broker.store.codes import GangReserveCode, SettleCode, SubmitCode
from broker.store.keys import PoolKeys
from broker.store.records import encode_request, gpu_kind_of, gpus_arg, parse_gpus, task_status
from broker.store.scripts import Scripts

MEMBER = ":m"  # member r of gang g is the task g:m<r>


def member_id(gang_id: str, rank: int) -> str:
    return f"{gang_id}{MEMBER}{rank}"


def member_message(stored: str, member: str) -> str:
    """The gang's stored Celery message as member ``member``'s: the member's id in the headers and
    the correlation id, nothing else changed (the properties still close the document)."""
    envelope = json.loads(stored)
    envelope["headers"]["id"] = member
    envelope["properties"]["correlation_id"] = member
    return json.dumps(envelope, separators=(",", ":"), allow_nan=False)


def check_gang(req: SubmitRequest, nodes: list[NodeView]) -> None:
    """Refuse a gang no registered nodes could ever hold all at once (an elastic one: its
    ``min_replicas``), or one with timers (a gang's timers are not built yet). ``nodes``: those
    up that run its task name."""
    if req.not_before is not None or req.expires_at is not None:
        raise InvalidRequest({"replicas": "a gang (replicas > 1) takes no countdown, eta or expires yet; "
                                          "submit it when it should start"})
    if not nodes:
        return
    r = req.resources
    rooms: dict[str, int] = {}  # by the same_label value the nodes share ("" without same_label)
    for n in nodes:
        if req.same_label and req.same_label not in n.labels:
            continue
        per_gpu = len(n.gpus) // r.whole_gpus if r.whole_gpus else (len(n.gpus) if r.gpu_milli else n.slots)
        per_cpu = int(n.cpus * 1000 // r.cpu_milli) if r.cpu_milli else n.slots
        fits = min(per_gpu, per_cpu, n.slots, n.memory_mb // r.memory_mb if r.memory_mb else n.slots)
        value = n.labels[req.same_label] if req.same_label else ""
        rooms[value] = rooms.get(value, 0) + (min(fits, 1) if req.spread else fits)
    room = max(rooms.values(), default=0)
    least = req.min_replicas or req.replicas
    if room < least:
        where = f" sharing one value of label {req.same_label!r}" if req.same_label else ""
        each = " (one per node: spread)" if req.spread else ""
        field = "min_replicas" if req.min_replicas else "replicas"
        raise Unsatisfiable({field: f"{least} members of {r.gpus:g} GPUs each cannot all fit: the "
                                    f"registered nodes{where} hold at most {room}{each}"})


def submit_gang(scripts: Scripts, task_id: str, req: SubmitRequest, message: str,
                result_ttl_ms: int = 0) -> tuple[SubmitCode, str]:
    """Store a validated gang and its members' messages (submit_gang.lua); the code and the id it
    is known by (an idempotency key already taken names that task)."""
    k, key = scripts.keys, req.idempotency_key
    messages = [member_message(message, member_id(task_id, rank)) for rank in range(req.replicas)]
    code, existing, *why = scripts.call(
        "submit_gang",
        [k.task(task_id), k.pending, k.requests, k.idempotency(key) if key else k.task(task_id), k.seq, k.wake,
         k.mix],
        [task_id, key or "", req.priority, scripts.clock(), encode_request(req), encode_request(req, member=True),
         req.task_name, req.tenant, req.max_retries, gpu_kind_of(req.resources), result_ttl_ms, *messages])
    if code == SubmitCode.BAD_REQUEST:
        text = existing.decode() if isinstance(existing, bytes) else str(existing)
        raise InvalidRequest({text: f"refused by submit_gang.lua, nothing was written: {why[0]!r}"})
    return SubmitCode(code), existing.decode() if isinstance(existing, bytes) else str(existing)


def singles(tasks: Iterator[TaskRequest], gangs_seen: list[str]) -> Iterator[TaskRequest]:
    """The dispatcher's lazy planner's tasks, up to the first gang (all members or none) or elastic
    task (the planner grants it an amount), which is noted in ``gangs_seen`` and left to the full
    planner with everything behind it: a lazy pass that went on past it would hand its capacity
    to later, lower-priority tasks."""
    for task in tasks:
        if task.replicas > 1 or task.min_gpus or task.min_replicas:  # attributes only: this runs per task
            gangs_seen.append(task.id)
            return
        yield task


def note_waits(client: redis.Redis, keys: PoolKeys, preemptions: Iterable[Preemption]) -> None:
    """Record every node a preemptor with victims on several nodes (a gang, or a task that stopped
    a gang) waits on, its own last (``gang_preemption.WAITS``): preempt.lua notes one node per
    call, the last, and a gang's members must be held on all of them while the victims stop."""
    nodes: dict[str, list[str]] = {}
    for p in preemptions:
        nodes.setdefault(p.task_id, []).append(p.node_id)
    waits = {task_id: WAITS.join(dict.fromkeys(where)) for task_id, where in nodes.items() if len(set(where)) > 1}
    if waits:
        client.hset(keys.preempting, mapping=waits)  # type: ignore[arg-type]


def reserve_gang(scripts: Scripts, gang: GangPlacement) -> tuple[GangReserveCode, int]:
    """Commit every member of ``gang`` or none (reserve_gang.lua); the code and the first member
    refused (-1: the gang itself). An elastic gang's placement has as many members as granted."""
    k = scripts.keys
    keys = [k.pending, k.requests, k.leases, k.changes, k.tasks, k.task(gang.task_id), k.gangs]
    args: list[Any] = [scripts.clock(), gang.task_id]
    for rank, p in enumerate(gang.members):
        keys += (k.task(member_id(gang.task_id, rank)), k.node(p.node_id), k.node_tasks(p.node_id),
                 k.queue(p.node_id))
        args += (p.node_id, gpus_arg(p.gpu_indices))
    code, rank = scripts.call("reserve_gang", keys, args)
    return GangReserveCode(code), int(rank)


_FIELDS = ("state", "node", "gpus", "error")


def attempt_members(h: Mapping[bytes, bytes]) -> int:
    """How many members a gang's record says its attempt has: those granted while it is reserved
    (an elastic gang's grant), else all it asks for."""
    return int(h.get(b"granted") or h[b"replicas"])


def members_of(client: redis.Redis, keys: PoolKeys, gang_id: str, replicas: int) -> list[MemberView]:
    """Each member's rank, node, GPU indices and state (PENDING while the gang waits)."""
    pipe = client.pipeline(transaction=False)
    for rank in range(replicas):
        pipe.hmget(keys.task(member_id(gang_id, rank)), *_FIELDS)
    out = []
    for rank, (state, node, gpus, error) in enumerate(cast(list[list[bytes | None]], pipe.execute())):
        out.append(MemberView(rank=rank, state=TaskState(state.decode()) if state else TaskState.PENDING,
                              node=node.decode() if node else None, gpus=parse_gpus(gpus.decode() if gpus else None),
                              error=error.decode(errors="replace") if error else None))
    return out


def overall(gang_state: TaskState, members: list[MemberView]) -> TaskState:
    """The gang's state as users read it: its record's, except that a reserved gang whose members
    all succeeded has SUCCEEDED, and one with a member started (or ending) is RUNNING. A member
    that failed does not fail the gang here: settle_gang.lua decides (requeue, or FAILED)."""
    if gang_state is not TaskState.RESERVED:
        return gang_state
    states = {m.state for m in members}
    if states == {TaskState.SUCCEEDED}:
        return TaskState.SUCCEEDED
    return TaskState.RESERVED if states <= {TaskState.RESERVED} else TaskState.RUNNING


def gang_status(client: redis.Redis, keys: PoolKeys, gang_id: str, h: Mapping[bytes, bytes],
                waiting: Mapping[str, Any] | None) -> TaskStatus:
    """``task_status`` of a gang's record, with its members and the state and result they make."""
    status = task_status(gang_id, h, waiting)
    replicas = int(h[b"replicas"])
    last = h.get(b"last_error")  # why the last attempt ended: why this one runs (or waits)
    retry_reason = last.decode(errors="replace") if last and not status.state.is_final else None
    if status.state is TaskState.PENDING:  # waiting (again): the last attempt's member records are history
        return status.model_copy(update={"members": [MemberView(rank=r, state=TaskState.PENDING)
                                                     for r in range(replicas)], "retry_reason": retry_reason})
    members = members_of(client, keys, gang_id, attempt_members(h))
    state = overall(status.state, members)
    update: dict[str, Any] = {"members": members, "state": state,
                              "retry_reason": None if state.is_final else retry_reason}
    if state is not status.state and state.is_final:
        first = cast(dict[bytes, bytes], client.hgetall(keys.task(member_id(gang_id, 0))))
        rank0 = task_status(member_id(gang_id, 0), first, None)
        update.update(result=rank0.result, finished_at=rank0.finished_at, started_at=rank0.started_at)
    return status.model_copy(update=update)


def live_members(client: redis.Redis, keys: PoolKeys, gang_id: str) -> list[str]:
    """The ids of a gang's members that are not final (none for a single task): what cancelling
    the gang must cancel too."""
    h = cast(dict[bytes, bytes], client.hgetall(keys.task(gang_id)))
    if b"replicas" not in h:
        return []
    return [member_id(gang_id, m.rank) for m in members_of(client, keys, gang_id, attempt_members(h))
            if m.node is not None and not m.state.is_final]


def as_record(client: redis.Redis, keys: PoolKeys, gang_id: str, h: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """A gang's record as Celery's result backend reads a task's: while it runs or once it has
    succeeded, rank 0's record (its result is the gang's) with the gang's overall state."""
    if b"replicas" not in h or h[b"state"] == b"PENDING":
        return h
    members = members_of(client, keys, gang_id, attempt_members(h))
    state = overall(TaskState(h[b"state"].decode()), members)
    if state is TaskState.RESERVED:
        return h
    if state is not TaskState.RUNNING and state is not TaskState.SUCCEEDED:
        return h  # FAILED or CANCELLED: the gang's own record says why
    record = cast(dict[bytes, bytes], client.hgetall(keys.task(member_id(gang_id, 0))))
    return {**record, b"id": gang_id.encode(), b"state": state.value.encode()} if record else h


def settle_all(scripts: Scripts, grace_ms: int, ids: list[str] | None = None) -> dict[str, SettleCode]:
    """One fate for every reserved gang (settle_gang.lua each): what it did, by gang id. ``ids``:
    the reserved gangs, when the caller has read them (``timers.upkeep``)."""
    k, client = scripts.keys, scripts.redis
    if ids is None:
        ids = sorted(g.decode() for g in cast(set[bytes], client.smembers(k.gangs)))
    if not ids:
        return {}
    pipe = client.pipeline(transaction=False)
    for gang_id in ids:
        pipe.hmget(k.task(gang_id), "granted", "replicas")
    counts = cast(list[list[bytes | None]], pipe.execute())
    return {gang_id: settle(scripts, gang_id, int(granted or replicas or 0), grace_ms)
            for gang_id, (granted, replicas) in zip(ids, counts, strict=True)}


def settle(scripts: Scripts, gang_id: str, replicas: int, grace_ms: int) -> SettleCode:
    """settle_gang.lua for one gang whose attempt has ``replicas`` members (its grant)."""
    k = scripts.keys
    members = [k.task(member_id(gang_id, rank)) for rank in range(replicas)]
    (code,) = scripts.call("settle_gang", [k.task(gang_id), k.gangs, k.pending, k.requests, k.wake, k.prefix,
                                           *members], [gang_id, scripts.clock(), grace_ms])
    return SettleCode(code)
