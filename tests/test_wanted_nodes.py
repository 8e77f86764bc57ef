"""gpubroker_wanted_nodes from a real dispatcher against a real Redis: after a known workload (a
full cluster of 8-GPU nodes and three more 8-GPU tasks) it asks for three more such nodes, and
for none once they registered and took the tasks."""

from __future__ import annotations

import redis
from prometheus_client import REGISTRY

from broker.dispatcher import Dispatcher
from broker.models import Resources
from broker.settings import Settings
from broker.store.scripts import Scripts
from tests.invariants import register_node, submit_task, task_hash

EIGHT = "gpus=8,gpu_memory_mb=81920,cpus=64,memory_mb=524288"
ONE = "gpus=1,gpu_memory_mb=24576,cpus=8,memory_mb=65536"


def wanted(pool: str) -> dict[str, float]:
    return {s.labels["shape"]: s.value for family in REGISTRY.collect() if family.name == "gpubroker_wanted_nodes"
            for s in family.samples if s.labels["pool"] == pool}


def test_wanted_nodes_after_a_known_workload_and_none_once_the_capacity_is_there(
        settings: Settings, redis_client: redis.Redis) -> None:
    own = settings.model_copy(update={"pool": "wanted", "explain_interval_s": 0.001})  # metrics every cycle
    dispatcher = Dispatcher(own, client=redis_client)
    scripts: Scripts = dispatcher.scripts

    def add(node_id: str, gpus: int = 8, gpu_mem: int = 81920, cpus: float = 64, mem: int = 524288) -> None:
        register_node(scripts, node_id, gpus=gpus, gpu_mem=gpu_mem, cpus=cpus, mem=mem, lease_ms=3_600_000)

    dispatcher.run_cycle()
    assert wanted("wanted") == {}, "no node registered: no shape known yet"
    for node_id in ("a", "b"):
        add(node_id)
    add("small", gpus=1, gpu_mem=24576, cpus=8, mem=65536)
    dispatcher.run_cycle()
    assert wanted("wanted") == {EIGHT: 0, ONE: 0}  # every shape's series, at 0 while nothing waits

    eight = Resources(gpus=8, cpus=1, memory_mb=1024)
    first = [submit_task(scripts, resources=eight) for _ in range(2)]
    dispatcher.run_cycle()
    assert all(task_hash(redis_client, scripts.keys, t)["state"] == "RESERVED" for t in first)  # the cluster is full
    waiting = [submit_task(scripts, resources=eight) for _ in range(3)]
    dispatcher.run_cycle()
    assert wanted("wanted") == {EIGHT: 3, ONE: 0}  # a 1-GPU node holds none of them

    for node_id in ("c", "d", "e"):
        add(node_id)
    dispatcher.run_cycle()
    assert all(task_hash(redis_client, scripts.keys, t)["state"] == "RESERVED" for t in waiting)
    dispatcher.run_cycle()
    assert wanted("wanted") == {EIGHT: 0, ONE: 0}
