"""Read-only views of a pool's state in Redis, shared by the client, CLI and dispatcher."""

from __future__ import annotations

import json
from typing import Any, cast

import redis

from broker.keys import SEQ_BITS, PoolKeys
from broker.models import MILLI, GpuView, NodeView, QueueEntry, Resources
from broker.policy import NodeFree, TaskRequest


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


def read_pending(client: redis.Redis, keys: PoolKeys, limit: int) -> list[tuple[str, int, dict[str, Any]]]:
    """The first ``limit`` pending tasks in dispatch order: (id, seq, request wire).

    Tasks of one shape share their request text, so each distinct text is parsed once;
    the returned dicts may be shared and must not be mutated."""
    head = cast(list[tuple[bytes, float]], client.zrange(keys.pending, 0, limit - 1, withscores=True))
    if not head:
        return []
    wires = cast(list[bytes | None], client.hmget(keys.requests, [task_id for task_id, _ in head]))
    parsed: dict[bytes, dict[str, Any]] = {}
    out = []
    for (task_id, score), wire in zip(head, wires, strict=True):
        if wire is None:  # placed or cancelled between the two reads
            continue
        if wire not in parsed:
            parsed[wire] = json.loads(wire)
        out.append((task_id.decode(), int(score) % (1 << SEQ_BITS), parsed[wire]))
    return out


def pending_requests(client: redis.Redis, keys: PoolKeys, limit: int) -> list[TaskRequest]:
    return [TaskRequest.from_wire(task_id, wire, seq) for task_id, seq, wire in read_pending(client, keys, limit)]


def queue_entries(client: redis.Redis, keys: PoolKeys, limit: int) -> list[QueueEntry]:
    pending = read_pending(client, keys, limit)
    pipe = client.pipeline(transaction=False)
    for task_id, _seq, _wire in pending:
        pipe.hget(keys.task(task_id), "submitted_at")
    submitted = pipe.execute()
    return [
        QueueEntry(position=pos, id=task_id, name=wire["n"], tenant=wire["t"], priority=wire["p"],
                   resources=resources_from_wire(wire), submitted_at=_i(at) / 1000,
                   estimated_runtime_s=wire.get("e"))
        for pos, ((task_id, _seq, wire), at) in enumerate(zip(pending, submitted, strict=True), start=1)
    ]


def read_free(client: redis.Redis, keys: PoolKeys, now_ms: int) -> list[NodeFree]:
    """What is free on each schedulable node (up, lease valid), parsed straight for the planner."""
    ranked = cast(list[tuple[bytes, float]], client.zrange(keys.leases, 0, -1, withscores=True))
    leases = {n.decode(): score for n, score in ranked}
    ids = sorted(node_id for node_id, expires in leases.items() if expires >= now_ms)
    pipe = client.pipeline(transaction=False)
    for node_id in ids:
        pipe.hgetall(keys.node(node_id))
    out = []
    for node_id, h in zip(ids, pipe.execute(), strict=True):
        if h.get(b"state") != b"up":
            continue
        count = _i(h.get(b"cap_gpus"))
        out.append(NodeFree(
            id=node_id, gpu_memory_mb=_i(h.get(b"gpu_mem")),
            free_milli=[_i(h.get(b"g%d_milli" % i)) for i in range(count)],
            free_mem=[_i(h.get(b"g%d_mem" % i)) for i in range(count)],
            free_cpu_milli=_i(h.get(b"free_cpu_m")), free_memory_mb=_i(h.get(b"free_mem")),
            free_slots=_i(h.get(b"free_slots")),
            labels={k[6:].decode(): v.decode() for k, v in h.items() if k.startswith(b"label:")},
        ))
    return out
