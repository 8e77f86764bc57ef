"""cancel.lua against a real Redis: CANCELLED from PENDING (queued or delayed) and RESERVED; a
RUNNING task marked and its capacity kept until finish.lua ends it; revoke; ALREADY_FINAL, MOVED,
NOT_FOUND; a final record's expiry."""

from __future__ import annotations

import pytest
import redis

from broker.models import Resources
from broker.store.keys import PoolKeys
from broker.store.scripts import CancelCode, Scripts
from tests.invariants import (
    ControlledClock,
    assert_capacity_invariant,
    free_of,
    node_task_ids,
    pending_ids,
    place,
    queue_messages,
    register_node,
    request_of,
    submit_task,
    task_hash,
)

TASK = Resources(gpus=1, cpus=2, memory_mb=2048)


@pytest.fixture
def node(scripts: Scripts) -> str:
    register_node(scripts, "n1", gpus=2, gpu_mem=40_000, cpus=8, mem=16_384, slots=4)
    return "n1"


@pytest.mark.parametrize("node_id", [None, "n1", "elsewhere"])
def test_pending_task_leaves_the_queue(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys,
                                       clock: ControlledClock, node: str, *, node_id: str | None) -> None:
    task = submit_task(scripts, resources=TASK)
    other = submit_task(scripts, resources=TASK)
    free = free_of(redis_client, keys, node)
    clock.advance(1)

    assert scripts.cancel(task, node_id) == (CancelCode.CANCELLED, "PENDING")

    t = task_hash(redis_client, keys, task)
    assert (t["state"], t["finished_at"]) == ("CANCELLED", str(clock()))
    assert pending_ids(redis_client, keys) == [other]
    assert request_of(redis_client, keys, task) is None
    assert free_of(redis_client, keys, node) == free
    assert_capacity_invariant(redis_client, keys)


def test_delayed_task_leaves_its_wait(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys,
                                      clock: ControlledClock, node: str) -> None:
    task = submit_task(scripts, resources=TASK, not_before=clock() / 1000 + 60)
    assert redis_client.zscore(keys.delayed, task) is not None

    assert scripts.cancel(task, None) == (CancelCode.CANCELLED, "PENDING")

    assert task_hash(redis_client, keys, task)["state"] == "CANCELLED"
    assert redis_client.zcard(keys.delayed) == 0 and pending_ids(redis_client, keys) == []


def test_reserved_task_releases_its_reservation(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys,
                                                clock: ControlledClock, node: str) -> None:
    free = free_of(redis_client, keys, node)
    task = submit_task(scripts, resources=TASK)
    keep = submit_task(scripts, resources=TASK)
    place(scripts, task, node, 1)
    place(scripts, keep, node, 0)
    clock.advance(1)

    assert scripts.cancel(task, node) == (CancelCode.CANCELLED, "RESERVED")

    t = task_hash(redis_client, keys, task)
    assert (t["state"], t["finished_at"]) == ("CANCELLED", str(clock()))
    assert "alloc" not in t
    assert node_task_ids(redis_client, keys, node) == {keep}
    after = free_of(redis_client, keys, node)
    assert (after["g1_milli"], after["g1_mem"]) == (free["g1_milli"], free["g1_mem"])
    assert (after["free_cpu_m"], after["free_slots"]) == (free["free_cpu_m"] - 2000, free["free_slots"] - 1)
    assert pending_ids(redis_client, keys) == []
    # The queued message stays; start.lua drops it as CANCELLED when a worker takes it.
    assert len(queue_messages(redis_client, keys, node)) == 2
    assert_capacity_invariant(redis_client, keys)


@pytest.mark.parametrize("outcome", ["failed", "lost", "succeeded"])
def test_running_task_keeps_its_gpus_until_its_process_ends(scripts: Scripts, redis_client: redis.Redis,
                                                            keys: PoolKeys, clock: ControlledClock, node: str,
                                                            *, outcome: str) -> None:
    """The process may ignore SIGTERM for the whole grace period: until finish.lua records that it
    ended, its GPUs are not offered to another task."""
    task = submit_task(scripts, resources=TASK)
    tag = place(scripts, task, node, 1, start=True)
    held = free_of(redis_client, keys, node)
    clock.advance(1)

    assert scripts.cancel(task, None, grace_ms=5000) == (CancelCode.STOPPING, node)

    t = task_hash(redis_client, keys, task)
    assert (t["state"], t["cancel_at"], t["cancel_grace"]) == ("RUNNING", str(clock()), "5000")
    assert free_of(redis_client, keys, node) == held and node_task_ids(redis_client, keys, node) == {task}
    clock.advance(3)
    state = "SUCCEEDED" if outcome == "succeeded" else "CANCELLED"  # work that completed is kept
    assert scripts.finish(task, node, tag, outcome, "null" if outcome == "succeeded" else "Preempted: x")[1] == state
    assert task_hash(redis_client, keys, task)["state"] == state
    assert node_task_ids(redis_client, keys, node) == set()
    assert_capacity_invariant(redis_client, keys)


