"""The dispatcher's fast paths against a real Redis: they must read and commit exactly what
the plain ones do (reserve through redis-py, a full HGETALL per node, one ZRANGE of the window)."""

from __future__ import annotations

import redis

from broker.models import Resources
from broker.scheduling.model import Placement
from broker.store import reads
from broker.store.free_view import FreeView
from broker.store.keys import PoolKeys
from broker.store.scripts import HeartbeatCode, ReserveCode, Scripts
from tests.conftest import Clock
from tests.invariants import assert_capacity_invariant, pending_ids, register_node, submit_task


def test_prepared_batch_is_encoded_as_redis_py_would(scripts: Scripts, redis_client: redis.Redis) -> None:
    placements = [Placement("t-1", "n1", (0,)), Placement("t-2", "n1", (1, 3)), Placement("tâche-3", "n-2", ()),
                  Placement("t-4", "n1", (0,))]
    prepared = scripts.prepare_reserve(placements)
    keys, args = scripts._reserve_call(placements, scripts.clock())
    conn = redis_client.connection_pool.get_connection()
    try:
        packed = b"".join(conn.pack_command("EVALSHA", scripts.sha("reserve"), len(keys), *keys, *args))
    finally:
        redis_client.connection_pool.release(conn)
    assert prepared.command == packed


def test_prepared_batch_commits_even_after_a_script_flush(scripts: Scripts, redis_client: redis.Redis,
                                                          keys: PoolKeys) -> None:
    register_node(scripts, "n1", gpus=2, gpu_mem=1000)
    first, second = (submit_task(scripts, resources=Resources(gpus=1)) for _ in range(2))
    redis_client.script_flush()  # reserve.lua is not loaded: the send is refused, then made the usual way
    prepared = scripts.prepare_reserve([Placement(first, "n1", (0,)), Placement(second, "n1", (0,))])
    prepared.send()
    assert prepared.codes() == [ReserveCode.OK, ReserveCode.NO_CAPACITY]
    assert pending_ids(redis_client, keys) == [second]
    assert_capacity_invariant(redis_client, keys)


def test_read_free_remembering_node_shapes_reads_what_a_full_read_does(scripts: Scripts, redis_client: redis.Redis,
                                                                       keys: PoolKeys, clock: Clock) -> None:
    shapes: reads.Shapes = {}

    def assert_same() -> None:
        assert reads.read_free(redis_client, keys, clock(), shapes) == reads.read_free(redis_client, keys, clock())

    register_node(scripts, "a", gpus=2, gpu_mem=1000, labels={"zone": "x"})
    register_node(scripts, "b", gpus=1, gpu_mem=500)
    assert_same()
    assert set(shapes) == {"a", "b"}
    redis_client.hset(keys.node("a"), mapping={"g1_milli": 250, "free_slots": 1})
    assert_same()
    register_node(scripts, "a", gpus=4, gpu_mem=2000, labels={"zone": "y"}, incarnation="inc-2")  # a new worker
    assert_same()
    redis_client.hset(keys.node("b"), "state", "down")
    assert_same()


def test_pending_head_reads_what_free_slots_can_use_and_goes_on_after_the_last_task_read(
        scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys) -> None:
    register_node(scripts, "n1", gpus=8, gpu_mem=1000, slots=8)
    tasks = [submit_task(scripts, resources=Resources(gpus=1), priority=p) for p in (0, 0, 0, 0, 0, 0, 5)]
    in_order = [tasks[6], *tasks[:6]]  # higher priority first, then submit order
    head = reads.PendingHead(redis_client, keys, limit=6, first=2)
    assert head.read == 2 and not head.window_full
    chunks = head.chunks()
    first = next(chunks)
    assert [t.id for t in first] == in_order[:2]
    # The dispatcher commits what it read before it asks for more: the ranks shift, the scores do not.
    assert scripts.reserve([Placement(t.id, "n1", (i,)) for i, t in enumerate(first)]) == [ReserveCode.OK] * 2
    rest = [t.id for chunk in chunks for t in chunk]
    assert rest == in_order[2:6]  # up to the window, none skipped, none twice
    assert head.read == 6 and head.window_full


