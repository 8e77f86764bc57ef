"""progress.lua against a real Redis: only the attempt that holds a running task records its progress."""

from __future__ import annotations

import pytest
import redis

from broker.models import Resources
from broker.store.keys import PoolKeys
from broker.store.reads import read_running
from broker.store.scripts import ProgressCode, Scripts
from tests.invariants import ControlledClock, place, register_node, submit_task, task_hash


@pytest.fixture
def node(scripts: Scripts) -> str:
    register_node(scripts, "n1", gpus=1, gpu_mem=40_000)
    return "n1"


def test_the_running_attempt_records_its_state_and_meta(scripts: Scripts, redis_client: redis.Redis,
                                                        keys: PoolKeys, clock: ControlledClock, node: str) -> None:
    task = submit_task(scripts, resources=Resources(gpus=1))
    tag = place(scripts, task, node, 0, start=True)

    assert scripts.progress(task, tag, "PROGRESS", '{"step": 3}') is ProgressCode.OK

    t = task_hash(redis_client, keys, task)
    assert (t["progress_state"], t["progress"], t["progress_at"]) == ("PROGRESS", '{"step": 3}', str(clock()))


def test_others_change_nothing(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys, node: str) -> None:
    task = submit_task(scripts, resources=Resources(gpus=1))
    tag = place(scripts, task, node, 0)
    assert scripts.progress(task, tag, "PROGRESS", "{}") is ProgressCode.STALE  # not started yet
    scripts.start(task, node, tag)
    assert scripts.progress(task, f"{task}.0", "PROGRESS", "{}") is ProgressCode.STALE  # an older attempt
    assert scripts.progress("nope", tag, "PROGRESS", "{}") is ProgressCode.NOT_FOUND
    assert "progress_state" not in task_hash(redis_client, keys, task)


def test_a_requeue_clears_it(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys, node: str) -> None:
    task = submit_task(scripts, resources=Resources(gpus=1))
    tag = place(scripts, task, node, 0, start=True)
    scripts.progress(task, tag, "PROGRESS", "{}")
    scripts.finish(task, node, tag, "lost", "worker lost")
    assert "progress_state" not in task_hash(redis_client, keys, task)



def test_a_checkpoint_is_kept_across_attempts_and_read_by_the_planner(
        scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys, clock: ControlledClock, node: str) -> None:
    task = submit_task(scripts, resources=Resources(gpus=1))
    tag = place(scripts, task, node, 0, start=True)
    [before] = read_running(redis_client, keys, [node])
    assert before.checkpoint_at is None
    clock.advance(5)
    assert scripts.progress(task, tag, "CHECKPOINT", '{"step": 7}') is ProgressCode.OK
    t = task_hash(redis_client, keys, task)
    assert (t["checkpoint"], t["checkpoint_at"], t["progress_state"]) == ('{"step": 7}', str(clock()), "CHECKPOINT")
    [run] = read_running(redis_client, keys, [node])
    assert run.checkpoint_at == clock() / 1000
    assert run.work_at_risk(clock() / 1000 + 2) == pytest.approx(2)  # from the checkpoint, not the start (7 s)
    assert scripts.progress(task, f"{task}.0", "CHECKPOINT", '{"step": 99}') is ProgressCode.STALE
    scripts.finish(task, node, tag, "lost", "worker lost")  # requeued: the checkpoint stays for the next attempt
    t = task_hash(redis_client, keys, task)
    assert t["state"] == "PENDING" and t["checkpoint"] == '{"step": 7}' and "progress_state" not in t
