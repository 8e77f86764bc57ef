"""Read-only views of a pool's state in Redis, shared by the client, CLI and dispatcher."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any, cast

import redis

from broker.keys import PoolKeys
from broker.models import MILLI, GpuView, NodeView, QueueEntry, Resources
from broker.policy import NodeFree, RunningTask, Snapshot, TaskRequest
from broker.scripts import encode_command


def _s(value: bytes | None) -> str:
    return value.decode() if value is not None else ""


def _i(value: bytes | None) -> int:
    return int(value) if value is not None else 0


def resources_from_wire(wire: dict[str, Any]) -> Resources:
    gpus = wire["g"] if wire["g"] else wire["m"] / MILLI
    return Resources(gpus=float(gpus), gpu_memory_mb=wire["gm"] or None, cpus=wire["c"] / MILLI,
                     memory_mb=wire["r"], labels=wire["l"])


def node_from_hash(node_id: str, h: dict[bytes, bytes], lease: float | None, tasks: int) -> NodeView:
    labels = {k[6:].decode(): v.decode() for k, v in h.items() if k.startswith(b"label:")}
    count, memory = _i(h.get(b"cap_gpus")), _i(h.get(b"gpu_mem"))
    gpus = [GpuView(index=i, memory_mb=memory, free_milli=_i(h.get(f"g{i}_milli".encode())),
                    free_memory_mb=_i(h.get(f"g{i}_mem".encode()))) for i in range(count)]
    return NodeView(
        id=node_id, state=_s(h.get(b"state")) or "unknown",
        lease_expires_at=lease / 1000 if lease is not None else None,
        gpus=gpus, gpu_memory_mb=memory, cpus=_i(h.get(b"cap_cpu_m")) / MILLI,
        memory_mb=_i(h.get(b"cap_mem")), slots=_i(h.get(b"cap_slots")), labels=labels,
        free_cpus=_i(h.get(b"free_cpu_m")) / MILLI, free_memory_mb=_i(h.get(b"free_mem")),
        free_slots=_i(h.get(b"free_slots")), tasks=tasks,
    )


def read_nodes(client: redis.Redis, keys: PoolKeys) -> list[NodeView]:
    ids = sorted(_s(n) for n in cast(set[bytes], client.smembers(keys.nodes)))
    pipe = client.pipeline(transaction=False)
    for node_id in ids:
        pipe.hgetall(keys.node(node_id))
        pipe.zscore(keys.leases, node_id)
        pipe.scard(keys.node_tasks(node_id))
    replies = pipe.execute()
    return [node_from_hash(node_id, replies[3 * i], replies[3 * i + 1], replies[3 * i + 2])
            for i, node_id in enumerate(ids) if replies[3 * i]]


_Pending = list[tuple[str, int, dict[str, Any]]]  # (task id, rank, request wire)


def read_pending(client: redis.Redis, keys: PoolKeys, limit: int) -> _Pending:
    """The first ``limit`` pending tasks in dispatch order: (id, rank, request wire).

    The pending score orders by priority, then submit sequence, so the rank stands in for
    both (reading the scores back as floats cost more than the rest of the read). Tasks of
    one shape share their request text, so each distinct text is parsed once; the returned
    dicts may be shared and must not be mutated."""
    head = cast(list[bytes], client.zrange(keys.pending, 0, limit - 1))
    return _with_requests(head, cast(list[bytes | None], client.hmget(keys.requests, head)) if head else [], 0)


def _with_requests(head: list[bytes], wires: list[bytes | None], first_rank: int) -> _Pending:
    parsed: dict[bytes, dict[str, Any]] = {}
    out = []
    for rank, (task_id, wire) in enumerate(zip(head, wires, strict=True), first_rank):
        if wire is None:  # placed or cancelled between the two reads
            continue
        request = parsed.get(wire)
        if request is None:
            request = parsed[wire] = json.loads(wire)
        out.append((task_id.decode(), rank, request))
    return out


# The same for every task of one request text.
_RequestShape = tuple[tuple[Any, ...], tuple[Any, ...]]  # TaskRequest's fields before seq (less id), after seq


_new_request = cast(Any, TaskRequest)  # called with the fields spread from a tuple
_REQUEST_FIELDS = tuple(f.name for f in fields(TaskRequest))


def _requests(pending: _Pending) -> list[TaskRequest]:
    shapes: dict[int, _RequestShape] = {}  # id of a shared request dict -> its shape
    out = []
    for task_id, rank, wire in pending:
        shape = shapes.get(id(wire))
        if shape is None:
            request = TaskRequest.from_wire("", wire)
            values = tuple(getattr(request, name) for name in _REQUEST_FIELDS)  # astuple would deep-copy
            shape = shapes[id(wire)] = (values[1:8], values[9:])
        out.append(_new_request(task_id, *shape[0], rank, *shape[1]))
    return out


def pending_requests(client: redis.Redis, keys: PoolKeys, limit: int) -> list[TaskRequest]:
    """``read_pending`` as the policy sees it; ``seq`` is the rank in the pending queue."""
    return _requests(read_pending(client, keys, limit))


class PendingHead:
    """The first ``limit`` pending tasks in dispatch order, read only as far as the planner gets.

    The first ``first`` tasks (the cycle's free slots: no more can be placed) are read at
    once, in the snapshot; more, in doubling chunks, only when the planner asks for them
    because tasks at the head fit nowhere. A chunk starts after the score of the last task
    read, not at a rank: the dispatcher's own commits remove tasks from the head meanwhile."""

    def __init__(self, client: redis.Redis, keys: PoolKeys, limit: int, first: int) -> None:
        self._client, self._keys, self.limit = client, keys, limit
        self._size = max(1, min(first, limit))
        self.read, self._after = 0, cast(float | None, None)  # _after: where the next chunk starts
        self._head = self._read(self._size, None)

    @property
    def window_full(self) -> bool:
        """The whole window was read: more may be pending behind it."""
        return self.read >= self.limit

    PIECE = 256  # tasks turned into TaskRequests at a time, as the planner gets to them

    def chunks(self) -> Iterator[list[TaskRequest]]:
        """Consecutive runs of the head, in dispatch order. The runs are short so that the
        planner's first batch does not wait for a whole chunk's TaskRequests to be built."""
        pending, size = self._head, self._size
        while True:
            for first in range(0, len(pending), self.PIECE):
                yield _requests(pending[first:first + self.PIECE])
            if self._after is None or self.read >= self.limit:
                return
            size = min(2 * size, self.limit - self.read)
            pending = self._read(size, self._after)

    def _read(self, size: int, after: float | None) -> _Pending:
        """``size`` ids from the head (or scored above ``after``), their requests, and the last one's score."""
        if after is None:
            head = cast(list[bytes], self._client.zrange(self._keys.pending, 0, size - 1))
        else:
            head = cast(list[bytes], self._client.zrange(self._keys.pending, f"({after!r}", "+inf",
                                                         byscore=True, offset=0, num=size))
        self._after = None
        if not head:
            return []
        wires, last_score = _raw_pipeline(self._client, [
            encode_command(b"HMGET", self._keys.requests.encode(), *head),
            encode_command(b"ZSCORE", self._keys.pending.encode(), head[-1])])
        # A short read is the end of the queue; a last task gone meanwhile (placed by another
        # dispatcher) leaves no score to go on from, so the rest waits for the next cycle.
        if len(head) == size and last_score is not None:
            self._after = float(last_score)
        first_rank, self.read = self.read, self.read + len(head)
        return _with_requests(head, wires, first_rank)


def waiting_info(client: redis.Redis, keys: PoolKeys, task_ids: list[str]) -> list[dict[str, Any] | None]:
    """What the dispatcher's last full pass said of each task: position, reason, eta (or None)."""
    if not task_ids:
        return []
    raw = cast(list[bytes | None], client.hmget(keys.queueinfo, task_ids))
    return [json.loads(r) if r is not None else None for r in raw]


def queue_entries(client: redis.Redis, keys: PoolKeys, limit: int) -> list[QueueEntry]:
    """Pending tasks in the order the dispatcher's policy ranked them on its last full pass
    (with its reason and estimated start); tasks it has not ranked yet follow in queue order."""
    pending = read_pending(client, keys, limit)
    pipe = client.pipeline(transaction=False)
    for task_id, _seq, _wire in pending:
        pipe.hget(keys.task(task_id), "submitted_at")
    submitted = pipe.execute()
    info = waiting_info(client, keys, [task_id for task_id, _seq, _wire in pending])
    rows = sorted(zip(pending, submitted, info, strict=True),
                  key=lambda row: (0, row[2]["position"]) if row[2] else (1, row[0][1]))
    return [
        QueueEntry(position=pos, id=task_id, name=wire["n"], tenant=wire["t"], priority=wire["p"],
                   resources=resources_from_wire(wire), submitted_at=_i(at) / 1000,
                   estimated_runtime_s=wire.get("e"), reason=why["reason"] if why else None,
                   estimated_start_at=why["eta"] if why else None)
        for pos, ((task_id, _seq, wire), at, why) in enumerate(rows, start=1)
    ]


def _raw_pipeline(client: redis.Redis, commands: list[bytes]) -> list[Any]:
    """Send encoded ``commands`` in one write and read their replies as parsed off the wire.

    For a thousand small reads, redis-py's Pipeline bookkeeping (per-command options,
    response callbacks, encoding each argument) costs more than the replies themselves."""
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        conn.send_packed_command([b"".join(commands)])
        return [conn.read_response() for _ in commands]
    except BaseException:  # a reply may be half read: the connection is unusable
        conn.disconnect()
        raise
    finally:
        pool.release(conn)


@dataclass(frozen=True, slots=True)
class NodeShape:
    """What a node registered with, fixed until it registers afresh (register.lua rewrites the
    whole hash, with a new ``registered_at``): ``read_free`` then reads only what changes."""

    registration: tuple[bytes | None, ...]  # incarnation, registered_at, cap_gpus, gpu_mem
    gpus: int
    gpu_memory_mb: int
    labels: dict[str, str]
    capacity: tuple[int, int, int]  # cpu milli, RAM MiB, slots
    read: bytes  # HMGET of what changes, encoded: the fields are _FREE_FIELDS, then per GPU milli, then mem


_FREE_FIELDS = (b"state", b"incarnation", b"registered_at", b"cap_gpus", b"gpu_mem", b"free_cpu_m", b"free_mem",
                b"free_slots")


def _free_fields(gpus: int) -> tuple[bytes, ...]:
    return _FREE_FIELDS + tuple(b"g%d_milli" % i for i in range(gpus)) + tuple(b"g%d_mem" % i for i in range(gpus))


def _shape_of(node_key: str, h: dict[bytes, bytes]) -> NodeShape:
    gpus = int(h.get(b"cap_gpus", 0))
    return NodeShape(
        tuple(h.get(field) for field in _FREE_FIELDS[1:5]), gpus, int(h.get(b"gpu_mem", 0)),
        {k[6:].decode(): v.decode() for k, v in h.items() if k[:6] == b"label:"},
        (int(h.get(b"cap_cpu_m", 0)), int(h.get(b"cap_mem", 0)), int(h.get(b"cap_slots", 0))),
        encode_command(b"HMGET", node_key.encode(), *_free_fields(gpus)))


def _node_free(node_id: str, shape: NodeShape, values: list[bytes | None]) -> NodeFree:
    n = shape.gpus
    return NodeFree(node_id, shape.gpu_memory_mb, [int(v or 0) for v in values[8:8 + n]],
                    [int(v or 0) for v in values[8 + n:]], int(values[5] or 0), int(values[6] or 0),
                    int(values[7] or 0), dict(shape.labels), *shape.capacity)


@dataclass(slots=True)
class FreeCache:
    """What ``read_free`` read last, kept by a dispatcher from cycle to cycle: the scripts score
    each node they change in ``P changes`` by a pool-wide sequence, so only nodes scored above
    ``seen`` are read again. The NodeFree objects are shared: readers must copy, not change them."""

    seen: int = 0
    nodes: dict[str, NodeFree | None] = field(default_factory=dict)  # None: registered but not up


def read_free(client: redis.Redis, keys: PoolKeys, now_ms: int, shapes: dict[str, NodeShape] | None = None,
              cache: FreeCache | None = None) -> list[NodeFree]:
    """What is free on each schedulable node (up, lease valid), parsed straight for the planner.

    ``shapes``, kept by the caller from cycle to cycle, spares re-reading what each node
    registered with: the whole hash is read only for nodes not in it (or registered anew).
    With ``cache``, only nodes changed since the last read are read at all."""
    if cache is None:
        live = cast(list[bytes], client.zrange(keys.leases, now_ms, "+inf", byscore=True))
        ids = sorted(i.decode() for i in live)
        _forget_gone(shapes, ids)
        return [n for n in _read_nodes(client, keys, now_ms, ids, shapes).values() if n is not None]
    live, changed, last = _raw_pipeline(client, [
        encode_command(b"ZRANGE", keys.leases.encode(), b"%d" % now_ms, b"+inf", b"BYSCORE"),
        encode_command(b"ZRANGE", keys.changes.encode(), b"(%d" % cache.seen, b"+inf", b"BYSCORE", b"WITHSCORES"),
        encode_command(b"ZRANGE", keys.changes.encode(), b"-1", b"-1", b"WITHSCORES")])
    changed, last = _scored(changed), _scored(last)
    newest = int(float(last[0][1])) if last else 0
    if newest < cache.seen:  # the sequence went back: Redis lost its data; start afresh
        cache.seen, cache.nodes = 0, {}
        return read_free(client, keys, now_ms, shapes, cache)
    ids = sorted(i.decode() for i in live)
    _forget_gone(shapes, ids)
    stale = {member.decode() for member, _score in changed} | {i for i in ids if i not in cache.nodes}
    if stale:
        cache.nodes.update(_read_nodes(client, keys, now_ms, [i for i in ids if i in stale], shapes))
    cache.seen = max(cache.seen, newest)
    if len(cache.nodes) > len(ids):
        live_ids = set(ids)
        cache.nodes = {i: n for i, n in cache.nodes.items() if i in live_ids}
    return [n for i in ids if (n := cache.nodes.get(i)) is not None]


def _scored(reply: list[Any]) -> list[tuple[bytes, Any]]:
    """A WITHSCORES reply as (member, score) pairs: RESP3 sends pairs, RESP2 a flat list."""
    if reply and isinstance(reply[0], list):
        return [(pair[0], pair[1]) for pair in reply]
    return list(zip(reply[::2], reply[1::2], strict=True))


def _read_nodes(client: redis.Redis, keys: PoolKeys, now_ms: int, ids: list[str],
                shapes: dict[str, NodeShape] | None) -> dict[str, NodeFree | None]:
    """Node id -> what is free on it (None when it is not up), for ``ids``."""
    known = {} if shapes is None else shapes
    replies = _raw_pipeline(client, [known[node_id].read if node_id in known
                                     else encode_command(b"HGETALL", keys.node(node_id).encode()) for node_id in ids])
    out: dict[str, NodeFree | None] = {}
    for node_id, reply in zip(ids, replies, strict=True):
        shape = known.get(node_id)
        if shape is None:
            # RESP3 sends a hash as a map, RESP2 as a flat list
            h = reply if isinstance(reply, dict) else dict(zip(reply[::2], reply[1::2], strict=True))
            shape = known[node_id] = _shape_of(keys.node(node_id), h)
            values = [h.get(field) for field in _free_fields(shape.gpus)]
        elif tuple(reply[1:5]) != shape.registration:  # registered afresh: read it all again
            del known[node_id]
            return _read_nodes(client, keys, now_ms, ids, shapes)
        else:
            values = reply
        out[node_id] = _node_free(node_id, shape, values) if values[0] == b"up" else None
    return out


def _forget_gone(shapes: dict[str, NodeShape] | None, live: list[str]) -> None:
    if shapes is not None and len(shapes) > 2 * len(live) + 64:  # forget nodes long gone
        live_ids = set(live)
        for node_id in [n for n in shapes if n not in live_ids]:
            del shapes[node_id]


# ---- what the full planner sees (broker.planner) ---------------------------------------

_RUNNING_FIELDS = (b"state", b"node", b"alloc", b"req", b"started_at", b"reserved_at", b"preempt_at", b"seq",
                   b"submitted_at")


def read_running(client: redis.Redis, keys: PoolKeys, node_ids: list[str],
                 preemptible_default: bool = False) -> list[RunningTask]:
    """The RESERVED and RUNNING tasks on ``node_ids``, with what each holds (its ``alloc``)."""
    if not node_ids:
        return []
    members = _raw_pipeline(client, [encode_command(b"SMEMBERS", keys.node_tasks(n).encode()) for n in node_ids])
    ids = sorted({m for found in members for m in found})
    if not ids:
        return []
    replies = _raw_pipeline(client, [encode_command(b"HMGET", keys.task(t.decode()).encode(), *_RUNNING_FIELDS)
                                     for t in ids])
    wires: dict[bytes, dict[str, Any]] = {}
    out = []
    for task_id, (state, node, alloc, req, started, reserved, preempt_at, seq, submitted) in zip(
            ids, replies, strict=True):
        if state not in (b"RESERVED", b"RUNNING") or alloc is None or node is None or req is None:
            continue  # finished or moved between the two reads
        wire = wires.get(req)
        if wire is None:
            wire = wires[req] = json.loads(req)
        held = json.loads(alloc)
        gpus = held["g"]
        x = wire.get("x")
        out.append(RunningTask(
            task_id.decode(), node.decode(), tuple(g[0] for g in gpus), gpus[0][1] if gpus else 0,
            gpus[0][2] if gpus else 0, held["c"], held["r"], wire["p"], wire.get("t", "default"),
            wire.get("n", ""), _i(started or reserved) / 1000, wire.get("e"),
            preemptible_default if x is None else bool(x), preempt_at is not None, _i(seq), _i(submitted) / 1000))
    return out


def read_runtimes(client: redis.Redis, keys: PoolKeys) -> dict[tuple[str, str], float]:
    """Mean seconds of succeeded runs per (task name, GPU shape), and per (task name, "")."""
    raw = cast(dict[bytes, bytes], client.hgetall(keys.runtimes))
    out = {}
    for name_field, count in raw.items():
        if name_field.startswith(b"n:") and int(count) > 0:
            name, _, shape = name_field[2:].decode().rpartition("|")
            total = raw.get(b"s:" + name_field[2:])
            if total is not None:
                out[(name, shape)] = float(total) / int(count)
    return out


def read_mix(client: redis.Redis, keys: PoolKeys) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in cast(dict[bytes, bytes], client.hgetall(keys.mix)).items()}


