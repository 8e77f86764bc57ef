"""reserve.lua against a real Redis: every placement re-checked, capacity and message moved atomically."""

from __future__ import annotations

import json

import pytest
import redis

from broker.models import MILLI, Resources
from broker.scheduling.model import Placement
from broker.store.keys import PoolKeys
from broker.store.records import catalogue_entry
from broker.store.scripts import ReserveCode, Scripts
from tests.invariants import (
    LEASE_MS,
    PROBE,
    ControlledClock,
    alloc_of,
    assert_capacity_invariant,
    free_of,
    node_task_ids,
    pending_ids,
    pending_score,
    place,
    queue_messages,
    register_node,
    request_of,
    reserve_one,
    submit_task,
    task_hash,
)

GPU_MEM = 80_000
NODE = {"gpus": 4, "gpu_mem": GPU_MEM, "cpus": 32, "mem": 256_000, "slots": 8, "labels": {"gpu": "h100", "zone": "a"}}


@pytest.fixture
def node(scripts: Scripts) -> str:
    register_node(scripts, "n1", **NODE)
    return "n1"


def share(fraction: float, gpu_memory_mb: int | None = None) -> Resources:
    return Resources(gpus=fraction, gpu_memory_mb=gpu_memory_mb, cpus=0.5, memory_mb=512)


def assert_unchanged(redis_client: redis.Redis, keys: PoolKeys, task_id: str, node_id: str,
                     free_before: dict[str, int]) -> None:
    """A refused placement changed nothing: task still pending, node free amounts and queue untouched."""
    t = task_hash(redis_client, keys, task_id)
    assert (t["state"], t["attempts"]) == ("PENDING", "0")
    assert not {"node", "gpus", "tag", "alloc"} & t.keys()
    assert task_id in pending_ids(redis_client, keys)
    assert request_of(redis_client, keys, task_id) == t["req"]
    assert free_of(redis_client, keys, node_id) == free_before
    assert task_id not in node_task_ids(redis_client, keys, node_id)
    assert_capacity_invariant(redis_client, keys)


# ---- happy paths ----------------------------------------------------------------------


def test_whole_gpus_move_task_capacity_and_message(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys,
                                                   node: str) -> None:
    task = submit_task(scripts, resources=Resources(gpus=2, cpus=4, memory_mb=16_000))

    assert reserve_one(scripts, task, node, 1, 3) is ReserveCode.OK

    t = task_hash(redis_client, keys, task)
    assert (t["state"], t["node"], t["gpus"], t["tag"], t["attempts"], t["retries"]) == (
        "RESERVED", node, "1,3", f"{task}.1", "1", "0")
    assert t["reserved_at"] == str(scripts.clock())
    assert alloc_of(redis_client, keys, task) == {"g": [[1, 1000, GPU_MEM], [3, 1000, GPU_MEM]], "c": 4000,
                                                  "r": 16_000}
    assert free_of(redis_client, keys, node) == {
        "g0_milli": 1000, "g0_mem": GPU_MEM, "g1_milli": 0, "g1_mem": 0,
        "g2_milli": 1000, "g2_mem": GPU_MEM, "g3_milli": 0, "g3_mem": 0,
        "free_cpu_m": 28_000, "free_mem": 240_000, "free_slots": 7}
    assert pending_ids(redis_client, keys) == [] and request_of(redis_client, keys, task) is None
    assert node_task_ids(redis_client, keys, node) == {task}
    assert len(queue_messages(redis_client, keys, node)) == 1
    assert_capacity_invariant(redis_client, keys)


def test_message_is_the_submitted_one_plus_routing_and_tag(scripts: Scripts, redis_client: redis.Redis,
                                                           keys: PoolKeys, node: str) -> None:
    task = submit_task(scripts, resources=Resources(gpus=1))
    submitted = task_hash(redis_client, keys, task)["message"]

    place(scripts, task, node, 2)

    (pushed,) = queue_messages(redis_client, keys, node)
    # Byte-identical up to the end of the properties object; never re-encoded by cjson.
    assert pushed[: len(submitted) - 2] == submitted[:-2]
    assert pushed.endswith("}}")
    doc, original = json.loads(pushed), json.loads(submitted)
    properties = doc["properties"]
    assert list(properties)[-3:] == ["delivery_info", "delivery_tag", "gpubroker"]
    assert properties.pop("delivery_info") == {"exchange": "", "routing_key": keys.queue(node)}
    assert properties.pop("delivery_tag") == f"{task}.1"
    assert properties.pop("gpubroker") == {"gpus": "2", "tenant": "default"}  # what Flower shows
    assert doc == original
    assert list(doc) == list(original)  # properties stays the last member, as reserve.lua relies on


