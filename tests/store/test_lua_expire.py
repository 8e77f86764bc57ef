"""expire.lua against a real Redis: a task not started by its expires time is cancelled, and gives back
what it holds; a running one is left to finish."""

from __future__ import annotations

import pytest
import redis

from broker.models import Resources
from broker.store.keys import PoolKeys
from broker.store.scripts import Scripts
from tests.invariants import (
    ControlledClock,
    assert_capacity_invariant,
    assert_membership_invariant,
    node_task_ids,
    pending_ids,
    place,
    register_node,
    submit_task,
    task_hash,
)


@pytest.fixture
def node(scripts: Scripts) -> str:
    register_node(scripts, "n1", gpus=2, gpu_mem=40_000)
    return "n1"


@pytest.mark.parametrize("where", ["queued", "delayed", "reserved"])
def test_a_task_not_started_in_time_is_cancelled(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys,
                                                 clock: ControlledClock, node: str, *, where: str) -> None:
    now = clock() / 1000
    task = submit_task(scripts, resources=Resources(gpus=1), expires_at=now + 10,
                       not_before=now + 30 if where == "delayed" else None, idempotency_key="k", result_ttl_ms=5000)
    if where == "reserved":
        place(scripts, task, node, 0)
    clock.advance(9)
    assert scripts.expire() == []

    clock.advance(1)
    assert scripts.expire() == [task]

    t = task_hash(redis_client, keys, task)
    assert (t["state"], t["finished_at"]) == ("CANCELLED", str(clock()))
    assert t["error"].startswith("expired")
    assert pending_ids(redis_client, keys) == [] and redis_client.zcard(keys.delayed) == 0
    assert node_task_ids(redis_client, keys, node) == set()
    assert redis_client.zcard(keys.expiring) == 0
    assert 0 < redis_client.pttl(keys.task(task)) <= 5000 and 0 < redis_client.pttl(keys.idempotency("k")) <= 5000
    assert_capacity_invariant(redis_client, keys)
    assert_membership_invariant(redis_client, keys)


def test_a_running_task_is_left_to_finish(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys,
                                          clock: ControlledClock, node: str) -> None:
    task = submit_task(scripts, resources=Resources(gpus=1), expires_at=clock() / 1000 + 10)
    place(scripts, task, node, 0, start=True)
    clock.advance(20)
    assert scripts.expire() == []
    assert task_hash(redis_client, keys, task)["state"] == "RUNNING"
    assert redis_client.zcard(keys.expiring) == 0
