"""End to end: gang preemption both ways (issue 13), through real Redis, a real dispatcher and
real workers on two simulated 4-GPU nodes. A high-priority gang stops the small preemptible
tasks filling both nodes, runs, and the victims resume afterwards; a running preemptible gang
is stopped whole (every member, on both nodes) by a more urgent task, requeued as one unit
without a retry charged, and succeeds later."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker import Client, Resources, TaskState
from broker.settings import Settings
from tests.e2e.test_scheduling import CHECKPOINTED, PROBE, gpu_node, running, start
from tests.support import Processes, wait_until

pytestmark = pytest.mark.e2e

MEMBER = "tests.gang_member"
LONG_FIRST = "tests.gang_long_first"
SCHEDULING = {"ordering": "priority", "preempt_grace_s": 5}
NODES = {"n1": gpu_node(4, 4), "n2": gpu_node(4, 4)}


def test_a_gang_preempts_the_small_tasks_filling_two_nodes_and_they_finish_afterwards(
        procs: Processes, settings: Settings, tmp_path: Path) -> None:
    with Client(settings=settings) as client:
        start(procs, client, SCHEDULING, NODES)
        small = [client.submit(CHECKPOINTED, kwargs={"seconds": 4, "path": str(tmp_path / f"v{i}")},
                               resources=Resources(gpus=1), preemptible=True).id for i in range(8)]
        for task_id in small:
            running(client, task_id)
        gang = client.submit(MEMBER, kwargs={"seconds": 0.5}, resources=Resources(gpus=4), replicas=2, priority=10).id
        done = client.wait(gang, timeout=60)
        assert done.state is TaskState.SUCCEEDED, done
        assert done.members is not None and {m.node for m in done.members} == {"n1", "n2"}
        assert done.preemptions == 0
        victims = [client.wait(task_id, timeout=60) for task_id in small]
        assert all(v.state is TaskState.SUCCEEDED for v in victims), victims
        assert [v.preemptions for v in victims] == [1] * 8, "each small task was stopped once for the gang"
        began = min(client.status(f"{gang}:m{rank}").started_at or 0 for rank in range(2))
        assert all(v.started_at is not None and v.started_at >= began > 0 for v in victims), \
            "the victims ran again only after the gang had started"


def test_a_running_preemptible_gang_is_stopped_whole_and_requeued_uncharged(
        procs: Processes, settings: Settings) -> None:
    with Client(settings=settings) as client:
        start(procs, client, SCHEDULING, NODES)
        # max_retries=0: a preemption charged as a retry would end the gang FAILED.
        gang = client.submit(LONG_FIRST, kwargs={"seconds": 120}, resources=Resources(gpus=4), replicas=2,
                             preemptible=True, max_retries=0).id
        wait_until(lambda: all(m.state is TaskState.RUNNING for m in client.status(gang).members or ()), 30,
                   what="both members to run")
        urgent = client.submit(PROBE, kwargs={"seconds": 0.5}, resources=Resources(gpus=4), priority=10).id
        urgent_done = client.wait(urgent, timeout=60)
        assert urgent_done.state is TaskState.SUCCEEDED, urgent_done
        done = client.wait(gang, timeout=60)
        assert done.state is TaskState.SUCCEEDED, done
        assert (done.preemptions, done.attempts, done.result["attempt"]) == (1, 2, 2)
        members = [client.status(f"{gang}:m{rank}") for rank in range(2)]
        assert [m.result["attempt"] for m in members] == [2, 2]  # every member ran again, as one unit
        assert urgent_done.started_at is not None
        assert all(m.started_at is not None and m.started_at >= urgent_done.started_at for m in members)
        # Every member of the first attempt was stopped, the one on the node the urgent task did
        # not need too (one fate): each worker signalled its member.
        for node in ("n1", "n2"):
            log = procs.log(f"worker-{node}")
            assert any(f"task {gang}:m{r} " in log for r in range(2)) and "SIGTERM" in log, node
