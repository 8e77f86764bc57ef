"""quarantine.lua against a real Redis: a pending task whose stored request cannot be read ends
FAILED with the reason and leaves every queue; a queue entry with no PENDING task hash to end goes
to the dead-letter hash; nothing held is released; a request that changed meanwhile is left alone."""

from __future__ import annotations

import json

import pytest
import redis
from prometheus_client import REGISTRY

from broker.dispatcher import Dispatcher
from broker.models import Resources, TaskState
from broker.scheduling.config import SchedulingConfig
from broker.scheduling.placement import PlacementKind
from broker.settings import Settings
from broker.store import reads, records
from broker.store.keys import PoolKeys
from broker.store.scripts import QuarantineCode, Scripts
from tests.conftest import Clock
from tests.invariants import (
    assert_capacity_invariant,
    free_of,
    pending_ids,
    place,
    register_node,
    request_of,
    submit_task,
    task_hash,
)

BAD = '{"g":"1","m":0,"gm":0,"c":0,"r":0,"l":{},"p":0,"n":"x"}'
REASON = "unreadable request, quarantined: field 'g': must be an integer from 0 to 1024 (got a string)"


def poison(client: redis.Redis, keys: PoolKeys, task_id: str, text: str = BAD) -> None:
    """Overwrite a task's stored request, as a hand-written HSET or an older version would."""
    client.hset(keys.task(task_id), "req", text)
    client.hset(keys.requests, task_id, text)


def test_a_pending_task_ends_failed_with_the_reason_and_leaves_every_queue(
        scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys, clock: Clock) -> None:
    register_node(scripts, "n1", gpus=2, gpu_mem=1000)
    bad = submit_task(scripts, expires_at=clock() / 1000 + 600, idempotency_key="k1", resources=Resources(gpus=1))
    good = submit_task(scripts, resources=Resources(gpus=1))
    poison(redis_client, keys, bad)
    free = free_of(redis_client, keys, "n1")
    clock.advance(1)

    assert scripts.quarantine(bad, BAD, REASON) is QuarantineCode.FAILED

    t = task_hash(redis_client, keys, bad)
    assert (t["state"], t["error"], t["finished_at"]) == ("FAILED", REASON, str(clock()))
    assert pending_ids(redis_client, keys) == [good] and request_of(redis_client, keys, bad) is None
    assert redis_client.zscore(keys.expiring, bad) is None
    assert free_of(redis_client, keys, "n1") == free
    assert redis_client.hlen(keys.deadletter) == 0
    assert_capacity_invariant(redis_client, keys)


def test_a_request_that_changed_or_a_task_no_longer_pending_is_left_alone(
        scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys) -> None:
    task = submit_task(scripts)
    poison(redis_client, keys, task, "{}")
    assert scripts.quarantine(task, BAD, REASON) is QuarantineCode.NOT_PENDING  # judged another text
    assert task_hash(redis_client, keys, task)["state"] == "PENDING" and pending_ids(redis_client, keys) == [task]

    scripts.cancel(task, None)
    assert scripts.quarantine(task, "{}", REASON) is QuarantineCode.NOT_PENDING
    assert task_hash(redis_client, keys, task)["state"] == "CANCELLED"
    assert redis_client.hlen(keys.deadletter) == 0


def test_a_queue_entry_of_a_reserved_task_is_dead_lettered_and_its_reservation_kept(
        scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys) -> None:
    """A hand-written ZADD of a task that holds GPUs: only the queue entry goes; nothing is released."""
    register_node(scripts, "n1", gpus=2, gpu_mem=1000)
    task = submit_task(scripts, resources=Resources(gpus=1))
    place(scripts, task, "n1", 0)
    before, free = task_hash(redis_client, keys, task), free_of(redis_client, keys, "n1")
    redis_client.zadd(keys.pending, {task: 1})
    redis_client.hset(keys.requests, task, "not json")

    assert scripts.quarantine(task, "not json", REASON) is QuarantineCode.DEAD_LETTERED

    assert task_hash(redis_client, keys, task) == before
    assert free_of(redis_client, keys, "n1") == free
    assert pending_ids(redis_client, keys) == [] and request_of(redis_client, keys, task) is None
    letter = json.loads(redis_client.hget(keys.deadletter, task) or b"")
    assert letter == {"reason": REASON, "at": scripts.clock(), "request": "not json", "found": "state RESERVED"}
    assert_capacity_invariant(redis_client, keys)


@pytest.mark.parametrize(("write", "found"), [(None, "state missing"), ("a string", "not a hash")])
def test_a_queue_entry_without_a_task_hash_is_dead_lettered(scripts: Scripts, redis_client: redis.Redis,
                                                            keys: PoolKeys, write: str | None, found: str) -> None:
    if write is not None:
        redis_client.set(keys.task("ghost"), write)
    redis_client.zadd(keys.pending, {"ghost": 1})
    redis_client.hset(keys.requests, "ghost", "[]")

    assert scripts.quarantine("ghost", "[]", REASON) is QuarantineCode.DEAD_LETTERED

    assert pending_ids(redis_client, keys) == [] and request_of(redis_client, keys, "ghost") is None
    assert json.loads(redis_client.hget(keys.deadletter, "ghost") or b"")["found"] == found
    assert redis_client.type(keys.task("ghost")) == (b"string" if write else b"none")


# ---- the dispatcher's use of it -------------------------------------------------------------

