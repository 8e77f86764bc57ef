"""Express placement (broker.express, setting ``express``): on an idle cluster the dispatcher
places a submitted task from its wake-up alone, before and without a cycle, where its cycle
would have placed it (issue 14: react to a submit within a millisecond; bench/react.py measures
the time). Against a real Redis; counted, not timed."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from broker.cycle import EXPRESS, REFUSED
from broker.dispatcher import Dispatcher
from broker.models import Resources
from broker.scheduling.config import SchedulingConfig
from broker.settings import Settings
from broker.store.keys import PoolKeys
from broker.store.records import catalogue_entry
from broker.store.scripts import Scripts
from tests.conftest import Clock
from tests.invariants import (
    PROBE,
    assert_pool_invariants,
    pending_ids,
    register_node,
    request_of,
    reserve_one,
    submit_task,
    tag_of,
    task_hash,
    woken,
)

GPU = Resources(gpus=1)


def placed_on(client: redis.Redis, keys: PoolKeys, task_id: str) -> tuple[str, str, str]:
    t = task_hash(client, keys, task_id)
    return t["state"], t.get("node", ""), t.get("gpus", "")


def idle(client: redis.Redis, keys: PoolKeys, clock: Clock, wakes: redis.client.PubSub,
         **settings: object) -> Dispatcher:
    """A dispatcher on node n1 (1 GPU) whose last cycle left nothing waiting; the wake-ups so far read."""
    dispatcher = Dispatcher(Settings(pool=keys.pool, **settings), clock, client)
    register_node(dispatcher.scripts, "n1", gpus=1, gpu_mem=1000)
    dispatcher.run_cycle()
    woken(wakes)
    return dispatcher


def test_an_idle_cluster_places_a_submit_from_its_wake_up_where_its_cycle_would(
        redis_client: redis.Redis, keys: PoolKeys, clock: Clock, wakes: redis.client.PubSub) -> None:
    dispatcher = Dispatcher(Settings(pool=keys.pool), clock, redis_client)
    scripts = dispatcher.scripts
    register_node(scripts, "big", gpus=4, gpu_mem=1000)
    register_node(scripts, "small", gpus=2, gpu_mem=1000)  # fuller once a task is on it: best fit's choice
    dispatcher.run_cycle()  # nothing waits
    woken(wakes)

    first = submit_task(scripts, resources=GPU)
    payloads = woken(wakes)
    request = request_of(redis_client, keys, first)
    assert payloads == [f"submit\n{request}\n{first}".encode()]
    assert dispatcher.place_express(payloads) == 1
    assert placed_on(redis_client, keys, first) == ("RESERVED", "small", "0")
    assert pending_ids(redis_client, keys) == []

    assert dispatcher.run_cycle().placed == 0  # the cycle that follows finds nothing left to place
    second = submit_task(scripts, resources=GPU)
    assert dispatcher.place_express(woken(wakes)) == 1
    assert placed_on(redis_client, keys, second) == ("RESERVED", "small", "1"), "its view holds the first"
    assert_pool_invariants(redis_client, keys)

    # The same two submits, placed by cycles alone (setting express off), go to the same places.
    other = PoolKeys("test-cycles")
    cycles = Dispatcher(Settings(pool=other.pool, express=False), clock, redis_client)
    register_node(cycles.scripts, "big", gpus=4, gpu_mem=1000)
    register_node(cycles.scripts, "small", gpus=2, gpu_mem=1000)
    cycles.run_cycle()
    for expected in ("0", "1"):
        task_id = submit_task(cycles.scripts, resources=GPU)
        assert cycles.place_express(woken(wakes) or [b"x"]) == 0
        cycles.run_cycle()
        assert placed_on(redis_client, other, task_id) == ("RESERVED", "small", expected)


def test_after_a_cycle_that_placed_express_plans_on_capacity_that_holds_those_placements(
        redis_client: redis.Redis, keys: PoolKeys, clock: Clock, wakes: redis.client.PubSub) -> None:
    dispatcher = Dispatcher(Settings(pool=keys.pool), clock, redis_client)
    scripts = dispatcher.scripts
    register_node(scripts, "n1", gpus=2, gpu_mem=1000)
    first = submit_task(scripts, resources=GPU)
    assert dispatcher.run_cycle().placed == 1  # nothing left waiting: it reads n1 again after placing
    woken(wakes)
    second = submit_task(scripts, resources=GPU)
    assert dispatcher.place_express(woken(wakes)) == 1
    assert [placed_on(redis_client, keys, t) for t in (first, second)] == [("RESERVED", "n1", "0"),
                                                                          ("RESERVED", "n1", "1")]


def test_a_burst_is_placed_in_queue_order_and_what_does_not_fit_waits_for_a_cycle(
        redis_client: redis.Redis, keys: PoolKeys, clock: Clock, wakes: redis.client.PubSub) -> None:
    dispatcher = idle(redis_client, keys, clock, wakes, handoff="never")
    scripts = dispatcher.scripts
    low = submit_task(scripts, resources=GPU, priority=0)
    high = submit_task(scripts, resources=GPU, priority=5)  # submitted second, more urgent
    assert dispatcher.place_express(woken(wakes)) == 1
    assert placed_on(redis_client, keys, high)[0] == "RESERVED"
    assert pending_ids(redis_client, keys) == [low]

    assert dispatcher.run_cycle().placed == 0  # the GPU is taken: the cycle leaves low waiting
    late = submit_task(scripts, resources=Resources(cpus=1))  # it would fit, but the queue is not empty
    assert dispatcher.place_express(woken(wakes)) == 0
    assert set(pending_ids(redis_client, keys)) == {low, late}
    assert dispatcher.run_cycle().placed == 1  # the cycle places it, behind nothing it could skip
    assert placed_on(redis_client, keys, late)[0] == "RESERVED"
    assert_pool_invariants(redis_client, keys)


def test_any_other_wake_up_leaves_the_placement_to_the_cycle(
        redis_client: redis.Redis, keys: PoolKeys, clock: Clock, wakes: redis.client.PubSub) -> None:
    dispatcher = idle(redis_client, keys, clock, wakes)
    scripts = dispatcher.scripts
    task_id = submit_task(scripts, resources=GPU)
    register_node(scripts, "n2", gpus=1, gpu_mem=1000)  # capacity changed as the view does not show
    payloads = woken(wakes)
    assert len(payloads) == 2 and not payloads[1].startswith(b"submit")
    assert dispatcher.place_express(payloads) == 0
    assert pending_ids(redis_client, keys) == [task_id]
    assert dispatcher.run_cycle().placed == 1

    register_node(scripts, "n3", gpus=2, gpu_mem=1000)
    dispatcher.run_cycle()
    woken(wakes)
    delayed = submit_task(scripts, resources=GPU, not_before=clock.now_ms / 1000 + 30)  # not in the queue
    assert woken(wakes) == [b"submit"]
    dispatcher.run_cycle()
    elastic = submit_task(scripts, resources=Resources(gpus=2, min_gpus=1))  # the full planner grants it GPUs
    assert dispatcher.place_express(woken(wakes)) == 0
    assert placed_on(redis_client, keys, delayed)[0] == placed_on(redis_client, keys, elastic)[0] == "PENDING"


def test_a_place_taken_since_the_last_cycle_is_refused_by_reserve_lua_and_the_task_waits(
        redis_client: redis.Redis, keys: PoolKeys, clock: Clock, wakes: redis.client.PubSub) -> None:
    dispatcher = idle(redis_client, keys, clock, wakes)
    scripts = dispatcher.scripts
    taker, task_id = submit_task(scripts, resources=GPU), submit_task(scripts, resources=GPU)
    payloads = woken(wakes)
    assert reserve_one(scripts, taker, "n1", 0).name == "OK"  # another dispatcher, say
    assert dispatcher.place_express(payloads[1:]) == 0  # planned onto GPU 0 as last seen: refused
    assert placed_on(redis_client, keys, task_id) == ("PENDING", "", "")
    assert_pool_invariants(redis_client, keys)


def test_a_name_whose_rate_limit_has_no_start_left_waits_for_the_cycle_unrefused(
        redis_client: redis.Redis, keys: PoolKeys, clock: Clock, wakes: redis.client.PubSub) -> None:
    dispatcher = Dispatcher(Settings(pool=keys.pool), clock, redis_client)
    register_node(dispatcher.scripts, "n1", cpus=8, slots=4, tasks={PROBE: catalogue_entry({}, "1/s", 1.0)})
    dispatcher.run_cycle()
    woken(wakes)
    first = submit_task(dispatcher.scripts, resources=Resources(cpus=1))
    assert dispatcher.place_express(woken(wakes)) == 1  # the one start a second allows
    assert dispatcher.run_cycle().placed == 0
    refused = REFUSED.labels(keys.pool, "RATE_LIMITED")._value.get()
    second = submit_task(dispatcher.scripts, resources=Resources(cpus=1))
    assert dispatcher.place_express(woken(wakes)) == 0  # none left: not even tried
    assert REFUSED.labels(keys.pool, "RATE_LIMITED")._value.get() == refused
    assert dispatcher.run_cycle().placed == 0
    clock.advance(1)
    assert dispatcher.run_cycle().placed == 1
    assert [placed_on(redis_client, keys, t)[0] for t in (first, second)] == ["RESERVED", "RESERVED"]


@pytest.mark.parametrize("settings", [dict(express=False), dict(scheduling=SchedulingConfig(ordering="fair"))],
                         ids=["express-off", "not-the-spine"])
def test_off_or_under_another_scheduling_every_placement_is_a_cycles(
        redis_client: redis.Redis, keys: PoolKeys, clock: Clock, wakes: redis.client.PubSub,
        settings: dict[str, object]) -> None:
    dispatcher = idle(redis_client, keys, clock, wakes, **settings)
    task_id = submit_task(dispatcher.scripts, resources=GPU)
    assert dispatcher.place_express(woken(wakes)) == 0
    assert placed_on(redis_client, keys, task_id)[0] == "PENDING"


def test_the_running_dispatcher_places_a_submit_on_an_idle_cluster_by_express(
        redis_client: redis.Redis, keys: PoolKeys) -> None:
    """run_forever, as deployed: the submit is placed by express, not by a cycle (no timer cycle
    can race it: reap_interval_s is long)."""
    settings = Settings(pool=keys.pool, reap_interval_s=60, metrics_port=0)
    dispatcher = Dispatcher(settings, client=redis_client)
    scripts = Scripts(redis_client, keys)
    register_node(scripts, "n1", gpus=1, gpu_mem=1000, lease_ms=600_000)
    stop = threading.Event()
    thread = threading.Thread(target=dispatcher.run_forever, args=(stop,), daemon=True)
    before = EXPRESS.labels(keys.pool)._value.get()
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not redis_client.exists(keys.cycle) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # the cycle the registration woke is over
        task_id = submit_task(scripts, resources=GPU)
        while placed_on(redis_client, keys, task_id)[0] != "RESERVED" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert placed_on(redis_client, keys, task_id) == ("RESERVED", "n1", "0")
        assert EXPRESS.labels(keys.pool)._value.get() == before + 1
        assert tag_of(redis_client, keys, task_id) == f"{task_id}.1"
    finally:
        stop.set()
        redis_client.publish(keys.wake, "stop")
        thread.join(10)
