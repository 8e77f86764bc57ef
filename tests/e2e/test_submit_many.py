"""End to end: a batch from Client.submit_many runs on a real worker like tasks submitted one by one."""

from __future__ import annotations

import pytest

from broker import Client, Resources, TaskState
from broker.client import Submit
from broker.settings import Settings
from tests.support import Processes, wait_until

pytestmark = pytest.mark.e2e


def test_a_batch_runs_on_a_worker_with_its_resources_and_arguments(procs: Processes, settings: Settings) -> None:
    with Client(settings=settings) as client:
        procs.dispatcher()
        procs.worker("node-a", "--gpus", "2", "--gpu-memory-mb", "40960", "--cpus", "4", "--memory-mb", "8192",
                     "--slots", "4")
        wait_until(lambda: [n.id for n in client.nodes() if n.state == "up"] == ["node-a"], 30,
                   what="the node to register")
        handles = client.submit_many(
            [Submit(task_name="workers.tasks.probe", kwargs={"seconds": 0.01 * (i % 3)},
                    resources=Resources(gpus=1) if i % 2 else Resources(gpus=0.5), idempotency_key=f"batch-{i}")
             for i in range(12)]
            + [{"task_name": "workers.tasks.probe", "idempotency_key": "batch-0"}])  # the first one again
        assert [h.created for h in handles] == [True] * 12 + [False]
        assert handles[-1].id == handles[0].id
        done = [h.wait(timeout=120) for h in handles[:12]]
        assert [s.state for s in done] == [TaskState.SUCCEEDED] * 12, [(s.state, s.error) for s in done]
        for i, s in enumerate(done):
            assert s.node == "node-a" and s.result["node"] == "node-a"
            assert s.result["cuda_visible_devices"] == ",".join(map(str, s.gpus))
            assert len(s.gpus) == 1 and (s.resources.whole_gpus == 1) == bool(i % 2)
