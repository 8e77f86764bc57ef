"""Builders and state checks shared by the tests that drive the Lua scripts.

``assert_capacity_invariant`` is DESIGN.md invariant 1 read straight from Redis:
for every node, free + the ``alloc`` of the tasks in its ``:tasks`` set equals
capacity, per GPU index, CPU, RAM and slots, and nothing free is negative.
``assert_membership_invariant`` (one state per task, and the pending/requests/node
sets agree with it), ``assert_queue_invariant`` (invariant 3: a RESERVED task's
message is on its node's queue) and ``assert_progress`` (attempts and retries never
go back, final states stay final) complete the set; ``assert_pool_invariants``
runs the three read from Redis in one call.
The builders go through the same path ``Client.submit`` and the worker agent use
(Celery's own message builder, the compact request wire), so tests see real data.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Collection
from typing import Any, Protocol

import redis

from broker.message import build_message, new_task_id
from broker.models import MILLI, Resources, SubmitRequest
from broker.scheduling.model import Placement
from broker.store.keys import PoolKeys
from broker.store.records import StoredRequest
from broker.store.scripts import RegisterCode, ReserveCode, Scripts, StartCode, SubmitCode

PROBE = "workers.tasks.probe"
MAX_PAYLOAD = 1 << 20
LEASE_MS = 10_000
DEFAULT_RESOURCES = Resources(cpus=1, memory_mb=1024)
LIVE_STATES = ("RESERVED", "RUNNING")
FINAL_STATES = ("SUCCEEDED", "FAILED", "CANCELLED")
ALL_STATES = ("PENDING", *LIVE_STATES, *FINAL_STATES)
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
                  incarnation: str = "inc-1", lease_ms: int = LEASE_MS,
                  tasks: dict[str, str] | None = None) -> tuple[RegisterCode, int]:
    return scripts.register(node_id, incarnation, lease_ms, gpus, gpu_mem, round(cpus * MILLI), mem, slots,
                            labels or {}, tasks)


def submission(task_id: str, *, resources: Resources = DEFAULT_RESOURCES, priority: int = 0,
               tenant: str = "default", idempotency_key: str | None = None, max_retries: int = 3,
               not_before: float | None = None, expires_at: float | None = None,
               name: str = PROBE) -> tuple[SubmitRequest, StoredRequest, str]:
    """What Client.submit hands to submit.lua: the validated request, what is stored of it, the Celery message."""
    req = SubmitRequest(task_name=name, resources=resources, priority=priority, tenant=tenant,
                        idempotency_key=idempotency_key, max_retries=max_retries, not_before=not_before,
                        expires_at=expires_at)
    return req, StoredRequest.of(req), build_message(task_id, name, [], {}, MAX_PAYLOAD)


def submit_raw(scripts: Scripts, task_id: str, result_ttl_ms: int = 0, **options: Any) -> tuple[SubmitCode, str]:
    req, stored, message = submission(task_id, **options)
    return scripts.submit(task_id, req, message, stored, result_ttl_ms)


def submit_task(scripts: Scripts, *, task_id: str | None = None, **options: Any) -> str:
    """Submit a probe task (see ``submission`` for the options) and return its id."""
    task_id = task_id or new_task_id()
    code, existing = submit_raw(scripts, task_id, **options)
    assert (code, existing) == (SubmitCode.CREATED, task_id)
    return task_id


def reserve_one(scripts: Scripts, task_id: str, node_id: str, *gpus: int) -> ReserveCode:
    (code,) = scripts.reserve([Placement(task_id, node_id, tuple(gpus))])
    return code


def race(client: redis.Redis, keys: PoolKeys, clock: Any, ids: list[str], callers: int,
         call: Callable[[Scripts, str, int], Any]) -> list[tuple[str, Any]]:
    """``callers`` racing dispatchers, each on its own connection, each calling ``call(scripts,
    task_id, i)`` for every one of ``ids`` (caller k starting at the k-th, i its step); what
    every call returned, with its task id."""
    results: list[tuple[str, Any]] = []
    lock = threading.Lock()

    def dispatcher(offset: int) -> None:
        mine = Scripts(redis.Redis(connection_pool=client.connection_pool), keys, clock)
        for i, task_id in enumerate(ids[offset:] + ids[:offset]):
            result = call(mine, task_id, i)
            with lock:
                results.append((task_id, result))

    threads = [threading.Thread(target=dispatcher, args=(k,)) for k in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


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

    # One pipelined read for every task (pools in the end-to-end tests hold thousands).
    pipe = client.pipeline(transaction=False)
    for key in client.scan_iter(match=keys.prefix + "task:*", count=1000):
        pipe.hmget(key, "id", "alloc", "node")
    on_node: dict[str, set[str]] = {}
    for task_id, alloc, node in pipe.execute():
        if alloc is not None:
            on = text(node) or ""
            if on not in on_node:
                on_node[on] = node_task_ids(client, keys, on)
            assert text(task_id) in on_node[on], f"task {text(task_id)} holds an alloc off node {on!r}"


def all_tasks(client: redis.Redis, keys: PoolKeys) -> dict[str, dict[str, str]]:
    """Every task hash of the pool by task id (the stored Celery message left out)."""
    task_keys = sorted(k.decode() for k in client.scan_iter(match=keys.prefix + "task:*", count=1000))
    pipe = client.pipeline(transaction=False)
    for key in task_keys:
        pipe.hgetall(key)
    tasks = {}
    for key, h in zip(task_keys, pipe.execute(), strict=True):
        tasks[key.removeprefix(keys.task(""))] = {k.decode(): v.decode() for k, v in h.items() if k != b"message"}
    return tasks


def assert_membership_invariant(client: redis.Redis, keys: PoolKeys) -> dict[str, dict[str, str]]:
    """Each task is in exactly one state, and where it is listed agrees with that state.

    PENDING: in ``pending`` (with its own score) and ``requests`` (with its own request), or,
    waiting for its start time, in ``delayed`` (scored by its ``not_before``) and in neither;
    on no node, holding nothing. RESERVED/RUNNING: on exactly its node's ``:tasks`` set,
    holding an ``alloc`` and the tag of its current attempt, in neither pending list.
    Final: listed nowhere, holding nothing. Nothing is listed for a task that does not
    exist. Returns the task hashes it read, for further checks.
    """
    tasks = all_tasks(client, keys)
    pending = {m.decode(): int(s) for m, s in client.zrange(keys.pending, 0, -1, withscores=True)}
    delayed = {m.decode(): int(s) for m, s in client.zrange(keys.delayed, 0, -1, withscores=True)}
    requests = hash_of(client, keys.requests)
    registered = {m.decode() for m in client.smembers(keys.nodes)}
    held_on: dict[str, list[str]] = {}
    for key in client.scan_iter(match=keys.prefix + "node:*:tasks", count=1000):
        node_id = key.decode().removeprefix(keys.node("")).removesuffix(":tasks")
        assert node_id in registered, f"task set of unregistered node {node_id}"
        for task_id in node_task_ids(client, keys, node_id):
            held_on.setdefault(task_id, []).append(node_id)

    for task_id, t in tasks.items():
        state, where = t.get("state"), f"task {task_id}"
        assert state in ALL_STATES, f"{where} has state {state!r}"
        assert t.get("id") == task_id, f"{where} names itself {t.get('id')!r}"
        if state == "PENDING" and "not_before" in t:
            assert delayed.get(task_id) == int(t["not_before"]), f"{where} waits but delayed has {delayed.get(task_id)}"
            assert task_id not in pending and task_id not in requests, f"{where} waits but is in the queue"
        elif state == "PENDING":
            assert pending.get(task_id) == int(t["score"]), f"{where} is PENDING but pending has {pending.get(task_id)}"
            assert requests.get(task_id) == t["req"], f"{where} is PENDING but its request is {requests.get(task_id)}"
            assert task_id not in held_on, f"{where} is PENDING but held on {held_on[task_id]}"
            assert "alloc" not in t and "tag" not in t and "node" not in t, f"{where} is PENDING but holds {t}"
        elif state in LIVE_STATES and "replicas" in t:  # a gang's record: its members hold what it has
            assert task_id not in held_on and "alloc" not in t, f"gang {task_id} holds capacity itself"
            assert task_id not in pending and task_id not in requests, f"gang {task_id} is {state} but still pending"
            members = [tasks.get(f"{task_id}:m{r}") for r in range(int(t.get("granted") or t["replicas"]))]
            assert all(m is not None and m.get("gang") == task_id for m in members), f"gang {task_id} lacks members"
        elif state in LIVE_STATES:
            assert held_on.get(task_id) == [t.get("node")], (
                f"{where} is {state} on {t.get('node')}, held on {held_on.get(task_id)}")
            assert t["node"] in registered, f"{where} is {state} on unregistered node {t['node']}"
            assert "alloc" in t, f"{where} is {state} without an alloc"
            assert t.get("tag") == f"{task_id}.{t['attempts']}", (
                f"{where} has tag {t.get('tag')} at attempt {t['attempts']}")
            assert task_id not in pending and task_id not in requests, f"{where} is {state} but still pending"
        else:
            assert task_id not in pending and task_id not in requests, f"{where} is {state} but still pending"
            assert task_id not in delayed, f"{where} is {state} but still waits in delayed"
            assert task_id not in held_on, f"{where} is {state} but held on {held_on[task_id]}"
            assert "alloc" not in t, f"{where} is {state} but holds {t['alloc']}"
    assert set(pending) <= set(tasks), f"pending lists unknown tasks {set(pending) - set(tasks)}"
    assert set(requests) == set(pending), f"requests {sorted(requests)} != pending {sorted(pending)}"
    assert set(held_on) <= set(tasks), f"node task sets list unknown tasks {set(held_on) - set(tasks)}"
    return tasks


def queued_envelopes(client: redis.Redis, keys: PoolKeys, node_id: str) -> list[dict[str, Any]]:
    """The node queue's messages, parsed, in the order a worker takes them."""
    return [json.loads(raw) for raw in queue_messages(client, keys, node_id)]


