"""End to end: a real dispatcher and two real Celery workers pinned to nodes of different shapes."""

from __future__ import annotations

import random
from collections import defaultdict

import pytest

from broker import Client, Resources, TaskState, TaskStatus
from broker.errors import NotRegistered
from broker.models import MILLI
from broker.settings import Settings
from tests.support import Processes, wait_until

pytestmark = pytest.mark.e2e

NODES = {
    "node-a": ["--gpus", "4", "--gpu-memory-mb", "40960", "--cpus", "16", "--memory-mb", "65536", "--slots", "6",
               "--label", "gpu_model=A100"],
    "node-b": ["--gpus", "2", "--gpu-memory-mb", "81920", "--cpus", "8", "--memory-mb", "32768", "--slots", "4",
               "--label", "gpu_model=H100"],
}
SHAPES = [
    Resources(gpus=1, cpus=1),
    Resources(gpus=2, cpus=2, memory_mb=1024),
    Resources(gpus=4),  # only node-a
    Resources(gpus=0.5),
    Resources(gpus=0.25, gpu_memory_mb=20000),
    Resources(gpus=0.3, labels={"gpu_model": "H100"}),
    Resources(cpus=2, memory_mb=2048),
]


def start_cluster(procs: Processes, client: Client, *extra: str) -> None:
    procs.dispatcher()
    procs.dispatcher("dispatcher-2")  # racing dispatchers must be harmless: reserve.lua re-checks
    for node, args in NODES.items():
        procs.worker(node, *args, *extra)
    wait_until(lambda: {n.id for n in client.nodes() if n.state == "up"} == set(NODES), 30, what="nodes to register")


def intervals_overlap(a: TaskStatus, b: TaskStatus) -> bool:
    assert a.reserved_at and a.finished_at and b.reserved_at and b.finished_at
    return a.reserved_at < b.finished_at and b.reserved_at < a.finished_at


def assert_all_capacity_free(client: Client) -> None:
    for node in client.nodes():
        assert node.tasks == 0, node
        assert (node.free_cpus, node.free_memory_mb, node.free_slots) == (node.cpus, node.memory_mb, node.slots)
        assert all(g.free_milli == MILLI and g.free_memory_mb == g.memory_mb for g in node.gpus), node.gpus
    # Every message a worker took is acked: its unacked entry went with the outcome (finish.lua, for
    # the acks that make no round trip) or with kombu's ack (a failure, a message dropped unrun).
    held = {n.id: client.redis.hkeys(client.keys.unacked(n.id)) for n in client.nodes()}
    wait_until(lambda: not any(client.redis.hlen(client.keys.unacked(n)) or client.redis.zcard(
        client.keys.unacked_index(n)) for n in held), 10, what=f"the workers' messages to be acked: {held}")


@pytest.mark.parametrize("handoff", [False, True], ids=["dispatcher", "handoff"])
def test_fifty_mixed_probes_run_where_reserved_on_exactly_their_gpus(procs: Processes, settings: Settings,
                                                                     handoff: bool) -> None:
    """With ``handoff`` an ended task may pass its place to a like head of the queue (finish.lua):
    the same guarantees hold."""
    rng = random.Random(7)
    procs.env["GPUBROKER_HANDOFF"] = str(handoff).lower()
    with Client(settings=settings) as client:
        start_cluster(procs, client)
        ids = [client.submit("workers.tasks.probe", kwargs={"seconds": rng.uniform(0.1, 0.5)},
                             resources=SHAPES[i % len(SHAPES)], priority=rng.randint(0, 3),
                             tenant=rng.choice(["vision", "nlp"])).id for i in range(50)]
        done = [client.wait(task_id, timeout=240) for task_id in ids]

        assert [s.state for s in done] == [TaskState.SUCCEEDED] * 50, [(s.state, s.error) for s in done]
        for s in done:
            assert s.result["node"] == s.node, "ran on the node it was reserved on"
            assert s.result["cuda_visible_devices"] == ",".join(map(str, s.gpus)), "sees exactly its GPUs"
            expected_gpus = s.resources.whole_gpus or (1 if s.resources.gpu_milli else 0)
            assert len(s.gpus) == expected_gpus
            assert s.reserved_at <= s.result["started_at"] and s.result["finished_at"] <= s.finished_at + 0.01
            if s.resources.labels:
                assert s.node == "node-b"

        # No GPU index is ever held by two whole-GPU tasks at once, and shares on one GPU never exceed it.
        by_gpu: dict[tuple[str, int], list[TaskStatus]] = defaultdict(list)
        for s in done:
            for g in s.gpus:
                by_gpu[(s.node or "", g)].append(s)
        for holders in by_gpu.values():
            whole = [s for s in holders if s.resources.whole_gpus]
            for a in whole:
                assert not any(intervals_overlap(a, b) for b in holders if b is not a), (a, holders)
            for s in holders:  # at each reservation start, the shares then held fit in one GPU
                held = sum(o.resources.gpu_milli or MILLI for o in holders
                           if o.reserved_at <= s.reserved_at < o.finished_at)
                assert held <= MILLI

        assert_all_capacity_free(client)


