"""log.lua against a real Redis: an attempt keeps its own output with its task, in any state (a
last copy may come after its outcome), never another attempt's, and what it kept outlives it."""

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


def test_a_copy_after_the_outcome_is_kept_and_an_attempt_writes_only_its_own(
        scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys, node: str) -> None:
    task = submit_task(scripts, resources=Resources(gpus=1))
    first = place(scripts, task, node, 0, start=True)
    scripts.finish(task, node, first, "lost", "worker lost")  # back in line: attempt 2 next
    assert scripts.log(task, first, b"one\n", 4, "n1:/logs/1.log") is LogCode.OK  # after its outcome
    second = place(scripts, task, node, 0, start=True)
    assert scripts.log(task, second, b"two\n", 4, "n1:/logs/2.log") is LogCode.OK
    assert scripts.log(task, first, b"late\n", 5) is LogCode.OK  # attempt 1 again: its own fields only
    scripts.finish(task, node, second, "succeeded", "null")
    assert scripts.log(task, second, b"two, last\n", 10) is LogCode.OK  # the copy that missed the finish

    t = task_hash(redis_client, keys, task)
    assert {f: v for f, v in t.items() if f.startswith("log")} == {
        "log:1": "late\n", "log_size:1": "5", "log_file:1": "n1:/logs/1.log",
        "log:2": "two, last\n", "log_size:2": "10", "log_file:2": "n1:/logs/2.log"}


def test_others_change_nothing(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys, node: str) -> None:
    task = submit_task(scripts, resources=Resources(gpus=1))
    tag = place(scripts, task, node, 0, start=True)
    assert scripts.log(task, f"{task}.2", b"x", 1) is LogCode.STALE  # an attempt it has not had
    assert scripts.log(task, f"{task}.0", b"x", 1) is LogCode.STALE  # no such attempt
    assert scripts.log(task, f"{task}.x", b"x", 1) is LogCode.STALE  # not a number
    assert scripts.log("nope", tag, b"x", 1) is LogCode.NOT_FOUND
    assert not redis_client.exists(keys.task("nope")), "no record is made up"
    assert not [f for f in task_hash(redis_client, keys, task) if f.startswith("log")]
