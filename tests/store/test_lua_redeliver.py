"""redeliver.lua against a real Redis: a reserved task whose message is in neither the node queue
nor its unacked hash (a failover lost it) is queued again, byte for byte as reserve.lua queued it;
nothing else is, and the duplicate this may make is fenced by start.lua."""

from __future__ import annotations

import redis

from broker.models import Resources
from broker.store.keys import PoolKeys
from broker.store.scripts import Scripts, StartCode
from tests.invariants import assert_capacity_invariant, place, register_node, submit_task, task_hash


def _reserved(scripts: Scripts, client: redis.Redis, keys: PoolKeys) -> tuple[str, str, bytes]:
    register_node(scripts, "n1", gpus=2, gpu_mem=24_000, slots=4)
    task = submit_task(scripts, resources=Resources(gpus=1), tenant="team-a")
    tag = place(scripts, task, "n1", 1)
    (message,) = client.lrange(keys.queue("n1"), 0, -1)
    return task, tag, message


def test_a_message_in_no_queue_is_queued_again_as_reserve_built_it(scripts: Scripts, redis_client: redis.Redis,
                                                                    keys: PoolKeys) -> None:
    task, _tag, message = _reserved(scripts, redis_client, keys)
    redis_client.rpop(keys.queue("n1"))  # the worker's pop survived the failover, its unacked write did not

    assert scripts.redeliver("n1")[0] == [task]
    assert redis_client.lrange(keys.queue("n1"), 0, -1) == [message]
    assert scripts.redeliver("n1")[0] == []  # queued now: not again
    assert redis_client.llen(keys.queue("n1")) == 1
    assert task_hash(redis_client, keys, task)["state"] == "RESERVED"
    assert_capacity_invariant(redis_client, keys)


def test_a_queued_or_unacked_message_is_left_alone(scripts: Scripts, redis_client: redis.Redis,
                                                   keys: PoolKeys) -> None:
    _task, tag, message = _reserved(scripts, redis_client, keys)
    assert scripts.redeliver("n1")[0] == []  # still on the queue
    redis_client.rpop(keys.queue("n1"))
    redis_client.hset(keys.unacked("n1"), tag, message)  # taken by the worker, not acknowledged yet
    assert scripts.redeliver("n1")[0] == []
    assert redis_client.llen(keys.queue("n1")) == 0


def test_running_finished_or_other_nodes_tasks_are_not_queued(scripts: Scripts, redis_client: redis.Redis,
                                                              keys: PoolKeys) -> None:
    task, tag, _ = _reserved(scripts, redis_client, keys)
    redis_client.rpop(keys.queue("n1"))
    assert scripts.start(task, "n1", tag)[0] is StartCode.OK
    assert scripts.redeliver("n1")[0] == []
    register_node(scripts, "n2", gpus=1, gpu_mem=24_000)
    assert scripts.redeliver("n2")[0] == []
    scripts.finish(task, "n1", tag, "succeeded", "null")
    assert scripts.redeliver("n1")[0] == []
    assert redis_client.llen(keys.queue("n1")) == 0


def test_the_duplicate_a_redelivery_can_make_runs_once(scripts: Scripts, redis_client: redis.Redis,
                                                       keys: PoolKeys) -> None:
    """Both copies carry the attempt's tag: start.lua lets the first run and drops the second."""
    task, tag, _ = _reserved(scripts, redis_client, keys)
    redis_client.rpop(keys.queue("n1"))  # in the worker's hands (say), and looked for meanwhile
    assert scripts.redeliver("n1")[0] == [task]
    assert scripts.start(task, "n1", tag)[0] is StartCode.OK
    assert scripts.start(task, "n1", tag)[0] is StartCode.ALREADY_RUNNING
    scripts.finish(task, "n1", tag, "succeeded", "null")
    assert scripts.start(task, "n1", tag)[0] is StartCode.STALE
    assert_capacity_invariant(redis_client, keys)


def test_a_periodic_look_queues_only_what_the_last_look_also_found_missing(
        scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys) -> None:
    """A message the worker acknowledged and has not started yet is in neither place for a
    moment: the first look only notes it; a second look queues it only if it is still missing
    with the same tag, and a confirm list naming another tag queues nothing."""
    task, tag, _message = _reserved(scripts, redis_client, keys)
    redis_client.rpop(keys.queue("n1"))
    pushed, missing = scripts.redeliver("n1", confirm=[])
    assert (pushed, missing) == ([], [f"{task}:{tag}"])
    assert redis_client.llen(keys.queue("n1")) == 0
    assert scripts.redeliver("n1", confirm=[f"{task}:some-other-tag"])[0] == []
    assert scripts.redeliver("n1", confirm=missing)[0] == [task]
    assert redis_client.llen(keys.queue("n1")) == 1
