"""preempt.lua, and what finish.lua and reserve.lua do for scheduling, against a real Redis."""

from __future__ import annotations

import redis

from broker.models import Resources
from broker.store.keys import PoolKeys
from broker.store.reads import read_runtimes
from broker.store.scripts import FinishCode, PreemptCode, ReserveCode, Scripts, StartCode
from tests.invariants import (
    ControlledClock,
    assert_capacity_invariant,
    free_of,
    node_task_ids,
    pending_ids,
    pending_score,
    place,
    register_node,
    reserve_one,
    submit_task,
    task_hash,
)

ONE_GPU = Resources(gpus=1, cpus=1, memory_mb=1024)


def setup_node(scripts: Scripts) -> str:
    register_node(scripts, "n1", gpus=2, gpu_mem=40_000, cpus=8, mem=16_384, slots=4, lease_ms=10**9)
    return "n1"


def test_reserved_victim_is_released_and_requeued_at_its_place(scripts: Scripts, redis_client: redis.Redis,
                                                              keys: PoolKeys) -> None:
    node = setup_node(scripts)
    free = free_of(redis_client, keys, node)
    victim = submit_task(scripts, resources=ONE_GPU)
    score = pending_score(redis_client, keys, victim)
    tag = place(scripts, victim, node, 0)

    assert scripts.preempt(victim, node, "urgent", 5000) is PreemptCode.REQUEUED

    t = task_hash(redis_client, keys, victim)
    assert (t["state"], t["preemptions"], t["retries"]) == ("PENDING", "1", "0")
    assert pending_ids(redis_client, keys) == [victim]
    assert pending_score(redis_client, keys, victim) == score  # its original place in line
    assert free_of(redis_client, keys, node) == free
    assert node_task_ids(redis_client, keys, node) == set()
    assert redis_client.hget(keys.preempting, "urgent") == b"n1"
    # Its message is still on the queue; the fence refuses it.
    assert scripts.start(victim, node, tag)[0] is StartCode.STALE
    assert_capacity_invariant(redis_client, keys)


def test_running_victim_is_marked_and_finish_requeues_it_uncharged(scripts: Scripts, redis_client: redis.Redis,
                                                                   keys: PoolKeys, clock: ControlledClock) -> None:
    node = setup_node(scripts)
    free = free_of(redis_client, keys, node)
    victim = submit_task(scripts, resources=ONE_GPU, max_retries=0)
    tag = place(scripts, victim, node, 0, start=True)
    held = free_of(redis_client, keys, node)

    assert scripts.preempt(victim, node, "urgent", 5000) is PreemptCode.STOPPING
    t = task_hash(redis_client, keys, victim)
    assert (t["state"], t["preempt_at"], t["preempt_by"], t["preempt_grace"]) == (
        "RUNNING", str(clock()), "urgent", "5000")
    assert free_of(redis_client, keys, node) == held  # nothing released until it has stopped
    assert scripts.preempt(victim, node, "other", 5000) is PreemptCode.ALREADY

    # The worker stopped it (SIGTERM raised in the task): with no retries left it is still requeued.
    assert scripts.finish(victim, node, tag, "failed", "Preempted: SIGTERM") == (FinishCode.OK, "PENDING")
    t = task_hash(redis_client, keys, victim)
    assert (t["state"], t["retries"], t["preemptions"]) == ("PENDING", "0", "1")
    assert "preempt_at" not in t and "preempt_by" not in t
    assert free_of(redis_client, keys, node) == free
    assert_capacity_invariant(redis_client, keys)

    # Placed again later, it runs as a new attempt and is no longer marked.
    tag2 = place(scripts, victim, node, 1, start=True)
    assert tag2 != tag
    assert scripts.finish(victim, node, tag2, "failed", "boom") == (FinishCode.OK, "FAILED")


def test_a_victim_that_succeeds_meanwhile_just_succeeds(scripts: Scripts, redis_client: redis.Redis,
                                                        keys: PoolKeys) -> None:
    node = setup_node(scripts)
    victim = submit_task(scripts, resources=ONE_GPU)
    tag = place(scripts, victim, node, 0, start=True)
    scripts.preempt(victim, node, "urgent", 5000)
    assert scripts.finish(victim, node, tag, "succeeded", "1") == (FinishCode.OK, "SUCCEEDED")


def test_refused_when_not_held_there(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys) -> None:
    node = setup_node(scripts)
    register_node(scripts, "n2", gpus=1, gpu_mem=40_000)
    pending = submit_task(scripts, resources=ONE_GPU)
    assert scripts.preempt(pending, node, "urgent", 0) is PreemptCode.NOT_HELD
    assert scripts.preempt("nope", node, "urgent", 0) is PreemptCode.NOT_FOUND
    elsewhere = submit_task(scripts, resources=ONE_GPU)
    place(scripts, elsewhere, "n2", 0)
    before = task_hash(redis_client, keys, elsewhere)
    assert scripts.preempt(elsewhere, node, "urgent", 0) is PreemptCode.NOT_HELD
    assert task_hash(redis_client, keys, elsewhere) == before
    assert redis_client.hlen(keys.preempting) == 0


def test_finish_learns_runtimes_per_name_and_gpu_kind(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys,
                                                   clock: ControlledClock) -> None:
    node = setup_node(scripts)
    for seconds, resources in ((10, ONE_GPU), (30, ONE_GPU), (5, Resources(gpus=0.5))):
        task = submit_task(scripts, resources=resources)
        tag = place(scripts, task, node, 0, start=True)
        clock.advance(seconds)
        scripts.finish(task, node, tag, "succeeded", "null")
    failed = submit_task(scripts, resources=ONE_GPU)
    tag = place(scripts, failed, node, 0, start=True)
    clock.advance(1000)
    scripts.finish(failed, node, tag, "failed", "boom")  # failures teach nothing

    learned = read_runtimes(redis_client, keys)
    assert learned == {("workers.tasks.probe", (1, 0)): 20.0, ("workers.tasks.probe", (0, 500)): 5.0,
                       ("workers.tasks.probe", None): 15.0}


def test_reserve_accepts_any_value_of_a_preference_list(scripts: Scripts, redis_client: redis.Redis,
                                                        keys: PoolKeys) -> None:
    register_node(scripts, "h100", gpus=1, gpu_mem=80_000, labels={"gpu": "H100"})
    register_node(scripts, "v100", gpus=1, gpu_mem=16_000, labels={"gpu": "V100"})
    either = Resources(gpus=1, labels={"gpu": ["A100", "H100"]})
    task = submit_task(scripts, resources=either)
    assert reserve_one(scripts, task, "v100", 0) is ReserveCode.LABEL_MISMATCH
    assert reserve_one(scripts, task, "h100", 0) is ReserveCode.OK
