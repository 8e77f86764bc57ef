"""The dispatcher's lazy pass with gangs and elastic requests, against a real Redis: a waiting
gang's capacity is not handed to the tasks queued behind it, and an elastic request is granted
by the planner's rule."""

from __future__ import annotations

import redis

from broker.dispatcher import Dispatcher
from broker.models import Resources
from broker.scheduling.config import SchedulingConfig
from broker.settings import Settings
from broker.store.keys import PoolKeys
from broker.store.scripts import Scripts, StartCode
from tests.conftest import Clock
from tests.invariants import assert_pool_invariants, register_node, submit_task, task_hash, text
from tests.store.test_lua_gang import submit_gang


def test_tasks_behind_a_gang_do_not_take_its_capacity(scripts: Scripts, redis_client: redis.Redis,
                                                      keys: PoolKeys, clock: Clock) -> None:
    """An idle 4-GPU node, a gang of 2 members of 2 GPUs at the head of the queue, then four 1-GPU tasks
    of lower priority: the gang is reserved and the later tasks wait (the lazy pass used to skip
    the gang and give the node to them, leaving the gang pending)."""
    register_node(scripts, "n1", gpus=4, gpu_mem=40_000, cpus=8, mem=16_384, slots=8)
    submit_gang(scripts, "g0", 2, gpus=2, priority=5)
    clock.advance(1)
    later = [submit_task(scripts, resources=Resources(gpus=1)) for _ in range(4)]
    report = Dispatcher(Settings(pool=keys.pool, dispatch_window=50), clock, redis_client).run_cycle()
    assert task_hash(redis_client, keys, "g0")["state"] == "RESERVED", report
    assert {task_hash(redis_client, keys, t)["state"] for t in later} == {"PENDING"}
    assert report.placed == 2
    assert_pool_invariants(redis_client, keys, set())


def test_a_gang_preempts_on_two_nodes_waits_on_both_then_is_reserved_whole(
        scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys, clock: Clock) -> None:
    """Eight running preemptible 1-GPU tasks fill two 4-GPU nodes; a priority-10 gang of 2 x 4
    GPUs marks all eight, is recorded as waiting on both nodes, keeps the capacity of those
    that stop from them (they go back in line), and is reserved once all have stopped."""
    for node_id in ("n1", "n2"):
        register_node(scripts, node_id, gpus=4, gpu_mem=40_000, cpus=8, mem=16_384, slots=8)
    small = [submit_task(scripts, resources=Resources(gpus=1)) for _ in range(8)]
    settings = Settings(pool=keys.pool, dispatch_window=50,
                        scheduling=SchedulingConfig.parse({"ordering": "priority", "preemptible_default": True}))
    dispatcher = Dispatcher(settings, clock, redis_client)
    dispatcher.run_cycle()
    tags = {}
    for task_id in small:
        h = task_hash(redis_client, keys, task_id)
        assert scripts.start(task_id, h["node"], h["tag"])[0] is StartCode.OK
        tags[task_id] = (h["node"], h["tag"])
    clock.advance(1)
    submit_gang(scripts, "g", 2, gpus=4, priority=10)
    report = dispatcher.run_cycle()
    assert sorted(report.preempted) == sorted(small)
    assert set(text(redis_client.hget(keys.preempting, "g")).split(",")) == {"n1", "n2"}
    for task_id in small[:5]:  # five stop; three are still stopping
        node_id, tag = tags[task_id]
        assert scripts.finish(task_id, node_id, tag, "failed", "Preempted")[1] == "PENDING"
    dispatcher.run_cycle()
    assert task_hash(redis_client, keys, "g")["state"] == "PENDING"
    assert {task_hash(redis_client, keys, t)["state"] for t in small[:5]} == {"PENDING"}, "the gang's room kept"
    for task_id in small[5:]:
        node_id, tag = tags[task_id]
        scripts.finish(task_id, node_id, tag, "failed", "Preempted")
    dispatcher.run_cycle()
    assert task_hash(redis_client, keys, "g")["state"] == "RESERVED"
    assert {task_hash(redis_client, keys, t)["preemptions"] for t in small} == {"1"}
    assert_pool_invariants(redis_client, keys, set())


def test_the_lazy_pass_leaves_an_elastic_task_to_the_planner_that_grants_it(
        scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys, clock: Clock) -> None:
    """The default (spine) dispatcher on an idle 8-GPU node under elastic = "min": the elastic
    task gets its minimum, 2 GPUs, and the 6-GPU task behind it the rest (the lazy best fit would
    have placed the elastic request as its 8 GPUs and left the other waiting)."""
    register_node(scripts, "n1", gpus=8, gpu_mem=40_000, cpus=8, mem=16_384, slots=8)
    elastic = submit_task(scripts, resources=Resources(gpus=8, min_gpus=2), priority=5)
    clock.advance(1)
    behind = submit_task(scripts, resources=Resources(gpus=6))
    settings = Settings(pool=keys.pool, dispatch_window=50, scheduling={"elastic": "min"})
    assert settings.scheduling.is_spine
    Dispatcher(settings, clock, redis_client).run_cycle()
    assert [task_hash(redis_client, keys, t)["state"] for t in (elastic, behind)] == ["RESERVED", "RESERVED"]
    assert len(task_hash(redis_client, keys, elastic)["gpus"].split(",")) == 2
    assert_pool_invariants(redis_client, keys, set())
