"""finish.lua's hand-off (_handoff.lua, setting ``handoff``): an attempt that ends its task passes
its reservation to the head of the queue when that asks exactly the same, in the same script.
Against a real Redis, with the pool invariants (capacity, membership, every RESERVED task's
message on its node's queue) checked after each step."""

from __future__ import annotations

import json

import pytest
import redis

from broker.dispatcher import Dispatcher
from broker.models import Resources
from broker.settings import Settings
from broker.store.keys import PoolKeys
from broker.store.scripts import FinishCode, Scripts
from tests.conftest import Clock
from tests.invariants import (
    PROBE,
    assert_pool_invariants,
    free_of,
    pending_ids,
    place,
    queued_envelopes,
    register_node,
    submit_task,
    tag_of,
    task_hash,
    woken,
)

GPU = Resources(gpus=1)


def publish(redis_client: redis.Redis, keys: PoolKeys, clock: Clock, handoff: str = "always",
            **settings: object) -> None:
    """What a dispatcher started with these settings tells the pool."""
    Dispatcher(Settings(pool=keys.pool, handoff=handoff, **settings), clock, redis_client).publish_config()


def running(scripts: Scripts, node: str = "n1", gpus: tuple[int, ...] = (1,), **options: object) -> tuple[str, str]:
    """A GPU task reserved on ``node`` GPUs ``gpus`` and started; (id, tag)."""
    task = submit_task(scripts, resources=GPU, **options)  # type: ignore[arg-type]
    return task, place(scripts, task, node, *gpus, start=True)


def test_an_ended_attempt_passes_its_place_to_a_head_that_asks_the_same(
        scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys, clock: Clock,
        wakes: redis.client.PubSub) -> None:
    publish(redis_client, keys, clock)
    register_node(scripts, "n1", gpus=2, gpu_mem=1000, slots=2)
    done, tag = running(scripts)
    alloc = task_hash(redis_client, keys, done)["alloc"]
    free = free_of(redis_client, keys, "n1")
    head, behind = submit_task(scripts, resources=GPU), submit_task(scripts, resources=GPU)
    woken(wakes)
    changed = redis_client.zscore(keys.changes, "n1")

    assert scripts.finish(done, "n1", tag, "succeeded", "7") == (FinishCode.OK, "SUCCEEDED")
    assert redis_client.zscore(keys.changes, "n1") == changed  # a dispatcher has nothing of n1 to read again
    h = task_hash(redis_client, keys, head)
    assert (h["state"], h["node"], h["gpus"], h["alloc"], h["attempts"]) == ("RESERVED", "n1", "1", alloc, "1")
    assert [e["headers"]["id"] for e in queued_envelopes(redis_client, keys, "n1")][-1] == head
    assert free_of(redis_client, keys, "n1") == free  # the place changed hands; nothing was freed
    assert pending_ids(redis_client, keys) == [behind]
    assert task_hash(redis_client, keys, done)["state"] == "SUCCEEDED" and "alloc" not in task_hash(
        redis_client, keys, done)
    assert woken(wakes) == []  # nothing for a dispatcher to plan
    assert redis_client.hget(keys.outcomes, "handoff|default") == b"1"
    assert_pool_invariants(redis_client, keys)
    # The head runs and passes the place on in turn: a failure ends its task as well.
    head_tag = tag_of(redis_client, keys, head)
    scripts.start(head, "n1", head_tag)
    assert scripts.finish(head, "n1", head_tag, "failed", "boom") == (FinishCode.OK, "FAILED")
    assert task_hash(redis_client, keys, behind)["state"] == "RESERVED" and pending_ids(redis_client, keys) == []
    assert_pool_invariants(redis_client, keys)
    behind_tag = tag_of(redis_client, keys, behind)  # the last: nobody to pass to, its place is freed
    scripts.start(behind, "n1", behind_tag)
    assert scripts.finish(behind, "n1", behind_tag, "succeeded", "1") == (FinishCode.OK, "SUCCEEDED")
    assert redis_client.zscore(keys.changes, "n1") > changed  # n1's free capacity changed: dispatchers re-read it
    assert woken(wakes) == [b"finish"]


def test_the_head_goes_on_at_its_next_attempt_number(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys,
                                                     clock: Clock) -> None:
    publish(redis_client, keys, clock)
    register_node(scripts, "n1", gpus=1, gpu_mem=1000, slots=2)
    lost, lost_tag = running(scripts, gpus=(0,))
    assert scripts.finish(lost, "n1", lost_tag, "lost", "worker died")[1] == "PENDING"  # back in line, once tried
    done, tag = running(scripts, gpus=(0,))  # placed ahead of the line (as a test may): the lost one is the head
    scripts.finish(done, "n1", tag, "succeeded", "null")
    assert task_hash(redis_client, keys, lost)["tag"] == f"{lost}.2"
    assert_pool_invariants(redis_client, keys)


@pytest.mark.parametrize("case", ["never", "auto before a cycle", "other request", "other priority", "retry", "lost",
                                  "cancelled", "draining", "rate limited", "another policy"])
