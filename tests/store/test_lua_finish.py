"""finish.lua against a real Redis: outcomes, requeue on a lost worker, the tag fence, release exactly once."""

from __future__ import annotations

import pytest
import redis

from broker.models import Resources
from broker.store.keys import PoolKeys
from broker.store.scripts import FinishCode, Scripts
from tests.invariants import (
    ControlledClock,
    assert_capacity_invariant,
    free_of,
    node_task_ids,
    pending_ids,
    pending_score,
    place,
    register_node,
    request_of,
    submit_task,
    task_hash,
)

TASK = Resources(gpus=0.5, cpus=2, memory_mb=2048)


@pytest.fixture
def node(scripts: Scripts) -> str:
    register_node(scripts, "n1", gpus=2, gpu_mem=40_000, cpus=8, mem=16_384, slots=4)
    return "n1"


@pytest.mark.parametrize("started", [True, False], ids=["running", "reserved"])
@pytest.mark.parametrize(("outcome", "state", "field"), [("succeeded", "SUCCEEDED", "result"),
                                                         ("failed", "FAILED", "error")])
def test_final_outcomes_release_the_reservation(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys,
                                                clock: ControlledClock, node: str, *, started: bool, outcome: str,
                                                state: str, field: str) -> None:
    free = free_of(redis_client, keys, node)
    task = submit_task(scripts, resources=TASK)
    tag = place(scripts, task, node, 1, start=started)
    clock.advance(3)
    payload = '{"answer": 42}' if outcome == "succeeded" else "ValueError: boom"

    assert scripts.finish(task, node, tag, outcome, payload) == (FinishCode.OK, state)

    t = task_hash(redis_client, keys, task)
    assert (t["state"], t[field], t["finished_at"]) == (state, payload, str(clock()))
    assert "alloc" not in t
    assert (t["attempts"], t["retries"]) == ("1", "0")
    assert free_of(redis_client, keys, node) == free
    assert node_task_ids(redis_client, keys, node) == set()
    assert pending_ids(redis_client, keys) == []
    assert_capacity_invariant(redis_client, keys)


def test_lost_requeues_at_its_original_place_until_the_retry_limit(scripts: Scripts, redis_client: redis.Redis,
                                                                   keys: PoolKeys, clock: ControlledClock,
                                                                   node: str) -> None:
    free = free_of(redis_client, keys, node)
    task = submit_task(scripts, resources=TASK, max_retries=2)
    later = submit_task(scripts, resources=TASK)
    score, wire = pending_score(redis_client, keys, task), request_of(redis_client, keys, task)

    for attempt in (1, 2):
        tag = place(scripts, task, node, 0, start=True)
        assert tag == f"{task}.{attempt}"
        clock.advance(1)
        assert scripts.finish(task, node, tag, "lost", "worker lost") == (FinishCode.OK, "PENDING")
        t = task_hash(redis_client, keys, task)
        assert (t["state"], t["attempts"], t["retries"]) == ("PENDING", str(attempt), str(attempt))
        assert t["requeued_at"] == str(clock())
        assert not {"node", "gpus", "tag", "alloc", "reserved_at", "started_at"} & t.keys()
        assert pending_ids(redis_client, keys) == [task, later]  # ahead of the task submitted after it
        assert pending_score(redis_client, keys, task) == score
        assert request_of(redis_client, keys, task) == wire
        assert free_of(redis_client, keys, node) == free
        assert_capacity_invariant(redis_client, keys)

    tag = place(scripts, task, node, 0, start=True)
    assert scripts.finish(task, node, tag, "lost", "worker lost") == (FinishCode.OK, "FAILED")
    t = task_hash(redis_client, keys, task)
    assert (t["state"], t["attempts"], t["retries"]) == ("FAILED", "3", "3")
    assert t["error"] == "worker lost (retry limit reached)"
    assert t["finished_at"] == str(clock())
    assert pending_ids(redis_client, keys) == [later]
    assert request_of(redis_client, keys, task) is None
    assert free_of(redis_client, keys, node) == free
    assert_capacity_invariant(redis_client, keys)


def test_lost_with_no_retries_fails_at_once(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys,
                                            node: str) -> None:
    task = submit_task(scripts, resources=TASK, max_retries=0)
    tag = place(scripts, task, node, 0, start=True)
    assert scripts.finish(task, node, tag, "lost", "SIGKILL") == (FinishCode.OK, "FAILED")
    assert task_hash(redis_client, keys, task)["error"] == "SIGKILL (retry limit reached)"
    assert pending_ids(redis_client, keys) == []
    assert_capacity_invariant(redis_client, keys)


def test_not_found(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys, node: str) -> None:
    free = free_of(redis_client, keys, node)
    assert scripts.finish("no-such-task", node, "no-such-task.1", "succeeded", "{}") == (FinishCode.NOT_FOUND, "")
    assert not redis_client.exists(keys.task("no-such-task"))
    assert free_of(redis_client, keys, node) == free


@pytest.mark.parametrize("wrong", ["tag", "node"])
def test_stale_attempt_changes_nothing(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys, node: str,
                                       wrong: str) -> None:
    register_node(scripts, "n2", gpus=1, gpu_mem=40_000)
    task = submit_task(scripts, resources=TASK)
    tag = place(scripts, task, node, 0, start=True)
    before = (task_hash(redis_client, keys, task), free_of(redis_client, keys, node), free_of(redis_client, keys, "n2"))
    args = (node, f"{task}.2") if wrong == "tag" else ("n2", tag)

    assert scripts.finish(task, *args, "succeeded", "{}") == (FinishCode.STALE, "RUNNING")

    after = (task_hash(redis_client, keys, task), free_of(redis_client, keys, node), free_of(redis_client, keys, "n2"))
    assert after == before
    assert_capacity_invariant(redis_client, keys)