def test_a_requeued_task_is_reserved_under_its_next_attempt(scripts: Scripts, redis_client: redis.Redis,
                                                            keys: PoolKeys, node: str) -> None:
    task = submit_task(scripts, resources=Resources(gpus=1))
    tag = place(scripts, task, node, 0, start=True)
    scripts.finish(task, node, tag, "lost", "worker lost")
    redis_client.delete(keys.queue(node))

    place(scripts, task, node, 1)

    assert task_hash(redis_client, keys, task)["tag"] == f"{task}.2"
    (pushed,) = queue_messages(redis_client, keys, node)
    assert json.loads(pushed)["properties"]["delivery_tag"] == f"{task}.2"
    assert_capacity_invariant(redis_client, keys)


def test_cpu_only_task_takes_no_gpu(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys, node: str) -> None:
    task = submit_task(scripts, resources=Resources(cpus=2.5, memory_mb=3000))
    gpus_before = {k: v for k, v in free_of(redis_client, keys, node).items() if k.startswith("g")}

    assert reserve_one(scripts, task, node) is ReserveCode.OK

    t = task_hash(redis_client, keys, task)
    assert (t["state"], t["gpus"]) == ("RESERVED", "")
    alloc = alloc_of(redis_client, keys, task)
    assert alloc is not None and not alloc["g"]  # [] (cjson would write the empty table as {})
    assert (alloc["c"], alloc["r"]) == (2500, 3000)
    free = free_of(redis_client, keys, node)
    assert {k: v for k, v in free.items() if k.startswith("g")} == gpus_before
    assert (free["free_cpu_m"], free["free_mem"], free["free_slots"]) == (29_500, 253_000, 7)
    assert_capacity_invariant(redis_client, keys)


def test_cpu_only_node_runs_cpu_tasks(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys) -> None:
    register_node(scripts, "cpu", cpus=4, mem=8192, slots=2)
    task = submit_task(scripts)
    assert reserve_one(scripts, task, "cpu") is ReserveCode.OK
    assert reserve_one(scripts, submit_task(scripts, resources=Resources(gpus=1)), "cpu", 0) is (
        ReserveCode.BAD_PLACEMENT)
    assert_capacity_invariant(redis_client, keys)


# ---- GPU rules ------------------------------------------------------------------------


def test_whole_gpu_must_be_wholly_free(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys,
                                       node: str) -> None:
    place(scripts, submit_task(scripts, resources=share(0.001, 1)), node, 0)
    whole = submit_task(scripts, resources=Resources(gpus=2))
    free = free_of(redis_client, keys, node)

    assert reserve_one(scripts, whole, node, 0, 1) is ReserveCode.NO_CAPACITY
    assert_unchanged(redis_client, keys, whole, node, free)
    assert reserve_one(scripts, whole, node, 1, 2) is ReserveCode.OK


@pytest.mark.parametrize(("gpu_memory_mb", "code"), [(GPU_MEM + 1, ReserveCode.NO_CAPACITY),
                                                     (GPU_MEM, ReserveCode.OK), (1, ReserveCode.OK)])
def test_whole_gpu_memory_per_gpu(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys, node: str, *,
                                  gpu_memory_mb: int, code: ReserveCode) -> None:
    task = submit_task(scripts, resources=Resources(gpus=2, gpu_memory_mb=gpu_memory_mb))
    assert reserve_one(scripts, task, node, 0, 1) is code
    # A whole GPU is held whole, whatever memory the task asked for.
    expected = 0 if code is ReserveCode.OK else GPU_MEM
    assert free_of(redis_client, keys, node)["g0_mem"] == expected
    assert_capacity_invariant(redis_client, keys)


