"""reap.lua against a real Redis: expired nodes are reclaimed whole, live ones untouched, ``limit`` kept."""

from __future__ import annotations

import redis

from broker.models import Resources
from broker.store.keys import PoolKeys
from broker.store.scripts import HeartbeatCode, Scripts
from tests.invariants import (
    LEASE_MS,
    ControlledClock,
    assert_capacity_invariant,
    free_of,
    hash_of,
    node_hash,
    node_task_ids,
    pending_ids,
    pending_score,
    place,
    queue_messages,
    register_node,
    request_of,
    submit_task,
    task_hash,
)

TASK = Resources(gpus=1, cpus=1, memory_mb=1024)
SHAPE = {"gpus": 4, "gpu_mem": 24_000, "cpus": 8, "mem": 16_384, "slots": 4}
# kombu's priority buckets besides 0 live in keys of their own (queue name + '\x06\x16' + bucket).
BUCKET_SUFFIXES = ["\x06\x163", "\x06\x166", "\x06\x169"]


def test_expired_node_is_reclaimed(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys,
                                   clock: ControlledClock) -> None:
    register_node(scripts, "dead", **SHAPE)
    capacity = free_of(redis_client, keys, "dead")
    reserved = submit_task(scripts, resources=TASK)
    running = submit_task(scripts, resources=TASK)
    exhausted = submit_task(scripts, resources=TASK, max_retries=0)
    scores = {t: pending_score(redis_client, keys, t) for t in (reserved, running, exhausted)}
    place(scripts, reserved, "dead", 0)
    place(scripts, running, "dead", 1, start=True)
    place(scripts, exhausted, "dead", 2, start=True)
    queue = keys.queue("dead")
    redis_client.hset(keys.unacked("dead"), f"{running}.1", "{}")
    redis_client.zadd(keys.unacked_index("dead"), {f"{running}.1": 1})
    for suffix in BUCKET_SUFFIXES:
        redis_client.lpush(queue + suffix, "{}")

    clock.advance(LEASE_MS / 1000 - 1)
    register_node(scripts, "alive", **SHAPE)  # its lease runs LEASE_MS from here
    survivor = submit_task(scripts, resources=TASK)
    place(scripts, survivor, "alive", 3)
    alive_before = (node_hash(redis_client, keys, "alive"), redis_client.zscore(keys.leases, "alive"),
                    task_hash(redis_client, keys, survivor), queue_messages(redis_client, keys, "alive"))
    clock.advance(2)

    assert scripts.reap() == ["dead"]

    for t, retries in ((reserved, "0"), (running, "1")):
        h = task_hash(redis_client, keys, t)
        assert (h["state"], h["retries"], h["requeued_at"]) == ("PENDING", retries, str(clock()))
        assert not {"node", "gpus", "tag", "alloc"} & h.keys()
        assert pending_score(redis_client, keys, t) == scores[t]
        assert request_of(redis_client, keys, t) == h["req"]
    h = task_hash(redis_client, keys, exhausted)
    assert (h["state"], h["retries"]) == ("FAILED", "1")
    assert h["error"] == "node dead lease expired (retry limit reached)"
    assert "alloc" not in h
    assert pending_ids(redis_client, keys) == [reserved, running]

    node = node_hash(redis_client, keys, "dead")
    assert node["state"] == "down"
    assert free_of(redis_client, keys, "dead") == capacity
    assert redis_client.zscore(keys.leases, "dead") is None
    assert node_task_ids(redis_client, keys, "dead") == set()
    for key in [queue, keys.unacked("dead"), keys.unacked_index("dead"), *(queue + s for s in BUCKET_SUFFIXES)]:
        assert not redis_client.exists(key), repr(key)
    assert redis_client.sismember(keys.nodes, "dead")  # a down node stays known, so it can come back

    assert (node_hash(redis_client, keys, "alive"), redis_client.zscore(keys.leases, "alive"),
            task_hash(redis_client, keys, survivor), queue_messages(redis_client, keys, "alive")) == alive_before
    assert_capacity_invariant(redis_client, keys)
    assert scripts.heartbeat("dead", "inc-1", LEASE_MS) is HeartbeatCode.REAPED


def test_nothing_expired_changes_nothing(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys,
                                         clock: ControlledClock) -> None:
    register_node(scripts, "n1", **SHAPE)
    place(scripts, submit_task(scripts, resources=TASK), "n1", 0)
    before = {k.decode(): hash_of(redis_client, k.decode()) for k in redis_client.scan_iter(_type="hash")}
    clock.advance(LEASE_MS / 1000)  # the expiry instant itself is still live

    assert scripts.reap() == []

    assert {k.decode(): hash_of(redis_client, k.decode()) for k in redis_client.scan_iter(_type="hash")} == before
    assert redis_client.zscore(keys.leases, "n1") is not None


def test_limit_reaps_the_longest_expired_first(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys,
                                               clock: ControlledClock) -> None:
    for node_id in ("a", "b", "c"):
        register_node(scripts, node_id, **SHAPE)
        place(scripts, submit_task(scripts, resources=TASK), node_id, 0)
        clock.advance(1)
    clock.advance(LEASE_MS / 1000)

    assert scripts.reap(limit=2) == ["a", "b"]
    assert node_hash(redis_client, keys, "c")["state"] == "up"
    assert redis_client.zscore(keys.leases, "c") is not None
    assert len(node_task_ids(redis_client, keys, "c")) == 1
    assert_capacity_invariant(redis_client, keys)

    assert scripts.reap(limit=2) == ["c"]
    assert scripts.reap(limit=2) == []
    assert len(pending_ids(redis_client, keys)) == 3
    assert_capacity_invariant(redis_client, keys)


def test_survives_script_flush(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys,
                               clock: ControlledClock) -> None:
    register_node(scripts, "n1", **SHAPE)
    redis_client.script_flush()
    clock.advance(LEASE_MS / 1000 + 1)
    assert scripts.reap() == ["n1"]
    assert node_hash(redis_client, keys, "n1")["state"] == "down"