def test_head_script_reads_the_head_with_scores_and_requests_as_the_plain_reads_do(
        scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys) -> None:
    assert scripts.head(5) == ([], [])  # an empty queue
    tasks = [submit_task(scripts, resources=Resources(gpus=1), priority=p) for p in (0, 0, 3)]
    scored, wires = scripts.head(2)
    assert scored == [(m, float(s)) for m, s in redis_client.zrange(keys.pending, 0, 1, withscores=True)]
    assert [m.decode() for m, _ in scored] == [tasks[2], tasks[0]]
    assert wires == redis_client.hmget(keys.requests, [m for m, _ in scored])
    assert [m for m, _ in scripts.head(10)[0]] == [t.encode() for t in (tasks[2], tasks[0], tasks[1])]
    redis_client.hset(keys.requests, tasks[1], "{")  # unreadable: the planner must quarantine it
    redis_client.hdel(keys.requests, tasks[0])  # a request missing: None in its place, as HMGET says
    assert scripts.head(2)[1] == [wires[0], None]
    # What the dispatcher's PendingHead makes of a head read so: the same as reading it itself.
    read = reads.PendingHead(redis_client, keys, limit=10, first=3, head=scripts.head(3))
    plain = reads.PendingHead(redis_client, keys, limit=10, first=3)
    assert [[t.id for t in c] for c in read.chunks()] == [[t.id for t in c] for c in plain.chunks()] == [[tasks[2]]]
    assert {k: (text, str(why)) for k, (text, why) in read.poisoned.items()} == {
        k: (text, str(why)) for k, (text, why) in plain.poisoned.items()}
    assert set(read.poisoned) == {tasks[1]}


def test_read_free_with_a_cache_follows_every_script_that_changes_a_node(
        scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys, clock: Clock) -> None:
    """The cache re-reads only nodes that submit-to-finish scripts scored in ``changes``; after
    each transition it must agree with a full read."""
    from tests.invariants import place

    view = FreeView()

    def assert_same() -> None:
        for draining in (False, True):
            assert view.read(redis_client, keys, clock(), draining) == reads.read_free(redis_client, keys, clock(),
                                                                                       draining=draining)
        full = reads.read_free(redis_client, keys, clock())  # and the lazy planner's index of them
        assert view.index.ranked == full and view.index.free_slots == sum(n.free_slots for n in full)
        assert sorted(i for bucket in view.index.by_whole for i in bucket) == [n.id for n in full]

    register_node(scripts, "a", gpus=2, gpu_mem=1000)
    register_node(scripts, "b", gpus=1, gpu_mem=500, cpus=4)
    assert_same()
    task = submit_task(scripts, resources=Resources(gpus=1))
    tag = place(scripts, task, "a", 1, start=True)  # reserve.lua
    assert_same()
    scripts.finish(task, "a", tag, "succeeded", "null")  # finish.lua
    assert_same()
    held = submit_task(scripts, resources=Resources(gpus=0.5, cpus=1))
    place(scripts, held, "b", 0)
    assert_same()
    scripts.cancel(held, "b")  # cancel.lua
    assert_same()
    victim = submit_task(scripts, resources=Resources(gpus=1))
    place(scripts, victim, "a", 0)
    assert_same()
    scripts.preempt(victim, "a", "someone", 0)  # preempt.lua (a reserved victim is released at once)
    assert_same()
    register_node(scripts, "a", gpus=4, gpu_mem=2000, incarnation="inc-2")  # register.lua, a new worker
    assert_same()
    clock.advance(3600)  # leases run out: nothing is live until reap.lua marks them down
    assert_same()
    scripts.reap()
    assert_same()
    register_node(scripts, "b", gpus=1, gpu_mem=500, cpus=4, incarnation="inc-3")
    assert_same()
    scripts.drain("b", "operator")  # drain.lua
    assert_same()
    scripts.forget("a")  # forget.lua: "a" is down since the reap
    assert_same()
    register_node(scripts, "c", gpus=2, gpu_mem=500)
    assert_same()
    reads_before = view.node_reads
    clock.advance(5)
    assert scripts.heartbeat("c", "inc-1", 60_000) is HeartbeatCode.OK  # heartbeat.lua: a lease, no capacity
    assert_same()
    assert view.node_reads == reads_before  # nothing changed: nothing re-read


