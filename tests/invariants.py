"""Builders and state checks shared by the tests that drive the Lua scripts.

``assert_capacity_invariant`` is DESIGN.md invariant 1 read straight from Redis:
for every node, free + the ``alloc`` of the tasks in its ``:tasks`` set equals
capacity, per GPU index, CPU, RAM and slots, and nothing free is negative.
The builders go through the same path ``Client.submit`` and the worker agent use
(Celery's own message builder, the compact request wire), so tests see real data.
"""

from __future__ import annotations

import json
import re
from typing import Any, Protocol

import redis

from broker.client import request_wire
from broker.keys import PoolKeys
from broker.message import build_message, new_task_id
from broker.models import MILLI, Resources, SubmitRequest
from broker.policy import Placement
from broker.scripts import RegisterCode, ReserveCode, Scripts, StartCode, SubmitCode

PROBE = "workers.tasks.probe"
MAX_PAYLOAD = 1 << 20
LEASE_MS = 10_000
DEFAULT_RESOURCES = Resources(cpus=1, memory_mb=1024)
LIVE_STATES = ("RESERVED", "RUNNING")
_GPU_FIELD = re.compile(r"^g(\d+)_(milli|mem)\Z")


class ControlledClock(Protocol):
    """The ``clock`` fixture: ``clock()`` is now in ms, ``advance`` moves it on."""

    def __call__(self) -> int: ...

    def advance(self, seconds: float) -> None: ...


def text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


# ---- reading state ------------------------------------------------------------------


def hash_of(client: redis.Redis, key: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in client.hgetall(key).items()}


def task_hash(client: redis.Redis, keys: PoolKeys, task_id: str) -> dict[str, str]:
    return hash_of(client, keys.task(task_id))


def node_hash(client: redis.Redis, keys: PoolKeys, node_id: str) -> dict[str, str]:
    return hash_of(client, keys.node(node_id))


def alloc_of(client: redis.Redis, keys: PoolKeys, task_id: str) -> dict[str, Any] | None:
    raw = client.hget(keys.task(task_id), "alloc")
    return json.loads(raw) if raw is not None else None


def pending_ids(client: redis.Redis, keys: PoolKeys) -> list[str]:
    """PENDING task ids in dispatch order."""
    return [m.decode() for m in client.zrange(keys.pending, 0, -1)]


def pending_score(client: redis.Redis, keys: PoolKeys, task_id: str) -> int | None:
    score = client.zscore(keys.pending, task_id)
    return None if score is None else int(score)


def request_of(client: redis.Redis, keys: PoolKeys, task_id: str) -> str | None:
    return text(client.hget(keys.requests, task_id))


def node_task_ids(client: redis.Redis, keys: PoolKeys, node_id: str) -> set[str]:
    return {m.decode() for m in client.smembers(keys.node_tasks(node_id))}


def queue_messages(client: redis.Redis, keys: PoolKeys, node_id: str) -> list[str]:
    """The node queue's messages in the order a worker takes them (kombu BRPOPs the tail)."""
    return [m.decode() for m in reversed(client.lrange(keys.queue(node_id), 0, -1))]


def free_of(client: redis.Redis, keys: PoolKeys, node_id: str) -> dict[str, int]:
    """A node's free amounts only (``free_*`` and ``g<i>_*``)."""
    node = node_hash(client, keys, node_id)
    return {k: int(v) for k, v in node.items() if k.startswith("free_") or _GPU_FIELD.match(k)}


# ---- building state -----------------------------------------------------------------


def register_node(scripts: Scripts, node_id: str, *, gpus: int = 0, gpu_mem: int = 0, cpus: float = 8,
                  mem: int = 32_768, slots: int = 4, labels: dict[str, str] | None = None,
                  incarnation: str = "inc-1", lease_ms: int = LEASE_MS) -> tuple[RegisterCode, int]:
    return scripts.register(node_id, incarnation, lease_ms, gpus, gpu_mem, round(cpus * MILLI), mem, slots,
                            labels or {})


def submission(task_id: str, *, resources: Resources = DEFAULT_RESOURCES, priority: int = 0,
               tenant: str = "default", idempotency_key: str | None = None,
               max_retries: int = 3) -> tuple[SubmitRequest, str, str]:
    """What Client.submit hands to submit.lua: the validated request, its wire JSON, the Celery message."""
    req = SubmitRequest(task_name=PROBE, resources=resources, priority=priority, tenant=tenant,
                        idempotency_key=idempotency_key, max_retries=max_retries)
    wire = json.dumps(request_wire(req), separators=(",", ":"))
    return req, wire, build_message(task_id, PROBE, [], {}, MAX_PAYLOAD)


