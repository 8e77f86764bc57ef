"""register.lua against a real Redis: CREATED, REFRESHED, REPLACED, SHAPE_CHANGED."""

from __future__ import annotations

import pytest
import redis

from broker.models import Resources
from broker.store import reads
from broker.store.keys import PoolKeys
from broker.store.records import catalogue_entry
from broker.store.scripts import RegisterCode, Scripts
from tests.invariants import (
    LEASE_MS,
    ControlledClock,
    assert_capacity_invariant,
    free_of,
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

SHAPE = {"gpus": 2, "gpu_mem": 40_000, "cpus": 16, "mem": 65_536, "slots": 4}
GPU_TASK = Resources(gpus=1, cpus=2, memory_mb=4096)


def test_created_writes_shape_free_labels_and_lease(scripts: Scripts, redis_client: redis.Redis,
                                                    keys: PoolKeys, clock: ControlledClock) -> None:
    code = register_node(scripts, "n1", **SHAPE, labels={"gpu": "a100", "zone": "eu"})
    assert code == (RegisterCode.CREATED, 0)

    node = node_hash(redis_client, keys, "n1")
    assert {k: node[k] for k in ("cap_gpus", "gpu_mem", "cap_cpu_m", "cap_mem", "cap_slots")} == {
        "cap_gpus": "2", "gpu_mem": "40000", "cap_cpu_m": "16000", "cap_mem": "65536", "cap_slots": "4"}
    assert free_of(redis_client, keys, "n1") == {
        "g0_milli": 1000, "g0_mem": 40_000, "g1_milli": 1000, "g1_mem": 40_000,
        "free_cpu_m": 16_000, "free_mem": 65_536, "free_slots": 4}
    assert node["label:gpu"] == "a100" and node["label:zone"] == "eu"
    assert (node["id"], node["incarnation"], node["state"]) == ("n1", "inc-1", "up")
    assert node["registered_at"] == node["heartbeat_at"] == str(clock())
    assert redis_client.smembers(keys.nodes) == {b"n1"}
    assert redis_client.zscore(keys.leases, "n1") == clock() + LEASE_MS
    assert_capacity_invariant(redis_client, keys)


def test_refreshed_keeps_reservations_and_renews_lease(scripts: Scripts, redis_client: redis.Redis,
                                                       keys: PoolKeys, clock: ControlledClock) -> None:
    register_node(scripts, "n1", **SHAPE)
    task = submit_task(scripts, resources=GPU_TASK)
    tag = place(scripts, task, "n1", 1, start=True)
    free_before = free_of(redis_client, keys, "n1")
    clock.advance(3)

    assert register_node(scripts, "n1", **SHAPE) == (RegisterCode.REFRESHED, 0)

    assert task_hash(redis_client, keys, task)["state"] == "RUNNING"
    assert task_hash(redis_client, keys, task)["tag"] == tag
    assert free_of(redis_client, keys, "n1") == free_before
    assert node_task_ids(redis_client, keys, "n1") == {task}
    assert len(queue_messages(redis_client, keys, "n1")) == 1
    assert redis_client.zscore(keys.leases, "n1") == clock() + LEASE_MS
    assert node_hash(redis_client, keys, "n1")["heartbeat_at"] == str(clock())
    assert_capacity_invariant(redis_client, keys)


def test_replaced_reclaims_the_previous_incarnation(scripts: Scripts, redis_client: redis.Redis,
                                                    keys: PoolKeys, clock: ControlledClock) -> None:
    register_node(scripts, "n1", **SHAPE, labels={"zone": "eu"})
    reserved = submit_task(scripts, resources=GPU_TASK)
    running = submit_task(scripts, resources=GPU_TASK)
    score = {t: pending_score(redis_client, keys, t) for t in (reserved, running)}
    wire = {t: request_of(redis_client, keys, t) for t in (reserved, running)}
    place(scripts, reserved, "n1", 0)
    place(scripts, running, "n1", 1, start=True)
    # What kombu keeps for the node besides its queue: stale once the process is gone.
    redis_client.hset(keys.unacked(node := "n1"), "x.1", "{}")
    redis_client.zadd(keys.unacked_index(node), {"x.1": 1})
    redis_client.set(keys.unacked_mutex(node), "1")
    clock.advance(1)

    code = register_node(scripts, "n1", gpus=4, gpu_mem=80_000, cpus=32, mem=131_072, slots=8,
                         labels={"gpu": "h100"}, incarnation="inc-2")

    assert code == (RegisterCode.REPLACED, 2)
    for t, retries in ((reserved, "0"), (running, "1")):  # only a started task is charged a retry
        h = task_hash(redis_client, keys, t)
        assert (h["state"], h["retries"], h["attempts"]) == ("PENDING", retries, "1")
        assert not {"node", "gpus", "tag", "alloc", "reserved_at", "started_at"} & h.keys()
        assert h["requeued_at"] == str(clock())
        assert pending_score(redis_client, keys, t) == score[t]
        assert request_of(redis_client, keys, t) == wire[t]
    assert pending_ids(redis_client, keys) == [reserved, running]
    for key in (keys.queue(node), keys.unacked(node), keys.unacked_index(node), keys.unacked_mutex(node),
                keys.node_tasks(node)):
        assert not redis_client.exists(key), key
    # The new shape replaces the old one whole: capacity, free amounts, labels.
    h = node_hash(redis_client, keys, "n1")
    assert (h["incarnation"], h["cap_gpus"], h["state"]) == ("inc-2", "4", "up")
    assert "label:zone" not in h and h["label:gpu"] == "h100"
    assert free_of(redis_client, keys, "n1") == {
        **{f"g{i}_{f}": v for i in range(4) for f, v in (("milli", 1000), ("mem", 80_000))},
        "free_cpu_m": 32_000, "free_mem": 131_072, "free_slots": 8}
    assert_capacity_invariant(redis_client, keys)


def test_replaced_fails_a_running_task_out_of_retries(scripts: Scripts, redis_client: redis.Redis,
                                                      keys: PoolKeys) -> None:
    register_node(scripts, "n1", **SHAPE)
    task = submit_task(scripts, resources=GPU_TASK, max_retries=0)
    place(scripts, task, "n1", 0, start=True)

    assert register_node(scripts, "n1", **SHAPE, incarnation="inc-2") == (RegisterCode.REPLACED, 1)

    h = task_hash(redis_client, keys, task)
    assert (h["state"], h["retries"]) == ("FAILED", "1")
    assert h["error"] == "node n1 restarted (retry limit reached)"
    assert pending_ids(redis_client, keys) == [] and request_of(redis_client, keys, task) is None
    assert_capacity_invariant(redis_client, keys)


def test_replaced_shrinking_drops_gpu_fields(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys) -> None:
    register_node(scripts, "n1", gpus=4, gpu_mem=80_000)
    assert register_node(scripts, "n1", gpus=1, gpu_mem=24_000, incarnation="inc-2") == (RegisterCode.REPLACED, 0)
    assert {k: v for k, v in free_of(redis_client, keys, "n1").items() if k.startswith("g")} == {
        "g0_milli": 1000, "g0_mem": 24_000}
    assert_capacity_invariant(redis_client, keys)


@pytest.mark.parametrize("change", [{"gpus": 3}, {"gpu_mem": 1}, {"cpus": 15}, {"mem": 1}, {"slots": 5}],
                         ids=lambda c: next(iter(c)))
def test_shape_changed_changes_nothing(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys,
                                       clock: ControlledClock, change: dict[str, int]) -> None:
    register_node(scripts, "n1", **SHAPE)
    task = submit_task(scripts, resources=GPU_TASK)
    place(scripts, task, "n1", 0)
    before = (node_hash(redis_client, keys, "n1"), redis_client.zscore(keys.leases, "n1"),
              task_hash(redis_client, keys, task))
    clock.advance(2)

    assert register_node(scripts, "n1", **{**SHAPE, **change}) == (RegisterCode.SHAPE_CHANGED, 0)

    after = (node_hash(redis_client, keys, "n1"), redis_client.zscore(keys.leases, "n1"),
             task_hash(redis_client, keys, task))
    assert after == before
    assert_capacity_invariant(redis_client, keys)


def test_survives_script_flush(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys) -> None:
    assert register_node(scripts, "n1", **SHAPE) == (RegisterCode.CREATED, 0)
    redis_client.script_flush()
    assert register_node(scripts, "n1", **SHAPE) == (RegisterCode.REFRESHED, 0)
    redis_client.script_flush()
    assert register_node(scripts, "n2", **SHAPE) == (RegisterCode.CREATED, 0)
    assert_capacity_invariant(redis_client, keys)


def test_a_node_records_the_task_names_it_runs_and_the_pool_their_catalogue(
        scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys) -> None:
    probe = catalogue_entry({"resources": {"gpus": 1}, "priority": 5}, "10/m", 10 / 60)
    register_node(scripts, "n1", gpus=1, gpu_mem=1000, tasks={"workers.tasks.probe": probe, "x.y": "{}"})
    register_node(scripts, "n2", gpus=1, gpu_mem=1000)  # says nothing: runs any task

    node = node_hash(redis_client, keys, "n1")
    assert (node["serves"], node["task:workers.tasks.probe"], node["task:x.y"]) == ("listed", "1", "1")
    assert node_hash(redis_client, keys, "n2")["serves"] == "all"
    assert redis_client.hget(keys.tasks, "workers.tasks.probe").decode() == probe
    views = {n.id: n for n in reads.read_nodes(redis_client, keys)}
    assert (views["n1"].serves, views["n2"].serves) == (["workers.tasks.probe", "x.y"], None)
    # A new incarnation that runs fewer names forgets the others.
    register_node(scripts, "n1", gpus=1, gpu_mem=1000, incarnation="inc-2", tasks={"x.y": "{}"})
    assert "task:workers.tasks.probe" not in node_hash(redis_client, keys, "n1")
