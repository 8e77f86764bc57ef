"""End to end: scheduling policies through real Redis, a real dispatcher and real probe workers.

Each test starts a dispatcher with its own ``GPUBROKER_SCHEDULING`` and one or two simulated
GPU nodes, then checks what the policy promises from the tasks' own records (when each was
reserved, started and finished, on which GPUs, how often it was preempted)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from broker import Client, Resources, TaskState, TaskStatus
from broker.settings import Settings
from tests.support import Processes, wait_until

pytestmark = pytest.mark.e2e

PROBE = "workers.tasks.probe"
CHECKPOINTED = "tests.checkpointed"


def start(procs: Processes, client: Client, scheduling: dict[str, Any], nodes: dict[str, list[str]],
          dispatcher: bool = True) -> None:
    for node, args in nodes.items():
        procs.worker(node, "--tasks", "tests.tasks_for_tests", *args)
    wait_until(lambda: {n.id for n in client.nodes() if n.state == "up"} == set(nodes), 30, what="nodes to register")
    if dispatcher:
        start_dispatcher(procs, scheduling)


def start_dispatcher(procs: Processes, scheduling: dict[str, Any]) -> None:
    procs.spawn("dispatcher", "dispatcher", "--log-level", "INFO",
                env={"GPUBROKER_SCHEDULING": json.dumps(scheduling)})


def gpu_node(gpus: int, slots: int) -> list[str]:
    return ["--gpus", str(gpus), "--gpu-memory-mb", "16000", "--cpus", "64", "--memory-mb", "65536",
            "--slots", str(slots)]


def running(client: Client, task_id: str, timeout: float = 30) -> TaskStatus:
    return wait_until(lambda: (s := client.status(task_id)).state is TaskState.RUNNING and s, timeout,
                      what=f"task {task_id} to run")


STREAM_CAP = 150  # urgent submits, 0.15 s apart: the stream gives up after about 25 s


def test_aging_lets_an_old_low_priority_task_past_a_stream_of_urgent_ones(procs: Processes,
                                                                           settings: Settings) -> None:
    # Effective priority rises 5 per second waited: the priority-0 task overtakes priority-5
    # tasks submitted more than a second after it, though they keep arriving. The stream of
    # urgent tasks only stops once the old task has run: without aging it would starve.
    with Client(settings=settings) as client:
        start(procs, client, {"ordering": "priority", "aging_per_minute": 300}, {"n1": gpu_node(1, 1)})
        filler = client.submit(PROBE, kwargs={"seconds": 1.5}, resources=Resources(gpus=1), priority=9).id
        running(client, filler)
        old = client.submit(PROBE, kwargs={"seconds": 0.2}, resources=Resources(gpus=1), priority=0)
        submitted_old = time.time()
        urgent: list[tuple[float, str]] = []
        stop = threading.Event()

        def stream() -> None:
            while not stop.is_set() and len(urgent) < STREAM_CAP:
                urgent.append((time.time(), client.submit(PROBE, kwargs={"seconds": 0.2},
                                                          resources=Resources(gpus=1), priority=5).id))
                stop.wait(0.15)

        producer = threading.Thread(target=stream)
        producer.start()
        try:
            done = client.wait(old.id, timeout=60)
        finally:
            stop.set()
            producer.join()
        assert done.state is TaskState.SUCCEEDED
        # Urgent tasks submitted 2 s or more after it, and still waiting when it was reserved:
        # without aging, every one of them would have gone first.
        later = [task_id for at, task_id in urgent if at >= submitted_old + 2]
        assert later, "the stream ran long enough to test starvation"
        overtaken = [s for s in map(client.status, later) if s.reserved_at is None or s.reserved_at > done.reserved_at]
        assert overtaken, "the old task ran before urgent tasks submitted well after it"
        assert len(urgent) < STREAM_CAP, "the old task ran while urgent ones were still arriving"
        # The rest of the stream is not needed: cancelled, or run already; none lost.
        for _, task_id in urgent:
            client.cancel(task_id)
        ends = {client.wait(task_id, timeout=60).state for _, task_id in urgent}
        assert ends <= {TaskState.SUCCEEDED, TaskState.CANCELLED}, ends


def test_fair_share_converges_to_the_tenant_weights(procs: Processes, settings: Settings) -> None:
    # Three GPUs, tenant a weighted 2, tenant b 1, both with far more work than fits (b's
    # submitted first): while both wait, a should hold two GPUs for each one b holds.
    scheduling = {"ordering": "fair", "tenants": {"a": {"weight": 2}, "b": {"weight": 1}}}
    with Client(settings=settings) as client:
        start(procs, client, scheduling, {"n1": gpu_node(3, 3)}, dispatcher=False)
        ids = {tenant: [client.submit(PROBE, kwargs={"seconds": 0.6}, resources=Resources(gpus=1),
                                      tenant=tenant).id for _ in range(15)] for tenant in ("b", "a")}
        start_dispatcher(procs, scheduling)
        done = {tenant: [client.wait(t, timeout=120) for t in tasks] for tenant, tasks in ids.items()}
        assert all(s.state is TaskState.SUCCEEDED for ss in done.values() for s in ss)
        # GPU-seconds each tenant held while both still had tasks waiting.
        both_waiting_until = min(max(s.reserved_at or 0 for s in ss) for ss in done.values())
        held = {tenant: sum(max(0.0, min(s.finished_at or 0, both_waiting_until) - (s.reserved_at or 0))
                            for s in ss) for tenant, ss in done.items()}
        ratio = held["a"] / held["b"]
        assert 1.5 <= ratio <= 2.6, (ratio, held)


def test_quota_reclaim_preempts_the_borrower_and_requeues_it(procs: Processes, settings: Settings,
                                                             tmp_path: Path) -> None:
    # Two GPUs, one guaranteed to each tenant. b borrows a's idle GPU; when a asks for it back,
    # one of b's tasks (the borrowed one) is stopped, checkpoints, and later resumes and finishes.
    scheduling = {"ordering": "fair", "preempt_grace_s": 5,
                  "tenants": {"a": {"guarantee": {"gpus": 1}}, "b": {"guarantee": {"gpus": 1}}}}
    with Client(settings=settings) as client:
        start(procs, client, scheduling, {"n1": gpu_node(2, 2)})
        b_tasks = [client.submit(CHECKPOINTED, kwargs={"seconds": 4, "path": str(tmp_path / f"b{i}")},
                                 resources=Resources(gpus=1), tenant="b", preemptible=True).id for i in range(2)]
        for task_id in b_tasks:
            running(client, task_id)
        time.sleep(0.5)  # past the victims' minimum runtime (0) and into their work
        a_task = client.submit(PROBE, kwargs={"seconds": 0.5}, resources=Resources(gpus=1), tenant="a").id
        a_done = client.wait(a_task, timeout=30)
        assert a_done.state is TaskState.SUCCEEDED
        b_done = [client.wait(t, timeout=60) for t in b_tasks]
        assert [s.state for s in b_done] == [TaskState.SUCCEEDED] * 2
        assert sorted(s.preemptions for s in b_done) == [0, 1], "exactly one borrower was preempted"
        victim = next(s for s in b_done if s.preemptions)
        assert victim.result["attempt"] == 2 and victim.result["resumed_from"] > 0, victim.result
        assert victim.attempts == 2 and victim.error is None
        # a ran on the GPU the victim gave up, before the victim's second attempt.
        assert a_done.reserved_at < victim.reserved_at


def test_backfill_starts_a_short_task_in_the_shadow_of_a_held_start(procs: Processes, settings: Settings) -> None:
    # The example, with minutes as seconds: one node of 32 GPUs; J1 (priority 10, 1 GPU,
    # 8 s) runs; J2 (priority 5, all 32 GPUs) holds its start at J1's end; J3 (priority 1, 31
    # GPUs, 3 s) fits before that and starts now; J3's 60 s twin would delay J2 and waits.
    with Client(settings=settings) as client:
        start(procs, client, {"ordering": "priority", "mode": "backfill"}, {"n1": gpu_node(32, 4)})
        j1 = client.submit(PROBE, kwargs={"seconds": 5}, resources=Resources(gpus=1), priority=10,
                           estimated_runtime_s=8).id
        running(client, j1)
        j2 = client.submit(PROBE, kwargs={"seconds": 0.5}, resources=Resources(gpus=32), priority=5,
                           estimated_runtime_s=1).id
        twin = client.submit(PROBE, kwargs={"seconds": 0.5}, resources=Resources(gpus=31), priority=1,
                             estimated_runtime_s=60).id
        j3 = client.submit(PROBE, kwargs={"seconds": 1}, resources=Resources(gpus=31), priority=1,
                           estimated_runtime_s=3).id
        j3_done = client.wait(j3, timeout=30)
        # While J3 ran, J2 and the twin waited, and the queue view says why and when.
        queue = {e.id: e for e in client.queue()}
        assert set(queue) >= {j2, twin}
        assert queue[j2].estimated_start_at is not None and "32 GPUs" in (queue[j2].reason or ""), queue[j2]
        assert "held" in (queue[twin].reason or ""), queue[twin]
        j1_done, j2_done, twin_done = (client.wait(t, timeout=60) for t in (j1, j2, twin))
        assert all(s.state is TaskState.SUCCEEDED for s in (j1_done, j2_done, j3_done, twin_done))
        assert j3_done.reserved_at < j1_done.finished_at, "J3 was backfilled while J1 ran"
        assert j2_done.reserved_at >= j1_done.finished_at
        assert twin_done.reserved_at >= j2_done.reserved_at, "the long twin did not delay J2"


def test_preemption_stops_the_minimal_set_and_the_victim_resumes(procs: Processes, settings: Settings,
                                                                 tmp_path: Path) -> None:
    # Four GPUs all busy: v1 (priority 0, 1 GPU), v2 (priority 0, 2 GPUs), v3 (priority 1, 1 GPU),
    # all preemptible. An urgent 2-GPU task needs exactly v2 gone: v1 alone is not enough and
    # v1 + v2 is more than needed.
    with Client(settings=settings) as client:
        start(procs, client, {"ordering": "priority", "preempt_grace_s": 5}, {"n1": gpu_node(4, 4)})
        shapes = {"v2": (2, 0), "v1": (1, 0), "v3": (1, 1)}
        victims = {name: client.submit(CHECKPOINTED, kwargs={"seconds": 3, "path": str(tmp_path / name)},
                                       resources=Resources(gpus=gpus), priority=prio, preemptible=True).id
                   for name, (gpus, prio) in shapes.items()}
        for task_id in victims.values():
            running(client, task_id)
        v2_gpus = client.status(victims["v2"]).gpus
        time.sleep(0.5)
        urgent = client.submit(PROBE, kwargs={"seconds": 0.5}, resources=Resources(gpus=2), priority=10).id
        urgent_done = client.wait(urgent, timeout=30)
        assert urgent_done.state is TaskState.SUCCEEDED
        assert sorted(urgent_done.gpus) == sorted(v2_gpus), "it ran on the GPUs v2 gave up"
        done = {name: client.wait(task_id, timeout=60) for name, task_id in victims.items()}
        assert {name: s.preemptions for name, s in done.items()} == {"v1": 0, "v2": 1, "v3": 0}
        assert all(s.state is TaskState.SUCCEEDED for s in done.values())
        assert done["v2"].result["resumed_from"] > 0 and done["v2"].result["attempt"] == 2
        assert "Preempted" in procs.log("worker-n1") or "preempted" in procs.log("worker-n1")


def test_the_victim_is_the_task_that_checkpointed_last_and_it_resumes_from_its_checkpoint(
        procs: Processes, settings: Settings) -> None:
    # Two equal preemptible tasks fill a 2-GPU node: A started first but reports a checkpoint
    # every 0.2 s (workers.checkpoint); B started later and never does. Stopping A loses at most
    # 0.2 s of work, stopping B all it has done: the urgent task takes A's GPU, and A's next
    # attempt reads its last checkpoint back (last_checkpoint) and goes on from there.
    with Client(settings=settings) as client:
        start(procs, client, {"ordering": "priority", "preempt_grace_s": 5}, {"ckpt": gpu_node(2, 2)})
        a = client.submit("tests.checkpointing", kwargs={"seconds": 8, "every": 0.2}, resources=Resources(gpus=1),
                          preemptible=True).id
        running(client, a)
        time.sleep(1.5)
        b = client.submit("tests.checkpointing", kwargs={"seconds": 8}, resources=Resources(gpus=1),
                          preemptible=True).id
        running(client, b)
        time.sleep(1.0)
        urgent = client.submit(PROBE, resources=Resources(gpus=1), priority=10).id
        assert client.wait(urgent, timeout=30).state is TaskState.SUCCEEDED
        a_done, b_done = client.wait(a, timeout=60), client.wait(b, timeout=60)
        assert (a_done.preemptions, b_done.preemptions) == (1, 0)
        assert a_done.state is b_done.state is TaskState.SUCCEEDED
        assert a_done.result["attempt"] == 2 and a_done.result["resumed_from"] >= 2.0, a_done.result
        assert b_done.result == {"attempt": 1, "resumed_from": 0.0}