def read_preempting(client: redis.Redis, keys: PoolKeys) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in cast(dict[bytes, bytes], client.hgetall(keys.preempting)).items()}


def read_pending_full(client: redis.Redis, keys: PoolKeys, limit: int,
                      preemptible_default: bool = False) -> list[TaskRequest]:
    """The first ``limit`` pending tasks in queue order, each with its submit time."""
    pending = read_pending(client, keys, limit)
    if not pending:
        return []
    submitted = _raw_pipeline(client, [encode_command(b"HGET", keys.task(t).encode(), b"submitted_at")
                                       for t, _rank, _wire in pending])
    tasks = _requests(pending)
    for task, (_id, _rank, wire), at in zip(tasks, pending, submitted, strict=True):
        task.submitted_at = _i(at) / 1000
        if wire.get("x") is None:
            task.preemptible = preemptible_default
    return tasks


def read_snapshot(client: redis.Redis, keys: PoolKeys, now_ms: int, limit: int, preemptible_default: bool,
                  shapes: dict[str, NodeShape] | None = None,
                  cache: FreeCache | None = None) -> tuple[Snapshot, dict[str, str]]:
    """Everything the planner needs, and which preemptors wait for which node."""
    nodes = read_free(client, keys, now_ms, shapes, cache)
    snap = Snapshot(now_ms / 1000, nodes, read_pending_full(client, keys, limit, preemptible_default),
                    read_running(client, keys, [n.id for n in nodes], preemptible_default),
                    read_runtimes(client, keys), read_mix(client, keys))
    return snap, read_preempting(client, keys)
