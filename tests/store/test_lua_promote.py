"""promote.lua against a real Redis: delayed tasks join the queue at their time, at their place in line."""

from __future__ import annotations

import redis

from broker.store.keys import PoolKeys
from broker.store.scripts import Scripts
from tests.invariants import (
    ControlledClock,
    assert_membership_invariant,
    pending_ids,
    request_of,
    submit_task,
    task_hash,
)


def test_due_tasks_join_the_queue_at_their_original_place(scripts: Scripts, redis_client: redis.Redis,
                                                          keys: PoolKeys, clock: ControlledClock) -> None:
    now = clock() / 1000
    early = submit_task(scripts, task_id="early", not_before=now + 10)  # submitted first: ahead in line
    late = submit_task(scripts, task_id="late", not_before=now + 30)
    ready = submit_task(scripts, task_id="ready")
    assert scripts.promote() == 0 and pending_ids(redis_client, keys) == [ready]

    clock.advance(10)
    assert scripts.promote() == 1

    assert pending_ids(redis_client, keys) == [early, ready]  # by score: submit order, not promotion order
    assert request_of(redis_client, keys, early) == task_hash(redis_client, keys, early)["req"]
    assert "not_before" not in task_hash(redis_client, keys, early)
    assert redis_client.zrange(keys.delayed, 0, -1) == [late.encode()]
    assert_membership_invariant(redis_client, keys)
    clock.advance(20)
    assert scripts.promote() == 1 and pending_ids(redis_client, keys) == [early, late, ready]


def test_a_task_that_left_meanwhile_is_dropped_from_delayed(scripts: Scripts, redis_client: redis.Redis,
                                                            keys: PoolKeys, clock: ControlledClock) -> None:
    task = submit_task(scripts, not_before=clock() / 1000 + 5)
    redis_client.hset(keys.task(task), "state", "CANCELLED")  # as if cancelled by a script of an older version
    clock.advance(5)
    assert scripts.promote() == 0
    assert pending_ids(redis_client, keys) == [] and redis_client.zcard(keys.delayed) == 0


def test_publishes_a_wake_up_only_when_it_moved_something(scripts: Scripts, redis_client: redis.Redis,
                                                          keys: PoolKeys, clock: ControlledClock) -> None:
    submit_task(scripts, not_before=clock() / 1000 + 5)
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.wake)
    pubsub.get_message(timeout=1)
    scripts.promote()
    assert pubsub.get_message(timeout=0.2) is None
    clock.advance(5)
    scripts.promote()
    message = pubsub.get_message(timeout=1)
    pubsub.close()
    assert message is not None and message["data"] == b"promote"