def test_no_hand_off(case: str, scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys, clock: Clock,
                     wakes: redis.client.PubSub) -> None:
    """The place is released (and the dispatcher woken) whenever the head is not exactly what
    ended, the attempt does not end its task, the node takes no new work, the name is rate
    limited, or the setting (or the spine's scheduling) is off."""
    if case == "another policy":
        publish(redis_client, keys, clock, scheduling={"ordering": "fair"})
    else:
        mode = {"never": "never", "auto before a cycle": "auto"}.get(case, "always")
        publish(redis_client, keys, clock, handoff=mode)
    register_node(scripts, "n1", gpus=2, gpu_mem=1000, slots=2)
    done, tag = running(scripts)
    head = submit_task(scripts, resources=Resources(gpus=1, cpus=2) if case == "other request" else GPU,
                       priority=1 if case == "other priority" else 0)
    outcome, payload = {"retry": ("retry", "{}"), "lost": ("lost", "gone"),
                        "cancelled": ("failed", "killed")}.get(case, ("succeeded", "null"))
    if case == "cancelled":  # stopped for a cancel: it ends CANCELLED, and is left to the dispatcher
        scripts.cancel(done, "n1", grace_ms=60_000)
    if case == "draining":
        scripts.drain("n1", "operator")
    if case == "rate limited":
        redis_client.hset(keys.tasks, PROBE, json.dumps({"rate": 5}))
    woken(wakes)
    code, _state = scripts.finish(done, "n1", tag, outcome, payload)
    assert code is FinishCode.OK
    assert task_hash(redis_client, keys, head)["state"] == "PENDING"
    assert free_of(redis_client, keys, "n1")["g1_milli"] == 1000  # released
    assert b"finish" in woken(wakes)
    assert redis_client.hget(keys.outcomes, "handoff|default") is None
    assert_pool_invariants(redis_client, keys)


def test_auto_hands_off_only_while_tasks_wait_for_capacity(scripts: Scripts, redis_client: redis.Redis,
                                                           keys: PoolKeys, clock: Clock) -> None:
    """``auto`` (the default): the dispatcher turns the hand-off on when its cycle leaves tasks
    waiting (the head waits for capacity: the place a like task frees is where best fit would
    put it), and off when a cycle leaves nothing waiting (then it places every task itself)."""
    register_node(scripts, "n1", gpus=1, gpu_mem=1000, slots=4)
    dispatcher = Dispatcher(Settings(pool=keys.pool), clock, redis_client)
    assert dispatcher.settings.handoff == "auto"
    first = submit_task(scripts, resources=GPU)
    assert dispatcher.run_cycle().placed == 1
    assert not redis_client.exists(keys.handoff), "nothing waits: the dispatcher places every task"
    waiting = [submit_task(scripts, resources=GPU) for _ in range(2)]
    assert dispatcher.run_cycle().placed == 0
    assert redis_client.get(keys.handoff) == b"1", "tasks wait for the one GPU: hand off"
    tag = tag_of(redis_client, keys, first)
    scripts.start(first, "n1", tag)
    assert scripts.end(first, "n1", tag, "succeeded", "1")[2] == waiting[0]
    assert_pool_invariants(redis_client, keys)
    tag = tag_of(redis_client, keys, waiting[0])
    scripts.start(waiting[0], "n1", tag)
    assert scripts.end(waiting[0], "n1", tag, "succeeded", "1")[2] == waiting[1]
    tag = tag_of(redis_client, keys, waiting[1])
    scripts.start(waiting[1], "n1", tag)
    assert scripts.end(waiting[1], "n1", tag, "succeeded", "1")[2] == ""  # nobody left: the GPU is freed
    dispatcher.run_cycle()  # woken by that release: nothing waits
    assert not redis_client.exists(keys.handoff)
    alone = submit_task(scripts, resources=GPU)
    dispatcher.run_cycle()
    tag = tag_of(redis_client, keys, alone)
    scripts.start(alone, "n1", tag)
    behind = submit_task(scripts, resources=GPU)  # arrived after the cycle: the dispatcher places it
    assert scripts.end(alone, "n1", tag, "succeeded", "1")[2] == ""
    assert dispatcher.run_cycle().placed == 1 and task_hash(redis_client, keys, behind)["state"] == "RESERVED"
    assert redis_client.hget(keys.outcomes, "handoff|default") == b"2"


@pytest.mark.parametrize("mode", ["always", "auto"])
def test_without_the_lazy_planner_there_is_no_hand_off_whatever_the_mode(
        scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys, clock: Clock, mode: str) -> None:
    """The simulator turns the lazy planner off after making its dispatcher when a trace has
    gangs (their members are plain tasks to finish.lua): the switch reads the planner as the
    first cycle runs, not as the dispatcher was made. (It read it at construction, and the
    Philly trace with gangs and handoff always broke a gang: "1 of 2 members reserved in one
    cycle".)"""
    register_node(scripts, "n1", gpus=1, gpu_mem=1000, slots=4)
    dispatcher = Dispatcher(Settings(pool=keys.pool, handoff=mode), clock, redis_client)
    dispatcher.lazy = False
    for _ in range(3):
        submit_task(scripts, resources=GPU)
    assert dispatcher.run_cycle().placed == 1  # two wait
    assert not redis_client.exists(keys.handoff)
