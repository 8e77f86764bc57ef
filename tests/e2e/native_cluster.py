"""The cluster the Celery-native end-to-end modules share (the ``cluster`` fixture in
``tests/e2e/conftest.py`` starts one per module).

Redis, a dispatcher (priority ordering, preemption), node ``nat-gpu`` (2 GPUs, runs
``tests.tasks_for_tests``) and node ``nat-cpu`` (CPUs only, runs only ``workers.tasks``). The
test process is a producer as a user's would be: it imports the tasks module and calls
``.delay()``, ``apply_async``, canvas, ``AsyncResult``; ``Client`` reads the broker's side of
each task (node, GPUs, state) to check what Celery's answer means.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis

from broker import Client, TaskState, TaskStatus
from broker.celery_conf import celery_settings
from broker.errors import TaskNotFound
from broker.settings import Settings
from tests.support import Processes, RedisServer, processes, wait_until
from workers.app import app

POOL = "native"
GPU_NODE, CPU_NODE = "nat-gpu", "nat-cpu"
GRACE_S = 2.0


@dataclass
class Cluster:
    settings: Settings
    procs: Processes
    client: Client
    redis: redis.Redis

    def status(self, task_id: str) -> TaskStatus:
        return self.client.status(task_id)

    def until(self, task_id: str, *states: TaskState, timeout: float = 30) -> TaskStatus:
        def reached() -> TaskStatus | None:
            try:
                status = self.status(task_id)
            except TaskNotFound:  # not taken in yet
                return None
            return status if status.state in states else None

        return wait_until(reached, timeout, what=f"task {task_id} to be {'/'.join(s.value for s in states)}")

    def free_gpus(self, node: str = GPU_NODE) -> int:
        return next(n.free_gpus for n in self.client.nodes() if n.id == node)


@contextmanager
def running_cluster(redis_server: RedisServer, logdir: Path) -> Iterator[Cluster]:
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()  # an earlier test killed it
    r = redis.Redis(port=redis_server.port)
    r.flushall()
    r.script_flush()
    settings = Settings(redis_url=redis_server.url, pool=POOL, lease_s=4, heartbeat_s=0.5, reap_interval_s=0.5,
                        cancel_grace_s=GRACE_S)
    # The producer: the app the tasks are declared on, configured as a user's process would be.
    app.conf.update(celery_settings(settings))
    env = {"GPUBROKER_LEASE_S": "4", "GPUBROKER_HEARTBEAT_S": "0.5", "GPUBROKER_REAP_INTERVAL_S": "0.5",
           "GPUBROKER_CANCEL_GRACE_S": str(GRACE_S)}
    with processes(logdir, settings.redis_url, POOL, env) as procs:
        procs.worker(GPU_NODE, "--tasks", "tests.tasks_for_tests", "--gpus", "2", "--gpu-memory-mb", "16000",
                     "--cpus", "8", "--memory-mb", "16384", "--slots", "4")
        procs.worker(CPU_NODE, "--cpus", "4", "--memory-mb", "8192", "--slots", "2")
        client = Client(settings=settings)
        wait_until(lambda: {n.id for n in client.nodes() if n.state == "up"} == {GPU_NODE, CPU_NODE}, 30,
                   what="both nodes to register")
        procs.spawn("dispatcher", "dispatcher", "--log-level", "INFO",
                    env={"GPUBROKER_SCHEDULING": json.dumps({"ordering": "priority", "preempt_grace_s": 5})})
        try:
            yield Cluster(settings, procs, client, r)
        finally:
            client.close()
            r.close()
