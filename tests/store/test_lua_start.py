"""start.lua against a real Redis: the fence before a task runs (OK, NOT_FOUND, CANCELLED, STALE, ALREADY_RUNNING)."""

from __future__ import annotations

import pytest
import redis

from broker.models import Resources
from broker.store.keys import PoolKeys
from broker.store.scripts import Scripts, StartCode
from tests.invariants import (
    ControlledClock,
    assert_capacity_invariant,
    place,
    register_node,
    submit_task,
    task_hash,
)


@pytest.fixture
def node(scripts: Scripts) -> str:
    register_node(scripts, "n1", gpus=4, gpu_mem=24_000)
    return "n1"


def test_ok_runs_the_reserved_attempt(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys,
                                      clock: ControlledClock, node: str) -> None:
    task = submit_task(scripts, resources=Resources(gpus=2))
    tag = place(scripts, task, node, 3, 1)
    clock.advance(2)

    assert scripts.start(task, node, tag) == (StartCode.OK, "3,1")

    t = task_hash(redis_client, keys, task)
    assert (t["state"], t["started_at"], t["tag"], t["node"]) == ("RUNNING", str(clock()), tag, node)
    assert_capacity_invariant(redis_client, keys)


def test_ok_for_a_cpu_task_has_no_gpus(scripts: Scripts, node: str) -> None:
    task = submit_task(scripts)
    assert scripts.start(task, node, place(scripts, task, node)) == (StartCode.OK, "")


def test_not_found(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys) -> None:
    assert scripts.start("no-such-task", "n1", "no-such-task.1") == (StartCode.NOT_FOUND, "")
    assert not redis_client.exists(keys.task("no-such-task"))


@pytest.mark.parametrize("started", [False, True], ids=["reserved", "running"])
def test_cancelled_message_is_dropped(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys, node: str,
                                      started: bool) -> None:
    task = submit_task(scripts, resources=Resources(gpus=1))
    tag = place(scripts, task, node, 0, start=started)
    scripts.cancel(task, node)
    if started:  # a cancelled running task ends when its process does
        scripts.finish(task, node, tag, "lost", "SIGKILL after the grace period")
    assert scripts.start(task, node, tag) == (StartCode.CANCELLED, "")
    assert task_hash(redis_client, keys, task)["state"] == "CANCELLED"
    assert_capacity_invariant(redis_client, keys)


def test_stale_tag_or_node(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys, node: str) -> None:
    register_node(scripts, "n2", gpus=1, gpu_mem=24_000)
    task = submit_task(scripts, resources=Resources(gpus=1))
    tag = place(scripts, task, node, 0)
    before = task_hash(redis_client, keys, task)

    assert scripts.start(task, node, f"{task}.2") == (StartCode.STALE, "")
    assert scripts.start(task, "n2", tag) == (StartCode.STALE, "")
    assert task_hash(redis_client, keys, task) == before


def test_stale_after_requeue_and_after_finish(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys,
                                              node: str) -> None:
    task = submit_task(scripts, resources=Resources(gpus=1))
    first = place(scripts, task, node, 0, start=True)
    scripts.finish(task, node, first, "lost", "worker lost")
    assert task_hash(redis_client, keys, task)["state"] == "PENDING"
    assert scripts.start(task, node, first) == (StartCode.STALE, "")  # a redelivery of attempt 1

    second = place(scripts, task, node, 1, start=True)
    assert scripts.start(task, node, first) == (StartCode.STALE, "")
    scripts.finish(task, node, second, "succeeded", "{}")
    assert scripts.start(task, node, second) == (StartCode.STALE, "")
    assert task_hash(redis_client, keys, task)["state"] == "SUCCEEDED"
    assert_capacity_invariant(redis_client, keys)


def test_already_running_is_a_redelivery(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys,
                                         clock: ControlledClock, node: str) -> None:
    task = submit_task(scripts, resources=Resources(gpus=1))
    tag = place(scripts, task, node, 2, start=True)
    started_at = task_hash(redis_client, keys, task)["started_at"]
    clock.advance(5)

    assert scripts.start(task, node, tag) == (StartCode.ALREADY_RUNNING, "")
    assert task_hash(redis_client, keys, task)["started_at"] == started_at


def test_survives_script_flush(scripts: Scripts, redis_client: redis.Redis, node: str) -> None:
    task = submit_task(scripts, resources=Resources(gpus=1))
    tag = place(scripts, task, node, 0)
    redis_client.script_flush()
    assert scripts.start(task, node, tag) == (StartCode.OK, "0")


def test_a_replaced_worker_process_is_fenced_off(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys,
                                                 node: str) -> None:
    """A worker that hung and came back after a new incarnation registered under its node id must not
    run what was reserved for its successor (both read the node's queue)."""
    task = submit_task(scripts, resources=Resources(gpus=1))
    register_node(scripts, node, gpus=4, gpu_mem=24_000, incarnation="inc-2")
    tag = place(scripts, task, node, 0)
    before = task_hash(redis_client, keys, task)
    assert scripts.start(task, node, tag, 123, "inc-1") == (StartCode.FENCED, "")
    assert task_hash(redis_client, keys, task) == before
    assert scripts.start(task, node, tag, 124, "inc-2") == (StartCode.OK, "0")
    assert task_hash(redis_client, keys, task)["pid"] == "124"


def test_the_log_file_is_recorded_for_the_attempt_that_starts_and_for_no_other(
        scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys, node: str) -> None:
    task = submit_task(scripts, resources=Resources(gpus=1))
    tag = place(scripts, task, node, 0)
    assert scripts.start(task, node, f"{task}.9", log_file="n1:/logs/9.log")[0] is StartCode.STALE
    assert scripts.start(task, node, tag, log_file="n1:/logs/1.log")[0] is StartCode.OK
    t = task_hash(redis_client, keys, task)
    attempt = tag.rpartition(".")[2]
    assert {k: v for k, v in t.items() if k.startswith("log")} == {f"log_file:{attempt}": "n1:/logs/1.log"}