def assert_queue_invariant(client: redis.Redis, keys: PoolKeys, tasks: dict[str, dict[str, str]],
                           taken: Collection[tuple[str, str]] = ()) -> None:
    """Atomic handoff (DESIGN.md invariant 3) read from Redis.

    Every RESERVED task's message, with the tag of its current attempt, is on its node's
    queue, or was ``taken`` by that node's worker (``(node, tag)`` pairs a test's worker
    popped and has not finished). Every queued message is a Celery envelope for an
    existing task, addressed to the queue it is on, its tag naming the task, and no tag
    is queued twice. (Messages of tasks that moved on stay queued until a worker takes
    them; start.lua's fence drops them.)
    """
    queued: dict[str, str] = {}
    for node_id in sorted(m.decode() for m in client.smembers(keys.nodes)):
        for envelope in queued_envelopes(client, keys, node_id):
            properties = envelope["properties"]
            tag, task_id = properties["delivery_tag"], envelope["headers"]["id"]
            where = f"message {tag} on {node_id}"
            assert properties["delivery_info"]["routing_key"] == keys.queue(node_id), f"{where} is misaddressed"
            assert tag.rpartition(".")[0] == task_id, f"{where} carries task {task_id}"
            assert task_id in tasks, f"{where} is for a task that does not exist"
            assert tag not in queued, f"{where} is queued on {queued[tag]} too"
            queued[tag] = node_id
    held = set(taken)
    for task_id, t in tasks.items():
        if t["state"] == "RESERVED" and "replicas" not in t:  # a gang's members are queued, not the gang
            node_id, tag = t["node"], t["tag"]
            assert queued.get(tag) == node_id or (node_id, tag) in held, (
                f"task {task_id} is RESERVED on {node_id} but its message {tag} is nowhere")