#: Stored requests an older producer or a hand-written HSET could leave, and the field each names.
POISON = {
    "not JSON": ('{"g":1,', "'req': not JSON"),
    "an empty object": ("{}", "'g': must be an integer from 0 to 1024 (got nothing)"),
    "a count as a string": (BAD, "'g': must be an integer from 0 to 1024 (got a string)"),
    "a JSON array": ("[1, 2]", "'req': must be a JSON object (got an array)"),
    "labels as a list": ('{"g":0,"m":0,"gm":0,"c":0,"r":0,"l":["gpu"],"p":0,"n":"x"}', "'l': must be an object"),
    "no task name": ('{"g":0,"m":0,"gm":0,"c":0,"r":0,"l":[],"p":0}', "'n': must be a string (got nothing)"),
    "a fractional priority": ('{"g":0,"m":0,"gm":0,"c":0,"r":0,"l":{},"p":1.5,"n":"x"}', "'p': must be an integer"),
    "a negative CPU": ('{"g":0,"m":0,"gm":0,"c":-1,"r":0,"l":{},"p":0,"n":"x"}', "'c': must be an integer from 0"),
}


# The dispatcher's lazy best-fit path and its full planner read pending tasks differently.
BOTH_PLANNERS = pytest.mark.parametrize(
    "scheduling", [SchedulingConfig(), SchedulingConfig(placement=PlacementKind.FIRST_FIT)],
    ids=["lazy planner", "full planner"])


def quarantined_count(pool: str, record: str) -> float:
    return REGISTRY.get_sample_value("gpubroker_quarantined_total", {"pool": pool, "record": record}) or 0.0


@BOTH_PLANNERS
def test_the_dispatcher_fails_unreadable_tasks_skips_an_unreadable_node_and_places_the_rest_in_one_cycle(
        redis_client: redis.Redis, keys: PoolKeys, clock: Clock, scheduling: SchedulingConfig) -> None:
    dispatcher = Dispatcher(Settings(pool=keys.pool, scheduling=scheduling), clock, redis_client)
    scripts = dispatcher.scripts
    register_node(scripts, "n1", gpus=2, gpu_mem=1000, slots=8)
    register_node(scripts, "n2", gpus=8, gpu_mem=1000, slots=8)
    redis_client.hset(keys.node("n2"), "cap_gpus", "lots")  # a node hash this version cannot read
    good = [submit_task(scripts, resources=Resources(cpus=1)) for _ in range(3)]
    bad = {}
    for text, reason in POISON.values():
        task_id = submit_task(scripts, resources=Resources(cpus=1))
        poison(redis_client, keys, task_id, text)
        bad[task_id] = reason
    tasks_before, nodes_before = quarantined_count(keys.pool, "task"), quarantined_count(keys.pool, "node")

    report = dispatcher.run_cycle()

    assert sorted(report.quarantined) == sorted(bad)
    for task_id, reason in bad.items():
        t = task_hash(redis_client, keys, task_id)
        assert t["state"] == "FAILED" and reason in t["error"], (task_id, t.get("error"))
        assert t["error"].startswith("unreadable request, quarantined: field ")
        status = records.task_status(task_id, redis_client.hgetall(keys.task(task_id)), None)  # gpubroker status
        assert (status.state, status.error) == (TaskState.FAILED, t["error"])
    assert {t: task_hash(redis_client, keys, t)["state"] for t in good} == dict.fromkeys(good, "RESERVED")
    assert {task_hash(redis_client, keys, t)["node"] for t in good} == {"n1"}
    assert pending_ids(redis_client, keys) == []
    assert quarantined_count(keys.pool, "task") - tasks_before == len(bad)
    assert quarantined_count(keys.pool, "node") - nodes_before == 1
    assert "cap_gpus" in dispatcher._view.unreadable["n2"]
    shown = {n.id: n.state for n in reads.read_nodes(redis_client, keys)}  # gpubroker nodes
    assert shown == {"n1": "up", "n2": "unreadable (field 'cap_gpus': must be an integer (got b'lots'))"}

    dispatcher.run_cycle()  # the node is noted once, not once per cycle
    assert quarantined_count(keys.pool, "node") - nodes_before == 1


@BOTH_PLANNERS
def test_reserve_uses_the_request_the_dispatcher_checked_not_the_task_hash_copy(
        redis_client: redis.Redis, keys: PoolKeys, clock: Clock, scheduling: SchedulingConfig) -> None:
    # Only the task hash's copy is spoiled (an HSET by hand): the queue entry the dispatcher reads
    # and checks is fine. reserve.lua places it from that entry; before, it decoded the hash's
    # copy and the script error stopped every dispatcher, cycle after cycle.
    dispatcher = Dispatcher(Settings(pool=keys.pool, scheduling=scheduling), clock, redis_client)
    register_node(dispatcher.scripts, "n1", gpus=2, gpu_mem=1000, slots=8)
    spoiled = submit_task(dispatcher.scripts, resources=Resources(gpus=1))
    good = submit_task(dispatcher.scripts, resources=Resources(cpus=1))
    redis_client.hset(keys.task(spoiled), "req", "{not json")

    report = dispatcher.run_cycle()

    assert report.placed == 2 and not report.quarantined
    assert {task_hash(redis_client, keys, t)["state"] for t in (spoiled, good)} == {"RESERVED"}
    assert task_hash(redis_client, keys, spoiled)["gpus"] in ("0", "1")
    assert_capacity_invariant(redis_client, keys)