@pytest.mark.parametrize("first", ["succeeded", "failed", "lost"])
def test_second_finish_is_stale_and_releases_nothing(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys,
                                                     node: str, first: str) -> None:
    free = free_of(redis_client, keys, node)
    task = submit_task(scripts, resources=TASK)
    other = submit_task(scripts, resources=TASK)
    tag = place(scripts, task, node, 0, start=True)
    place(scripts, other, node, 0, start=True)  # shares the GPU, so a double release would show
    (_, state) = scripts.finish(task, node, tag, first, "x")
    after_first = (task_hash(redis_client, keys, task), free_of(redis_client, keys, node))

    assert scripts.finish(task, node, tag, "succeeded", "{}") == (FinishCode.STALE, state)

    assert (task_hash(redis_client, keys, task), free_of(redis_client, keys, node)) == after_first
    g0 = free_of(redis_client, keys, node)["g0_milli"]
    assert g0 == free["g0_milli"] - 500  # only `other` holds it now
    assert_capacity_invariant(redis_client, keys)


def test_stale_on_a_cancelled_task(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys, node: str) -> None:
    task = submit_task(scripts, resources=TASK)
    tag = place(scripts, task, node, 0)
    scripts.cancel(task, node)  # reserved: CANCELLED and released at once
    free = free_of(redis_client, keys, node)
    assert scripts.finish(task, node, tag, "failed", "SIGTERM") == (FinishCode.STALE, "CANCELLED")
    assert free_of(redis_client, keys, node) == free
    assert_capacity_invariant(redis_client, keys)


def test_bad_outcome_changes_nothing(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys,
                                     node: str) -> None:
    task = submit_task(scripts, resources=TASK)
    tag = place(scripts, task, node, 0, start=True)
    before = (task_hash(redis_client, keys, task), free_of(redis_client, keys, node))

    assert scripts.finish(task, node, tag, "exploded", "?") == (FinishCode.BAD_OUTCOME, "RUNNING")

    assert (task_hash(redis_client, keys, task), free_of(redis_client, keys, node)) == before
    assert node_task_ids(redis_client, keys, node) == {task}
    assert_capacity_invariant(redis_client, keys)


def test_survives_script_flush(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys, node: str) -> None:
    task = submit_task(scripts, resources=TASK)
    tag = place(scripts, task, node, 0, start=True)
    redis_client.script_flush()
    assert scripts.finish(task, node, tag, "succeeded", "null") == (FinishCode.OK, "SUCCEEDED")
    assert_capacity_invariant(redis_client, keys)


@pytest.mark.parametrize("wait_s", [0, 30])
def test_a_retry_ends_the_attempt_with_the_new_message(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys,
                                                       clock: ControlledClock, node: str, *, wait_s: int) -> None:
    """Celery's self.retry(countdown=...): capacity back at once; the task waits, holding nothing,
    with the message Celery built for the retry (its retries header counts up)."""
    free = free_of(redis_client, keys, node)
    task = submit_task(scripts, resources=TASK)
    tag = place(scripts, task, node, 0, start=True)
    not_before = clock() / 1000 + wait_s

    assert scripts.finish(task, node, tag, "retry", '{"retry": 1}', "Retry in 30s", not_before) == (
        FinishCode.OK, "PENDING")

    t = task_hash(redis_client, keys, task)
    assert (t["state"], t["message"], t["retried"], t["retry_reason"]) == ("PENDING", '{"retry": 1}', "1",
                                                                           "Retry in 30s")
    assert "node" not in t and "alloc" not in t and t["retries"] == "0"  # Celery counts its own retries
    assert free_of(redis_client, keys, node) == free and node_task_ids(redis_client, keys, node) == set()
    if wait_s:
        assert pending_ids(redis_client, keys) == [] and redis_client.zscore(keys.delayed, task) == not_before * 1000
    else:
        assert pending_ids(redis_client, keys) == [task]
    assert_capacity_invariant(redis_client, keys)


def test_a_failure_keeps_its_exception(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys,
                                       node: str) -> None:
    task = submit_task(scripts, resources=TASK, result_ttl_ms=60_000)
    tag = place(scripts, task, node, 0, start=True)
    exc = '{"exc_type": "ValueError", "exc_module": "builtins", "exc_message": ["bad"], "traceback": "..."}'
    assert scripts.finish(task, node, tag, "failed", "ValueError: bad", exc) == (FinishCode.OK, "FAILED")
    t = task_hash(redis_client, keys, task)
    assert (t["error"], t["exc"]) == ("ValueError: bad", exc)
    assert 0 < redis_client.pttl(keys.task(task)) <= 60_000  # kept for result_expires


def test_a_replaced_worker_process_cannot_report(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys,
                                                 node: str) -> None:
    """Its successor runs the attempt now: a late 'lost' from the old process must not requeue it."""
    task = submit_task(scripts, resources=TASK)
    register_node(scripts, node, gpus=2, gpu_mem=40_000, cpus=8, mem=16_384, slots=4, incarnation="inc-2")
    tag = place(scripts, task, node, 0, start=True)
    before = task_hash(redis_client, keys, task)
    assert scripts.finish(task, node, tag, "lost", "killed", incarnation="inc-1") == (FinishCode.STALE, "RUNNING")
    assert task_hash(redis_client, keys, task) == before
    assert scripts.finish(task, node, tag, "succeeded", "1", incarnation="inc-2") == (FinishCode.OK, "SUCCEEDED")