def assert_pool_invariants(client: redis.Redis, keys: PoolKeys,
                           taken: Collection[tuple[str, str]] = ()) -> dict[str, dict[str, str]]:
    """Membership, capacity and handoff invariants at once; returns the task hashes read."""
    tasks = assert_membership_invariant(client, keys)
    assert_capacity_invariant(client, keys)
    assert_queue_invariant(client, keys, tasks, taken)
    return tasks


Progress = dict[str, tuple[str, int, int]]


def progress_of(tasks: dict[str, dict[str, str]]) -> Progress:
    """task id -> (state, attempts, retries), for ``assert_progress``."""
    return {task_id: (t["state"], int(t["attempts"]), int(t["retries"])) for task_id, t in tasks.items()}


def assert_progress(before: Progress, after: Progress) -> None:
    """No task vanished, attempts and retries never went back, and a final state never changed."""
    for task_id, (state, attempts, retries) in before.items():
        assert task_id in after, f"task {task_id} ({state}) vanished"
        new_state, new_attempts, new_retries = after[task_id]
        assert new_attempts >= attempts, f"task {task_id} attempts went back {attempts} -> {new_attempts}"
        assert new_retries >= retries, f"task {task_id} retries went back {retries} -> {new_retries}"
        if state in FINAL_STATES:
            assert (new_state, new_attempts, new_retries) == (state, attempts, retries), (
                f"task {task_id} left final state {state} for {after[task_id]}")


def woken(pubsub: redis.client.PubSub) -> list[bytes]:
    """The wake-ups' payloads published so far (the ``wakes`` fixture's subscription), in order."""
    out = []
    while (message := pubsub.get_message(timeout=0.05)) is not None:
        out.append(message["data"])
    return out