def test_a_free_view_reads_only_the_node_a_script_changed(scripts: Scripts, redis_client: redis.Redis,
                                                          keys: PoolKeys, clock: Clock) -> None:
    from tests.invariants import place

    view = FreeView()
    for node in (f"n{i}" for i in range(20)):
        register_node(scripts, node, gpus=1, gpu_mem=500)
    view.read(redis_client, keys, clock())
    reads_before = view.node_reads
    task = submit_task(scripts, resources=Resources(gpus=1))
    place(scripts, task, "n7", 0)
    assert view.read(redis_client, keys, clock()) == reads.read_free(redis_client, keys, clock())
    assert view.node_reads - reads_before == 1  # of 20 nodes, the one reserve.lua changed
    assert view.index.whole["n7"] == 0 and len(view.index.nodes) == 20


def test_read_free_cache_starts_afresh_when_redis_lost_its_data(scripts: Scripts, redis_client: redis.Redis,
                                                                 keys: PoolKeys, clock: Clock) -> None:
    view = FreeView()
    for node in ("a", "b", "c"):
        register_node(scripts, node, gpus=1, gpu_mem=500)
    assert [n.id for n in view.read(redis_client, keys, clock())] == ["a", "b", "c"]
    redis_client.flushall()  # the change sequence restarts below what the view saw
    register_node(scripts, "d", gpus=2, gpu_mem=500)
    assert [n.id for n in view.read(redis_client, keys, clock())] == ["d"]
    assert view.read(redis_client, keys, clock()) == reads.read_free(redis_client, keys, clock())
    redis_client.flushall()  # and then goes past it before the next read: the lease count tells
    for node in ("e", "f", "g", "h"):
        register_node(scripts, node, gpus=1, gpu_mem=500)
    view.read(redis_client, keys, clock())
    assert [n.id for n in view.read(redis_client, keys, clock())] == ["e", "f", "g", "h"]


def test_planning_never_changes_the_nodes_it_was_given() -> None:
    """read_free's cache hands the same NodeFree objects to every cycle: no planner may change them."""
    import copy

    from broker.scheduling.config import SchedulingConfig
    from broker.scheduling.model import NodeFree, RunningTask, Snapshot, TaskRequest
    from broker.scheduling.planner import Planner

    nodes = [NodeFree(f"n{i}", 1000, [1000, 500, 0], [1000, 500, 0], 4000, 4000, 3, {}, 8000, 8000, 4)
             for i in range(3)]
    running = [RunningTask(f"r{i}", f"n{i}", (2,), 1000, 1000, 0, 0, priority=0, preemptible=True,
                           estimate_s=60) for i in range(3)]
    pending = [TaskRequest("t1", 2, priority=5, seq=1, estimate_s=30),
               TaskRequest("t2", 0, 400, seq=2, estimate_s=5), TaskRequest("t3", 0, 0, 0, 1000, seq=3),
               TaskRequest("t4", 3, priority=9, seq=4)]
    before = copy.deepcopy(nodes)
    for ordering in ("priority", "fair", "sjf"):
        for mode in ("best_effort", "backfill", "strict"):
            for placement in ("best_fit", "spread", "first_fit", "frag_aware"):
                config = SchedulingConfig.parse({"ordering": ordering, "mode": mode, "placement": placement})
                Planner(config).plan(Snapshot(100.0, nodes, list(pending), list(running), mix={(1, 0): 3}))
                assert nodes == before, (ordering, mode, placement)
