"""The dispatcher does not re-read a pending window that placed nothing until capacity or the
queue changed (issue 14): counted in tasks read, not timed. Against a real Redis."""

from __future__ import annotations

import redis

from broker.dispatcher import Dispatcher
from broker.models import Resources
from broker.scheduling.config import SchedulingConfig
from broker.settings import Settings
from broker.store.keys import PoolKeys
from tests.conftest import Clock
from tests.invariants import register_node, submit_task, tag_of


def test_a_full_cluster_is_not_rescanned_until_capacity_or_the_queue_changes(
        redis_client: redis.Redis, keys: PoolKeys, clock: Clock) -> None:
    # The dispatcher makes every placement (with a hand-off the freed GPU would pass to the head
    # in finish.lua, and the gate would rightly find nothing to read).
    dispatcher = Dispatcher(Settings(pool=keys.pool, handoff="never"), clock, redis_client)
    scripts = dispatcher.scripts
    # Slots to spare, GPUs not: each cycle would read every pending GPU task to place none.
    register_node(scripts, "n1", gpus=2, gpu_mem=1000, slots=8)
    tasks = [submit_task(scripts, resources=Resources(gpus=1)) for _ in range(6)]
    first = dispatcher.run_cycle()
    assert first.placed == 2 and first.scanned == 6
    blocked = dispatcher.run_cycle()  # capacity changed (its own reservations): read once more
    assert blocked.placed == 0 and blocked.scanned == 4
    for _ in range(3):  # nothing changed: the window is not read
        idle = dispatcher.run_cycle()
        assert idle.placed == 0 and idle.scanned == 0 and idle.pending_seen == 4
    assert dispatcher._gate.skipped == 3

    late = submit_task(scripts, resources=Resources(gpus=1))  # a new task: read again (it may fit)
    assert dispatcher.run_cycle().scanned == 5
    assert dispatcher.run_cycle().scanned == 0

    scripts.heartbeat("n1", "inc-1", 60_000)  # a lease renewed is no capacity
    assert dispatcher.run_cycle().scanned == 0

    scripts.cancel(tasks[5], "")  # one fewer: with a full window, one behind it would come in unread
    assert dispatcher.run_cycle().scanned == 4
    assert dispatcher.run_cycle().scanned == 0

    done = tasks[0]  # a GPU freed (finish.lua): read, and the next task in line is placed
    scripts.finish(done, "n1", tag_of(redis_client, keys, done), "succeeded", "null")
    freed = dispatcher.run_cycle()
    assert freed.scanned > 0 and [p.task_id for p in freed.placed_tasks] == [tasks[2]]
    assert late in {t.decode() for t in redis_client.zrange(keys.pending, 0, -1)}

    register_node(scripts, "n2", gpus=1, gpu_mem=1000)  # a node came: read and placed
    assert dispatcher.run_cycle().placed == 1


def test_without_preemption_the_full_pass_is_not_repeated_while_nothing_changed(
        redis_client: redis.Redis, keys: PoolKeys, clock: Clock) -> None:
    settings = Settings(pool=keys.pool, scheduling=SchedulingConfig(preemption=False))
    dispatcher = Dispatcher(settings, clock, redis_client)
    register_node(dispatcher.scripts, "n1", gpus=1, gpu_mem=1000, slots=8)
    for _ in range(3):
        submit_task(dispatcher.scripts, resources=Resources(gpus=1))
    assert dispatcher.run_cycle().full_pass  # placed one, two wait: the queue view is written
    clock.advance(settings.explain_interval_s + 1)
    assert dispatcher.run_cycle().full_pass  # its own reservation changed capacity
    clock.advance(settings.explain_interval_s + 1)
    idle = dispatcher.run_cycle()
    assert idle.scanned == 0 and not idle.full_pass  # due, but nothing changed since the last one
    assert len(redis_client.hgetall(keys.queueinfo)) == 2  # the reasons it wrote stay
    submit_task(dispatcher.scripts, resources=Resources(gpus=1))
    clock.advance(settings.explain_interval_s + 1)
    assert dispatcher.run_cycle().full_pass


def test_a_small_node_working_through_a_queue_keeps_the_queue_view_and_runs_no_extra_full_pass(
        redis_client: redis.Redis, keys: PoolKeys, clock: Clock) -> None:
    """One slot, six tasks: each cycle reads only the head (one task, the free slot) and places
    it. That leaves tasks waiting, not none: the queue view stays and the full pass keeps its
    interval (it used to be dropped and re-run at every other cycle). The dispatcher makes every
    placement here (no hand-off)."""
    dispatcher = Dispatcher(Settings(pool=keys.pool, handoff="never"), clock, redis_client)
    scripts = dispatcher.scripts
    register_node(scripts, "n1", gpus=0, gpu_mem=0, slots=1)
    tasks = [submit_task(scripts) for _ in range(6)]
    assert dispatcher.run_cycle().full_pass  # the first: due at once
    for done in tasks[:3]:
        scripts.finish(done, "n1", tag_of(redis_client, keys, done), "succeeded", "null")
        cycle = dispatcher.run_cycle()
        assert cycle.placed == 1 and not cycle.full_pass
        assert redis_client.hexists(keys.queueinfo, tasks[5]), "the waiting task keeps its reason"
    clock.advance(dispatcher.settings.explain_interval_s + 1)
    scripts.finish(tasks[3], "n1", tag_of(redis_client, keys, tasks[3]), "succeeded", "null")
    assert dispatcher.run_cycle().full_pass  # its interval passed