def submit_raw(scripts: Scripts, task_id: str, **options: Any) -> tuple[SubmitCode, str]:
    req, wire, message = submission(task_id, **options)
    return scripts.submit(task_id, req.idempotency_key, req.priority, wire, message, req.task_name, req.tenant,
                          req.max_retries)


def submit_task(scripts: Scripts, *, task_id: str | None = None, **options: Any) -> str:
    """Submit a probe task (see ``submission`` for the options) and return its id."""
    task_id = task_id or new_task_id()
    code, existing = submit_raw(scripts, task_id, **options)
    assert (code, existing) == (SubmitCode.CREATED, task_id)
    return task_id


def reserve_one(scripts: Scripts, task_id: str, node_id: str, *gpus: int) -> ReserveCode:
    (code,) = scripts.reserve([Placement(task_id, node_id, tuple(gpus))])
    return code


def tag_of(client: redis.Redis, keys: PoolKeys, task_id: str) -> str:
    tag = text(client.hget(keys.task(task_id), "tag"))
    assert tag is not None, f"task {task_id} holds no reservation"
    return tag


def place(scripts: Scripts, task_id: str, node_id: str, *gpus: int, start: bool = False) -> str:
    """Reserve (and optionally start) a task, asserting each step works; returns the delivery tag."""
    assert reserve_one(scripts, task_id, node_id, *gpus) is ReserveCode.OK
    tag = tag_of(scripts.redis, scripts.keys, task_id)
    if start:
        code, _ = scripts.start(task_id, node_id, tag)
        assert code is StartCode.OK
    return tag


# ---- invariants ---------------------------------------------------------------------


def assert_capacity_invariant(client: redis.Redis, keys: PoolKeys) -> None:
    """free + held == capacity and free >= 0 for every node, GPU index, CPU, RAM and slots.

    Also: every task on a node's ``:tasks`` set is live there and holds an ``alloc``,
    and every task holding an ``alloc`` is on its node's set (no reservation escapes
    the sum).
    """
    for node_id in sorted(m.decode() for m in client.smembers(keys.nodes)):
        node = node_hash(client, keys, node_id)
        gpus, gpu_mem = int(node["cap_gpus"]), int(node["gpu_mem"])
        held_milli, held_mem = [0] * gpus, [0] * gpus
        held = {"free_cpu_m": 0, "free_mem": 0, "free_slots": 0}
        for task_id in sorted(node_task_ids(client, keys, node_id)):
            task = task_hash(client, keys, task_id)
            where = f"task {task_id} on node {node_id}"
            assert task.get("state") in LIVE_STATES, f"{where} is {task.get('state')}"
            assert task.get("node") == node_id, f"{where} says it is on {task.get('node')}"
            assert "alloc" in task, f"{where} holds no alloc"
            alloc = json.loads(task["alloc"])
            for index, milli, mb in alloc["g"] or []:  # cjson writes an empty list as {}
                assert 0 <= int(index) < gpus, f"{where} holds unknown GPU {index}"
                held_milli[int(index)] += int(milli)
                held_mem[int(index)] += int(mb)
            held["free_cpu_m"] += int(alloc["c"])
            held["free_mem"] += int(alloc["r"])
            held["free_slots"] += 1

        indices = sorted({int(m.group(1)) for f in node if (m := _GPU_FIELD.match(f))})
        assert indices == list(range(gpus)), f"node {node_id} has GPU fields {indices}, capacity {gpus}"
        for i in range(gpus):
            free_milli, free_mem = int(node[f"g{i}_milli"]), int(node[f"g{i}_mem"])
            assert free_milli >= 0 and free_mem >= 0, f"node {node_id} GPU {i} over-committed: {node}"
            assert free_milli + held_milli[i] == MILLI, f"node {node_id} GPU {i} share: {free_milli}+{held_milli[i]}"
            assert free_mem + held_mem[i] == gpu_mem, f"node {node_id} GPU {i} memory: {free_mem}+{held_mem[i]}"
        for free_field, cap_field in (("free_cpu_m", "cap_cpu_m"), ("free_mem", "cap_mem"),
                                      ("free_slots", "cap_slots")):
            free = int(node[free_field])
            assert free >= 0, f"node {node_id} {free_field} = {free}"
            assert free + held[free_field] == int(node[cap_field]), (
                f"node {node_id}: {free_field} {free} + held {held[free_field]} != {cap_field} {node[cap_field]}")

    for key in client.scan_iter(match=keys.prefix + "task:*", count=1000):
        task = hash_of(client, key.decode())
        if "alloc" in task:
            on = task.get("node", "")
            assert task["id"] in node_task_ids(client, keys, on), f"task {task['id']} holds an alloc off node {on!r}"