@pytest.mark.parametrize(("outcome", "state"), [("succeeded", "SUCCEEDED"), ("failed", "FAILED"),
                                                 ("lost", "CANCELLED"), ("retry", "CANCELLED")])
def test_revoke_lets_a_running_attempt_finish_but_runs_no_other(
        scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys, node: str, *, outcome: str, state: str) -> None:
    """Celery's revoke without terminate: what the attempt does counts; it is never run again."""
    task = submit_task(scripts, resources=TASK)
    tag = place(scripts, task, node, 0, start=True)

    assert scripts.cancel(task, node, "revoke") == (CancelCode.REVOKED, node)
    assert task_hash(redis_client, keys, task)["state"] == "RUNNING"

    assert scripts.finish(task, node, tag, outcome, "null" if outcome == "succeeded" else "x")[1] == state
    assert pending_ids(redis_client, keys) == [] and redis_client.zcard(keys.delayed) == 0
    assert_capacity_invariant(redis_client, keys)


def test_a_final_record_expires_with_its_idempotency_key(scripts: Scripts, redis_client: redis.Redis,
                                                         keys: PoolKeys, node: str) -> None:
    task = submit_task(scripts, resources=TASK, idempotency_key="k-1", result_ttl_ms=60_000)
    assert redis_client.pttl(keys.task(task)) == -1 and redis_client.pttl(keys.idempotency("k-1")) == -1

    scripts.cancel(task, None)

    assert 0 < redis_client.pttl(keys.task(task)) <= 60_000
    assert 0 < redis_client.pttl(keys.idempotency("k-1")) <= 60_000


@pytest.mark.parametrize("outcome", ["succeeded", "failed", "cancel"])
def test_already_final_changes_nothing(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys,
                                       clock: ControlledClock, node: str, *, outcome: str) -> None:
    task = submit_task(scripts, resources=TASK)
    tag = place(scripts, task, node, 0, start=True)
    if outcome == "cancel":
        scripts.cancel(task, node)
        scripts.finish(task, node, tag, "lost", "killed")
    else:
        scripts.finish(task, node, tag, outcome, "x")
    before = (task_hash(redis_client, keys, task), free_of(redis_client, keys, node))
    clock.advance(1)

    code, detail = scripts.cancel(task, node)

    assert code is CancelCode.ALREADY_FINAL
    assert detail == {"succeeded": "SUCCEEDED", "failed": "FAILED", "cancel": "CANCELLED"}[outcome]
    assert (task_hash(redis_client, keys, task), free_of(redis_client, keys, node)) == before
    assert_capacity_invariant(redis_client, keys)


@pytest.mark.parametrize("believed", [None, "n2"])
def test_moved_names_the_holder_and_changes_nothing(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys,
                                                    node: str, believed: str | None) -> None:
    register_node(scripts, "n2", gpus=1, gpu_mem=40_000)
    task = submit_task(scripts, resources=TASK)
    place(scripts, task, node, 0)
    before = (task_hash(redis_client, keys, task), free_of(redis_client, keys, node), free_of(redis_client, keys, "n2"))

    assert scripts.cancel(task, believed) == (CancelCode.MOVED, node)

    after = (task_hash(redis_client, keys, task), free_of(redis_client, keys, node), free_of(redis_client, keys, "n2"))
    assert after == before
    assert node_task_ids(redis_client, keys, node) == {task}
    # The retry Client.cancel makes with the node MOVED named succeeds.
    assert scripts.cancel(task, node) == (CancelCode.CANCELLED, "RESERVED")
    assert_capacity_invariant(redis_client, keys)


def test_not_found(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys) -> None:
    assert scripts.cancel("no-such-task", None) == (CancelCode.NOT_FOUND, "")
    assert not redis_client.exists(keys.task("no-such-task"))


def test_survives_script_flush(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys, node: str) -> None:
    task = submit_task(scripts, resources=TASK)
    place(scripts, task, node, 0)
    redis_client.script_flush()
    assert scripts.cancel(task, node) == (CancelCode.CANCELLED, "RESERVED")
    assert_capacity_invariant(redis_client, keys)