@pytest.mark.parametrize(
    ("shares", "codes", "milli_left", "mem_left"),
    [
        ([0.25] * 5, [0] * 4 + [4], 0, 0),
        ([0.5, 0.3, 0.2], [0, 0, 0], 0, 0),
        ([0.6, 0.5, 0.4], [0, 4, 0], 0, 0),
        ([0.333, 0.333, 0.333, 0.002], [0, 0, 0, 4], 1, GPU_MEM - 3 * 26_640),
        ([0.999, 0.001], [0, 0], 0, GPU_MEM - 79_920 - 80),
    ],
    ids=["quarters", "exact-fill", "skip-too-big", "thirds", "sliver"],
)
def test_shares_pack_onto_one_gpu(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys, node: str, *,
                                  shares: list[float], codes: list[int], milli_left: int, mem_left: int) -> None:
    tasks = [submit_task(scripts, resources=share(f)) for f in shares]
    got = [reserve_one(scripts, t, node, 0) for t in tasks]
    assert got == [ReserveCode(c) for c in codes]
    for fraction, task, code in zip(shares, tasks, got, strict=True):
        if code is ReserveCode.OK:
            # Memory defaults to the same fraction of the GPU's memory, rounded down.
            milli = round(fraction * 1000)
            assert alloc_of(redis_client, keys, task)["g"] == [[0, milli, milli * GPU_MEM // 1000]]
    free = free_of(redis_client, keys, node)
    assert (free["g0_milli"], free["g0_mem"]) == (milli_left, mem_left)
    assert free["g1_milli"] == 1000
    assert_capacity_invariant(redis_client, keys)


def test_share_with_explicit_gpu_memory(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys,
                                        node: str) -> None:
    big = submit_task(scripts, resources=share(0.1, 60_000))
    too_big = submit_task(scripts, resources=share(0.1, 20_001))
    fits = submit_task(scripts, resources=share(0.1, 20_000))

    assert reserve_one(scripts, big, node, 0) is ReserveCode.OK
    assert alloc_of(redis_client, keys, big)["g"] == [[0, 100, 60_000]]
    free = free_of(redis_client, keys, node)
    assert reserve_one(scripts, too_big, node, 0) is ReserveCode.NO_CAPACITY  # share left, memory not
    assert_unchanged(redis_client, keys, too_big, node, free)
    assert reserve_one(scripts, fits, node, 0) is ReserveCode.OK
    free = free_of(redis_client, keys, node)
    assert (free["g0_milli"], free["g0_mem"]) == (800, 0)
    assert_capacity_invariant(redis_client, keys)


def test_share_asking_more_memory_than_the_gpu_has(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys,
                                                   node: str) -> None:
    task = submit_task(scripts, resources=share(0.5, GPU_MEM + 1))
    free = free_of(redis_client, keys, node)
    assert reserve_one(scripts, task, node, 0) is ReserveCode.NO_CAPACITY
    assert_unchanged(redis_client, keys, task, node, free)


# ---- refusals -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resources", "gpus"),
    [
        (Resources(gpus=2), (0,)),
        (Resources(gpus=2), (0, 1, 2)),
        (Resources(gpus=1), ()),
        (share(0.5), ()),
        (share(0.5), (0, 1)),
        (Resources(cpus=1), (0,)),
        (Resources(gpus=1), (4,)),
        (Resources(gpus=1), (-1,)),
        (Resources(gpus=2), (1, 1)),
        (share(0.25), (2, 2)),
    ],
    ids=["too-few", "too-many", "none-for-whole", "none-for-share", "two-for-share", "gpu-for-cpu-task",
         "unknown-index", "negative-index", "repeated-whole", "repeated-share"],
)
def test_bad_placement(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys, node: str, *,
                       resources: Resources, gpus: tuple[int, ...]) -> None:
    task = submit_task(scripts, resources=resources)
    free = free_of(redis_client, keys, node)
    assert reserve_one(scripts, task, node, *gpus) is ReserveCode.BAD_PLACEMENT
    assert_unchanged(redis_client, keys, task, node, free)
    assert queue_messages(redis_client, keys, node) == []


@pytest.mark.parametrize(("resources", "gpus"), [(Resources(gpus=2), (0,)), (share(0.5), (0, 1)),
                                                  (Resources(cpus=1), (0,))], ids=["too-few", "two-for-share", "cpu"])
def test_bad_placement_is_named_even_when_the_gpu_is_busy(scripts: Scripts, redis_client: redis.Redis,
                                                          keys: PoolKeys, node: str, *, resources: Resources,
                                                          gpus: tuple[int, ...]) -> None:
    place(scripts, submit_task(scripts, resources=Resources(gpus=1)), node, 0)
    task = submit_task(scripts, resources=resources)
    free = free_of(redis_client, keys, node)
    assert reserve_one(scripts, task, node, *gpus) is ReserveCode.BAD_PLACEMENT  # a policy bug, not a shortage
    assert_unchanged(redis_client, keys, task, node, free)


@pytest.mark.parametrize(
    "resources",
    [Resources(cpus=32.001), Resources(memory_mb=256_001), Resources(gpus=1, cpus=33)],
    ids=["cpu", "ram", "cpu-with-gpu"],
)
def test_no_capacity_on_host_resources(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys, node: str,
                                       resources: Resources) -> None:
    task = submit_task(scripts, resources=resources)
    free = free_of(redis_client, keys, node)
    assert reserve_one(scripts, task, node, *((0,) if resources.gpus else ())) is ReserveCode.NO_CAPACITY
    assert_unchanged(redis_client, keys, task, node, free)


def test_no_capacity_when_slots_are_taken(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys) -> None:
    register_node(scripts, "n1", slots=2)
    first, second, third = (submit_task(scripts) for _ in range(3))
    assert [reserve_one(scripts, t, "n1") for t in (first, second)] == [ReserveCode.OK, ReserveCode.OK]
    free = free_of(redis_client, keys, "n1")
    assert free["free_slots"] == 0
    assert reserve_one(scripts, third, "n1") is ReserveCode.NO_CAPACITY
    assert_unchanged(redis_client, keys, third, "n1", free)


@pytest.mark.parametrize(("labels", "code"), [
    ({"gpu": "a100"}, ReserveCode.LABEL_MISMATCH),
    ({"rack": "r1"}, ReserveCode.LABEL_MISMATCH),
    ({"gpu": "h100", "zone": "b"}, ReserveCode.LABEL_MISMATCH),
    ({"zone": "a"}, ReserveCode.OK),
    ({"gpu": "h100", "zone": "a"}, ReserveCode.OK),
])
def test_labels_must_all_match(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys, node: str, *,
                               labels: dict[str, str], code: ReserveCode) -> None:
    task = submit_task(scripts, resources=Resources(cpus=1, labels=labels))
    free = free_of(redis_client, keys, node)
    assert reserve_one(scripts, task, node) is code
    if code is not ReserveCode.OK:
        assert_unchanged(redis_client, keys, task, node, free)


def test_node_down_when_lease_expired(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys,
                                      clock: ControlledClock, node: str) -> None:
    task = submit_task(scripts)
    free = free_of(redis_client, keys, node)
    clock.advance(LEASE_MS / 1000)
    assert reserve_one(scripts, task, node) is ReserveCode.OK  # expiry itself is the last live instant
    scripts.cancel(task, node)

    late = submit_task(scripts)
    clock.advance(0.001)
    assert reserve_one(scripts, late, node) is ReserveCode.NODE_DOWN
    assert_unchanged(redis_client, keys, late, node, free)


def test_node_down_when_reaped_or_unknown(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys,
                                          clock: ControlledClock, node: str) -> None:
    task = submit_task(scripts)
    assert reserve_one(scripts, task, "never-registered") is ReserveCode.NODE_DOWN
    clock.advance(LEASE_MS / 1000 + 1)
    assert scripts.reap() == [node]
    scripts.heartbeat(node, "inc-1", LEASE_MS)  # REAPED: it does not bring the lease back
    free = free_of(redis_client, keys, node)
    assert reserve_one(scripts, task, node) is ReserveCode.NODE_DOWN
    assert_unchanged(redis_client, keys, task, node, free)


def test_not_pending(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys, node: str) -> None:
    placed, cancelled = submit_task(scripts), submit_task(scripts)
    place(scripts, placed, node)
    scripts.cancel(cancelled, None)
    free = free_of(redis_client, keys, node)

    codes = [reserve_one(scripts, t, node) for t in (placed, cancelled, "no-such-task")]

    assert codes == [ReserveCode.NOT_PENDING] * 3
    assert free_of(redis_client, keys, node) == free
    assert task_hash(redis_client, keys, placed)["attempts"] == "1"
    assert len(queue_messages(redis_client, keys, node)) == 1
    assert not redis_client.exists(keys.task("no-such-task"))
    assert_capacity_invariant(redis_client, keys)


# ---- batches --------------------------------------------------------------------------


def test_batch_commits_each_placement_against_the_state_before_it(scripts: Scripts, redis_client: redis.Redis,
                                                                  keys: PoolKeys, node: str) -> None:
    register_node(scripts, "n2", gpus=1, gpu_mem=24_000, cpus=4, mem=8192, slots=1)
    a, b, c, d, e, f = (submit_task(scripts, resources=Resources(gpus=1)) for _ in range(6))
    batch = [
        Placement(a, node, (0,)),
        Placement(b, node, (0,)),      # GPU 0 went to a, earlier in this batch
        Placement(a, "n2", (0,)),      # a is no longer pending
        Placement(c, "n2", (0,)),
        Placement(d, "n2", (0,)),      # n2's only slot went to c
        Placement(e, "gone", (0,)),
        Placement(f, node, (0, 1)),
        Placement(b, node, (3,)),      # b is still pending after its refusal
    ]

    codes = scripts.reserve(batch)

    assert codes == [ReserveCode.OK, ReserveCode.NO_CAPACITY, ReserveCode.NOT_PENDING, ReserveCode.OK,
                     ReserveCode.NO_CAPACITY, ReserveCode.NODE_DOWN, ReserveCode.BAD_PLACEMENT, ReserveCode.OK]
    assert {t: task_hash(redis_client, keys, t).get("node") for t in (a, b, c, d, e, f)} == {
        a: node, b: node, c: "n2", d: None, e: None, f: None}
    assert pending_ids(redis_client, keys) == [d, e, f]
    assert node_task_ids(redis_client, keys, node) == {a, b}
    assert node_task_ids(redis_client, keys, "n2") == {c}
    assert [json.loads(m)["headers"]["id"] for m in queue_messages(redis_client, keys, node)] == [a, b]
    assert [json.loads(m)["headers"]["id"] for m in queue_messages(redis_client, keys, "n2")] == [c]
    assert_capacity_invariant(redis_client, keys)


def test_empty_batch_is_a_no_op(scripts: Scripts) -> None:
    assert scripts.reserve([]) == []


def test_survives_script_flush(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys, node: str) -> None:
    first, second = submit_task(scripts), submit_task(scripts)
    place(scripts, first, node)
    redis_client.script_flush()
    assert reserve_one(scripts, second, node) is ReserveCode.OK
    assert pending_score(redis_client, keys, second) is None
    assert_capacity_invariant(redis_client, keys)


def test_a_delayed_task_is_not_pending_yet(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys,
                                           node: str, clock: ControlledClock) -> None:
    task = submit_task(scripts, resources=Resources(gpus=1), not_before=clock() / 1000 + 60)
    assert reserve_one(scripts, task, node, 0) is ReserveCode.NOT_PENDING
    assert node_task_ids(redis_client, keys, node) == set() and free_of(redis_client, keys, node)["g0_milli"] == MILLI


def test_a_node_that_lists_its_tasks_takes_only_those(scripts: Scripts, redis_client: redis.Redis,
                                                      keys: PoolKeys) -> None:
    register_node(scripts, "picky", gpus=1, gpu_mem=GPU_MEM, tasks={PROBE: catalogue_entry({}, None, 0)})
    other = submit_task(scripts, resources=Resources(gpus=1), name="other.task")
    probe = submit_task(scripts, resources=Resources(gpus=1))
    assert reserve_one(scripts, other, "picky", 0) is ReserveCode.NOT_SERVED
    assert reserve_one(scripts, probe, "picky", 0) is ReserveCode.OK
    assert_capacity_invariant(redis_client, keys)


def test_a_rate_limit_allows_a_second_s_worth_then_one_start_per_interval(
        scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys, clock: ControlledClock) -> None:
    """2 starts a second, pool-wide: a burst of 2, then one more every 0.5 s; a refused placement
    takes no start."""
    entry = catalogue_entry({}, "2/s", 2.0)
    register_node(scripts, "a", cpus=16, slots=10, tasks={PROBE: entry})
    register_node(scripts, "b", cpus=16, slots=10, tasks={PROBE: entry})
    tasks = [submit_task(scripts, resources=Resources(cpus=1)) for _ in range(4)]
    codes = scripts.reserve([Placement(tasks[0], "a"), Placement(tasks[1], "b"), Placement(tasks[2], "a")])
    assert codes == [ReserveCode.OK, ReserveCode.OK, ReserveCode.RATE_LIMITED]
    clock.advance(0.4)
    assert scripts.reserve([Placement(tasks[2], "b")]) == [ReserveCode.RATE_LIMITED]
    clock.advance(0.1)
    assert scripts.reserve([Placement(tasks[2], "b"), Placement(tasks[3], "a")]) == [ReserveCode.OK,
                                                                                    ReserveCode.RATE_LIMITED]
    assert pending_ids(redis_client, keys) == [tasks[3]]
