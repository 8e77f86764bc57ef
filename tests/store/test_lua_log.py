"""log.lua against a real Redis: only the attempt that holds a running task keeps its output there,
and what it kept outlives the attempt."""

from __future__ import annotations

import pytest
import redis

from broker.models import Resources
from broker.store.keys import PoolKeys
from broker.store.scripts import LogCode, Scripts
from tests.invariants import place, register_node, submit_task, task_hash


@pytest.fixture
def node(scripts: Scripts) -> str:
    register_node(scripts, "n1", gpus=1, gpu_mem=40_000)
    return "n1"


def test_the_running_attempt_keeps_its_tail_and_it_outlives_the_attempt(
        scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys, node: str) -> None:
    task = submit_task(scripts, resources=Resources(gpus=1))
    tag = place(scripts, task, node, 0, start=True)
    attempt = tag.rpartition(".")[2]

    assert scripts.log(task, tag, b"hello\n", 6, "n1:/logs/a.log") is LogCode.OK
    assert scripts.log(task, tag, b"world\n", 12) is LogCode.OK  # a later tail; the file stays
    scripts.finish(task, node, tag, "succeeded", "null")

    t = task_hash(redis_client, keys, task)
    assert (t[f"log:{attempt}"], t[f"log_size:{attempt}"], t[f"log_file:{attempt}"]) == (
        "world\n", "12", "n1:/logs/a.log")


def test_others_change_nothing(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys, node: str) -> None:
    task = submit_task(scripts, resources=Resources(gpus=1))
    tag = place(scripts, task, node, 0)
    assert scripts.log(task, tag, b"x", 1) is LogCode.STALE  # not started yet
    scripts.start(task, node, tag)
    assert scripts.log(task, f"{task}.0", b"x", 1) is LogCode.STALE  # an older attempt
    assert scripts.log("nope", tag, b"x", 1) is LogCode.NOT_FOUND
    scripts.finish(task, node, tag, "succeeded", "null")
    assert scripts.log(task, tag, b"x", 1) is LogCode.STALE  # ended: the record is final
    assert not [f for f in task_hash(redis_client, keys, task) if f.startswith("log")]
