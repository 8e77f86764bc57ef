"""Read-only views of a pool's state in Redis, shared by the client, CLI and dispatcher.

Every stored format is decoded by ``store.records``; this module only knows what to read.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any, cast

import redis

from broker.models import NodeView, QueueEntry
from broker.scheduling.model import GpuKind, NodeFree, RunningTask, Snapshot, TaskRequest
from broker.store import records, warm_map
from broker.store.connection import encode_command, raw_pipeline
from broker.store.keys import PoolKeys
from broker.store.records import NodeShape, Pending, Poisoned


def read_nodes(client: redis.Redis, keys: PoolKeys) -> list[NodeView]:
    ids = sorted(n.decode() for n in cast(set[bytes], client.smembers(keys.nodes)))
    pipe = client.pipeline(transaction=False)
    for node_id in ids:
        pipe.hgetall(keys.node(node_id))
        pipe.zscore(keys.leases, node_id)
        pipe.scard(keys.node_tasks(node_id))
    pipe.hgetall(keys.warmstarts)
    *replies, warm = pipe.execute()
    starts = warm_map.decode_starts(warm)
    return [records.node_view(node_id, replies[3 * i], replies[3 * i + 1], replies[3 * i + 2]).model_copy(
            update={"warm_starts": starts.get(node_id, (0, 0))}) for i, node_id in enumerate(ids) if replies[3 * i]]


def down_nodes(client: redis.Redis, keys: PoolKeys) -> dict[str, int]:
    """Node id -> when it went down (ms; its last heartbeat if the reaper did not say), for nodes down."""
    ids = sorted(cast(set[bytes], client.smembers(keys.nodes)))
    pipe = client.pipeline(transaction=False)
    for node_id in ids:
        pipe.hmget(keys.node(node_id.decode()), "state", "down_at", "heartbeat_at")
    return {node_id.decode(): int(down_at or beat or 0)
            for node_id, (state, down_at, beat) in zip(ids, pipe.execute() if ids else [], strict=True)
            if state == b"down"}


def read_pending(client: redis.Redis, keys: PoolKeys, limit: int, poisoned: Poisoned | None = None) -> Pending:
    """The first ``limit`` pending tasks in dispatch order: (id, rank, request wire); those whose
    request cannot be read are left out (into ``poisoned``).

    The pending score orders by priority, then submit sequence, so the rank stands in for
    both (reading the scores back as floats cost more than the rest of the read)."""
    head = cast(list[bytes], client.zrange(keys.pending, 0, limit - 1))
    return records.decode_pending(head, cast(list[bytes | None], client.hmget(keys.requests, head)) if head else [],
                                  0, poisoned)


def pending_requests(client: redis.Redis, keys: PoolKeys, limit: int) -> list[TaskRequest]:
    """``read_pending`` as the policy sees it; ``seq`` is the rank in the pending queue (a test
    and reference helper: the dispatcher reads through ``PendingHead`` or ``read_snapshot``)."""
    return records.task_requests(read_pending(client, keys, limit))


class PendingHead:
    """The first ``limit`` pending tasks in dispatch order, read only as far as the planner gets.

    The first ``first`` tasks (the cycle's free slots: no more can be placed) are read at
    once, in the snapshot; more, in doubling chunks, only when the planner asks for them
    because tasks at the head fit nowhere. A chunk starts after the score of the last task
    read, not at a rank: the dispatcher's own commits remove tasks from the head meanwhile.
    Tasks whose request cannot be read are left out, into ``poisoned``."""

    def __init__(self, client: redis.Redis, keys: PoolKeys, limit: int, first: int,
                 head: tuple[list[tuple[bytes, float]], list[bytes | None]] | None = None) -> None:
        """``head``: the first ``first`` ids with their scores, and their stored requests, when
        the caller read them (head.lua, in the same round trip as ``scan_gate``'s mark)."""
        self._client, self._keys, self.limit = client, keys, limit
        self.poisoned: Poisoned = {}
        self._size = max(1, min(first, limit))
        self.read, self._after = 0, cast(float | None, None)  # _after: where the next chunk starts
        if head is None:
            self._head = self._read(self._size, None)
        else:
            scored, wires = head
            self._head = self._read(self._size, None, scored[:self._size], wires[:self._size])

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
                yield records.task_requests(pending[first:first + self.PIECE])
            if self._after is None or self.read >= self.limit:
                return
            size = min(2 * size, self.limit - self.read)
            pending = self._read(size, self._after)

    def _read(self, size: int, after: float | None, scored: list[tuple[bytes, float]] | None = None,
              wires: list[bytes | None] | None = None) -> Pending:
        """``size`` ids from the head (or scored above ``after``), their requests, and the last one's
        score; ``scored`` and ``wires``: those, when the caller read them."""
        if scored is None:
            pending = self._keys.pending.encode()
            (reply,) = raw_pipeline(self._client, [
                encode_command(b"ZRANGE", pending, b"0", b"%d" % (size - 1), b"WITHSCORES") if after is None else
                encode_command(b"ZRANGE", pending, f"({after!r}".encode(), b"+inf", b"BYSCORE", b"LIMIT", b"0",
                               b"%d" % size, b"WITHSCORES")])
            scored = with_scores(reply)
        self._after = None
        if not scored:
            return []
        head = [member for member, _score in scored]
        if wires is None:
            (wires,) = raw_pipeline(self._client, [encode_command(b"HMGET", self._keys.requests.encode(), *head)])
        if len(head) == size:  # a short read is the end of the queue
            self._after = scored[-1][1]
        first_rank, self.read = self.read, self.read + len(head)
        return records.decode_pending(head, wires, first_rank, self.poisoned)


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
    # One raw pipeline: redis-py's own costs more per command than the read (10,000 rows, issue 14).
    submitted = raw_pipeline(client, [encode_command(b"HGET", keys.task(task_id).encode(), b"submitted_at")
                                      for task_id, _seq, _wire in pending]) if pending else []
    info = waiting_info(client, keys, [task_id for task_id, _seq, _wire in pending])
    rows = sorted(zip(pending, submitted, info, strict=True),
                  key=lambda row: (0, row[2]["position"]) if row[2] else (1, row[0][1]))
    return [
        QueueEntry(position=pos, id=task_id, name=wire.get("n", ""), tenant=wire.get("t", "default"),
                   priority=wire["p"], resources=records.resources_of(wire), submitted_at=int(at or 0) / 1000,
                   estimated_runtime_s=wire.get("e"), reason=why["reason"] if why else None,
                   estimated_start_at=why["eta"] if why else None)
        for pos, ((task_id, _seq, wire), at, why) in enumerate(rows, start=1)
    ]


#: What a reader knows of each node's registration, kept by the caller from cycle to cycle: its
#: NodeShape, and the HMGET of what changes on it, encoded once.
Shapes = dict[str, tuple[NodeShape, bytes]]


def read_free(client: redis.Redis, keys: PoolKeys, now_ms: int, shapes: Shapes | None = None,
              draining: bool = False) -> list[NodeFree]:
    """What is free on each schedulable node (up, lease valid, not draining), parsed straight for
    the planner; ``draining=True``: draining nodes too (``NodeFree.draining``), for the reasons.

    ``shapes``, kept by the caller from cycle to cycle, spares re-reading what each node
    registered with: the whole hash is read only for nodes not in it (or registered anew).
    A dispatcher reads through ``store.free_view.FreeView`` instead, which reads only the
    nodes changed since its last read."""
    live = cast(list[bytes], client.zrange(keys.leases, now_ms, "+inf", byscore=True))
    ids = sorted(i.decode() for i in live)
    forget_gone(shapes, ids)
    return [n for n in read_nodes_free(client, keys, now_ms, ids, shapes, None).values()
            if n is not None and (draining or not n.draining)]


def read_nodes_free(client: redis.Redis, keys: PoolKeys, now_ms: int, ids: list[str],
                shapes: Shapes | None, unreadable: dict[str, str] | None) -> dict[str, NodeFree | None]:
    """Node id -> what is free on it (None when it is not up, or its hash cannot be read: then
    ``unreadable`` says why, and the node is left out until a script changes it), for ``ids``."""
    known: Shapes = {} if shapes is None else shapes
    replies = raw_pipeline(client, node_commands(keys, ids, known))
    return nodes_free(client, keys, now_ms, ids, replies, known, unreadable)


def node_commands(keys: PoolKeys, ids: list[str], known: Shapes) -> list[bytes]:
    """What ``nodes_free`` parses, for a caller that sends it with other commands: each node's
    HMGET of what changes on it (its whole hash when its shape is not known yet)."""
    return [known[node_id][1] if node_id in known else encode_command(b"HGETALL", keys.node(node_id).encode())
            for node_id in ids]


def nodes_free(client: redis.Redis, keys: PoolKeys, now_ms: int, ids: list[str], replies: list[Any],
               known: Shapes, unreadable: dict[str, str] | None) -> dict[str, NodeFree | None]:
    """``read_nodes_free`` of the replies to ``node_commands(keys, ids, known)``."""
    out: dict[str, NodeFree | None] = {}
    for node_id, reply in zip(ids, replies, strict=True):
        found = known.get(node_id)
        try:
            if found is None:
                # RESP3 sends a hash as a map, RESP2 as a flat list
                h = reply if isinstance(reply, dict) else dict(zip(reply[::2], reply[1::2], strict=True))
                shape = records.node_shape(h)
                known[node_id] = (shape, encode_command(b"HMGET", keys.node(node_id).encode(), *shape.fields))
                values = [h.get(name) for name in shape.fields]
            elif not records.same_registration(found[0], reply):  # registered afresh: read it all again
                del known[node_id]
                return read_nodes_free(client, keys, now_ms, ids, known, unreadable)
            else:
                shape, values = found[0], reply
            out[node_id] = records.node_free(node_id, shape, values) if records.node_is_up(values) else None
        except records.UnreadableRecord as exc:
            known.pop(node_id, None)
            out[node_id] = None
            if unreadable is not None:
                unreadable[node_id] = str(exc)
        else:
            if unreadable is not None:
                unreadable.pop(node_id, None)
    return out


def forget_gone(shapes: Shapes | None, live: list[str]) -> None:
    if shapes is not None and len(shapes) > 2 * len(live) + 64:  # forget nodes long gone
        live_ids = set(live)
        for node_id in [n for n in shapes if n not in live_ids]:
            del shapes[node_id]


# ---- what the full planner sees (scheduling.planner) ---------------------------------------

_RUNNING_FIELDS = (b"state", b"node", b"alloc", b"req", b"started_at", b"reserved_at", b"preempt_at", b"seq",
                   b"submitted_at", b"preemptions", b"checkpoint_at", b"gang")


def read_running(client: redis.Redis, keys: PoolKeys, node_ids: list[str],
                 preemptible_default: bool = False) -> list[RunningTask]:
    """The RESERVED and RUNNING tasks on ``node_ids``, with what each holds (its ``alloc``)."""
    if not node_ids:
        return []
    members = raw_pipeline(client, [encode_command(b"SMEMBERS", keys.node_tasks(n).encode()) for n in node_ids])
    ids = sorted({m for found in members for m in found})
    if not ids:
        return []
    replies = raw_pipeline(client, [encode_command(b"HMGET", keys.task(t.decode()).encode(), *_RUNNING_FIELDS)
                                    for t in ids])
    wires: dict[bytes, records.Wire] = {}
    out = []
    for task_id, (state, node, alloc, req, started, reserved, preempt_at, seq, submitted, preemptions,
                  checkpoint, gang) in zip(ids, replies, strict=True):
        if state not in (b"RESERVED", b"RUNNING") or alloc is None or node is None or req is None:
            continue  # finished or moved between the two reads
        wire = wires.get(req)
        if wire is None:
            try:
                wire = wires[req] = records.decode_request(req)
            except records.UnreadableRecord:
                continue  # it holds what its alloc says either way; only preemption cannot weigh it
        run = records.running_task(task_id.decode(), node.decode(), alloc, wire, int(started or reserved or 0) / 1000,
                                   int(seq or 0), int(submitted or 0) / 1000, preempt_at is not None,
                                   preemptible_default)
        run.preemptions = int(preemptions or 0)
        run.checkpoint_at = int(checkpoint) / 1000 if checkpoint else None  # an earlier attempt's: before started_at
        run.gang = gang.decode() if gang else None
        out.append(run)
    return out


def read_runtimes(client: redis.Redis, keys: PoolKeys) -> dict[tuple[str, GpuKind | None], float]:
    """Mean seconds of succeeded runs per (task name, GPU kind), and per (task name, None)."""
    return records.decode_runtimes(cast(dict[bytes, bytes], client.hgetall(keys.runtimes)))


def read_mix(client: redis.Redis, keys: PoolKeys) -> dict[GpuKind, int]:
    return records.decode_mix(cast(dict[bytes, bytes], client.hgetall(keys.mix)))


def read_preempting(client: redis.Redis, keys: PoolKeys) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in cast(dict[bytes, bytes], client.hgetall(keys.preempting)).items()}


def read_pending_full(client: redis.Redis, keys: PoolKeys, limit: int, preemptible_default: bool = False,
                      poisoned: Poisoned | None = None) -> list[TaskRequest]:
    """The first ``limit`` pending tasks in queue order, each with its submit time; those whose
    request cannot be read are left out (into ``poisoned``)."""
    pending = read_pending(client, keys, limit, poisoned)
    if not pending:
        return []
    submitted = raw_pipeline(client, [encode_command(b"HGET", keys.task(t).encode(), b"submitted_at")
                                      for t, _rank, _wire in pending])
    tasks = records.task_requests(pending, preemptible_default)
    for task, at in zip(tasks, submitted, strict=True):
        task.submitted_at = int(at or 0) / 1000
    return tasks


def read_snapshot(client: redis.Redis, keys: PoolKeys, now_ms: int, limit: int, preemptible_default: bool,
                  found: list[NodeFree] | None = None, catalogue: Catalogue | None = None,
                  poisoned: Poisoned | None = None) -> tuple[Snapshot, dict[str, str]]:
    """Everything the planner needs, and which preemptors wait for which node; pending tasks whose
    request cannot be read are left out (into ``poisoned``). ``found``: the nodes as the caller
    read them, draining ones included (``read_free`` reads them otherwise)."""
    found = read_free(client, keys, now_ms, draining=True) if found is None else found
    nodes = [n for n in found if not n.draining]
    snap = Snapshot(now_ms / 1000, nodes, read_pending_full(client, keys, limit, preemptible_default, poisoned),
                    read_running(client, keys, [n.id for n in nodes], preemptible_default),
                    read_runtimes(client, keys), read_mix(client, keys),
                    rate_limits=read_rate_limits(client, keys, now_ms, catalogue),
                    draining=[n for n in found if n.draining])
    return snap, read_preempting(client, keys)


class Catalogue:
    """The pool's task catalogue (``P tasks``), re-read at most every ``max_age_s``: it changes
    only when a worker registers, and rate limits are read from it every cycle."""

    def __init__(self, max_age_s: float = 2.0) -> None:
        self.max_age_s = max_age_s
        self._read: tuple[float, dict[str, dict[str, Any]]] | None = None

    def get(self, client: redis.Redis, keys: PoolKeys) -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        if self._read is None or now - self._read[0] > self.max_age_s:
            self._read = (now, records.decode_catalogue(cast(dict[bytes, bytes], client.hgetall(keys.tasks))))
        return self._read[1]


def read_rate_limits(client: redis.Redis, keys: PoolKeys, now_ms: int,
                     catalogue: Catalogue | None = None) -> dict[str, tuple[float, float]]:
    """Rate-limited task names -> (starts per second, starts allowed now)."""
    entries = (catalogue or Catalogue(0)).get(client, keys)
    if not any(isinstance(e.get("rate"), int | float) and e["rate"] > 0 for e in entries.values()):
        return {}
    return records.rate_limits(entries, cast(dict[bytes, bytes], client.hgetall(keys.ratelimit)), now_ms)


def with_scores(reply: list[Any]) -> list[tuple[bytes, float]]:
    """A raw WITHSCORES reply as (member, score) pairs: RESP3 sends pairs, RESP2 a flat list."""
    if reply and isinstance(reply[0], list):
        return [(member, float(score)) for member, score in reply]
    return [(reply[i], float(reply[i + 1])) for i in range(0, len(reply), 2)]


def head_of(reply: Any) -> tuple[list[tuple[bytes, float]], list[bytes | None]]:
    """head.lua's reply: the (id, score) pairs, and each one's stored request."""
    _ok, scored, wires = reply
    return with_scores(scored), list(wires)


def timer_commands(keys: PoolKeys) -> list[bytes]:
    """The first delayed task and the first expiry (``next_timer``)."""
    return [encode_command(b"ZRANGE", key.encode(), b"0", b"0", b"WITHSCORES") for key in (keys.delayed, keys.expiring)]


def next_timer(replies: list[Any]) -> int | None:
    """When the first of ``timer_commands``' replies is due (ms), if any."""
    due = [int(pairs[0][1]) for pairs in map(with_scores, replies) if pairs]
    return min(due) if due else None


def next_timer_ms(client: redis.Redis, keys: PoolKeys) -> int | None:
    """When the next delayed task is due or the next expiry passes (ms), if any: one round trip."""
    return next_timer(raw_pipeline(client, timer_commands(keys)))