def test_with_handoff_a_stream_of_like_tasks_passes_places_on_and_keeps_every_guarantee(
        procs: Processes, settings: Settings) -> None:
    procs.env["GPUBROKER_HANDOFF"] = "true"
    with Client(settings=settings) as client:
        start_cluster(procs, client)
        ids = [client.submit("workers.tasks.probe", kwargs={"seconds": 0.05}, resources=Resources(gpus=1)).id
               for _ in range(40)]
        done = [client.wait(task_id, timeout=240) for task_id in ids]
        assert [s.state for s in done] == [TaskState.SUCCEEDED] * 40, [(s.state, s.error) for s in done]
        for s in done:
            assert s.result["node"] == s.node and s.result["cuda_visible_devices"] == ",".join(map(str, s.gpus))
        for a in done:  # one task per GPU at a time
            assert not any(intervals_overlap(a, b) for b in done if b is not a and b.node == a.node
                           and set(b.gpus) & set(a.gpus)), a
        passed = int(client.redis.hget(client.keys.outcomes, "handoff|default") or 0)
        assert passed > 0, "10 GPUs for 40 like tasks: ended tasks passed their places on"
        wait_until(lambda: all(n.tasks == 0 for n in client.nodes()), 10, what="reservations to be released")
        assert_all_capacity_free(client)


def test_a_task_that_raises_still_releases_its_capacity(procs: Processes, settings: Settings) -> None:
    with Client(settings=settings) as client:
        start_cluster(procs, client, "--tasks", "tests.tasks_for_tests")
        failed = client.wait(client.submit("tests.boom", args=["kaput"], resources=Resources(gpus=2)).id, 60)
        assert failed.state is TaskState.FAILED
        assert failed.error == "RuntimeError: kaput"
        assert failed.node in NODES and len(failed.gpus) == 2
        with pytest.raises(NotRegistered, match=r"no registered node runs task 'no\.such\.task'"):
            client.submit("no.such.task", resources=Resources(gpus=1))  # refused at once: no node runs it
        cpu = client.wait(client.submit("tests.visible", resources=Resources(cpus=1)).id, 60)
        assert (cpu.state, cpu.result) == (TaskState.SUCCEEDED, "")
        wait_until(lambda: all(n.tasks == 0 for n in client.nodes()), 10, what="reservations to be released")
        assert_all_capacity_free(client)


def test_cancel_of_a_running_task_stops_it_and_frees_its_gpus(procs: Processes, settings: Settings) -> None:
    with Client(settings=settings) as client:
        start_cluster(procs, client)
        task_id = client.submit("workers.tasks.probe", kwargs={"seconds": 60}, resources=Resources(gpus=2)).id
        running = wait_until(lambda: (s := client.status(task_id)).state is TaskState.RUNNING and s, 30,
                             what="the task to start")
        assert client.cancel(task_id).state is TaskState.RUNNING  # until its process has ended
        cancelled = client.wait(task_id, 15)
        assert cancelled.state is TaskState.CANCELLED and cancelled.result is None
        assert f"task {task_id} cancelled: SIGTERM" in procs.log(f"worker-{running.node}")
        assert_all_capacity_free(client)
        # The freed GPUs are usable at once, and the cancelled task never reports a result.
        after = client.wait(client.submit("workers.tasks.probe", resources=Resources(gpus=2)).id, 60)
        assert after.state is TaskState.SUCCEEDED
        assert client.status(task_id).state is TaskState.CANCELLED
