"""Warm affinity (issue 14): the dispatcher sends a ``reuse=True`` task to the node and GPU set
whose warm process last ran its name, and workers count warm hits and misses.

Real dispatcher, workers and Redis; GPUs are simulated (``--gpus 2``). ``tests.warm_gpu`` is
declared ``reuse=True`` and returns its pid and how many tasks its process has run.
"""

from __future__ import annotations

import pytest

from broker import Client, Resources, TaskState
from broker.scheduling.model import Placement
from broker.settings import Settings
from broker.store import warm_map
from broker.store.scripts import ReserveCode, Scripts
from tests.e2e.test_containment import final
from tests.e2e.test_faults import wait_nodes_up, wait_state
from tests.e2e.test_metrics import scrape, value
from tests.e2e.test_warm import TASKS, run
from tests.support import Processes, free_port, wait_until

pytestmark = pytest.mark.e2e

A = "tests.warm_gpu"
NODE = ("--gpus", "2", "--slots", "1", *TASKS)


def starts(client: Client) -> dict[str, tuple[int, int]]:
    return {n.id: n.warm_starts for n in client.nodes()}


def test_a_reuse_task_goes_where_its_name_is_warm_though_another_node_comes_first(
        procs: Processes, settings: Settings) -> None:
    with Client(settings=settings) as client:
        procs.worker("node-b", *NODE)
        wait_nodes_up(client, ["node-b"])
        # No dispatcher yet: the first A is reserved node-b's GPU 1 by reserve.lua, as a dispatcher would.
        first_id = client.submit(A, resources=Resources(gpus=1)).id
        assert Scripts(client.redis, client.keys).reserve([Placement(first_id, "node-b", (1,))]) == [ReserveCode.OK]
        first = final(client, first_id)
        assert (first.state, first.node, first.gpus) == (TaskState.SUCCEEDED, "node-b", [1]), first.error
        wait_until(lambda: warm_map.read_warm(client.redis, client.keys)[1].by_name == {A: {"node-b": [(1,)]}}, 10,
                   what="node-b to publish its process warm for GPU 1")
        procs.worker("node-a", *NODE)  # node-a, GPU 0 comes first in the default order (best fit ties by id)
        procs.dispatcher()
        wait_nodes_up(client, ["node-a", "node-b"])
        second = final(client, client.submit(A, resources=Resources(gpus=1)).id)
        assert (second.state, second.node, second.gpus) == (TaskState.SUCCEEDED, "node-b", [1]), second.error
        assert second.result["pid"] == first.result["pid"] and second.result["runs"] == 2, second.result
        # The first started in a fresh process (a miss), the second in the warm one (a hit).
        wait_until(lambda: starts(client) == {"node-a": (0, 0), "node-b": (1, 1)}, 10,
                   what=f"warm starts counted ({starts(client)})")
        other = run(client, "tests.warm_state", gpus=1, reuse=True)  # another name: placed as before
        assert other["cuda"] == "0" and other["pid"] != second.result["pid"]


def test_without_a_free_warm_set_a_task_is_placed_as_before_and_counts_a_miss(
        procs: Processes, settings: Settings) -> None:
    with Client(settings=settings) as client:
        procs.dispatcher()
        procs.worker("node-a", *NODE)
        procs.worker("node-b", *NODE)
        wait_nodes_up(client, ["node-a", "node-b"])
        first = final(client, client.submit(A, resources=Resources(gpus=1)).id)
        assert (first.node, first.gpus) == ("node-a", [0])  # nothing warm yet: the default order
        wait_until(lambda: warm_map.read_warm(client.redis, client.keys)[1].by_name == {A: {"node-a": [(0,)]}}, 10,
                   what="node-a to publish its process warm for GPU 0")
        busy = client.submit(A, resources=Resources(gpus=1), kwargs={"seconds": 3}).id  # takes the warm set: a hit
        assert wait_state(client, busy, TaskState.RUNNING).node == "node-a"
        # node-a's one slot is busy: the next A does not wait for it, and starts cold on node-b.
        cold = final(client, client.submit(A, resources=Resources(gpus=1)).id)
        assert (cold.state, cold.node) == (TaskState.SUCCEEDED, "node-b"), cold.error
        assert final(client, busy).state is TaskState.SUCCEEDED
        wait_until(lambda: starts(client) == {"node-a": (1, 1), "node-b": (0, 1)}, 10,
                   what=f"warm starts counted ({starts(client)})")


def test_warm_hits_and_misses_in_the_worker_and_dispatcher_metrics(procs: Processes, settings: Settings) -> None:
    pool_port, worker_port = free_port(), free_port()
    with Client(settings=settings) as client:
        procs.spawn("dispatcher", "dispatcher", "--metrics-port", str(pool_port))
        procs.worker("node-a", *NODE, "--metrics-port", str(worker_port))
        wait_nodes_up(client, ["node-a"])
        for _ in range(2):  # cold (a miss), then warm (a hit)
            run(client, A, gpus=1)

        def counted(port: int, name: str) -> bool:
            samples = scrape(port)
            return (value(samples, name, node="node-a", result="hit"),
                    value(samples, name, node="node-a", result="miss")) == (1, 1)

        wait_until(lambda: counted(worker_port, "gpubroker_worker_warm_starts_total"), 15,
                   what="the worker's warm starts")
        wait_until(lambda: counted(pool_port, "gpubroker_warm_starts_total"), 30, what="the pool's warm starts")


def test_each_task_reaches_the_pool_process_warm_for_it(procs: Processes, settings: Settings) -> None:
    """Two names warm on two GPUs of one node, two pool processes: the dispatcher keeps B off A's
    GPU, and the worker hands each message to the process warm for its GPUs (Celery would give
    it to the first idle process, which would hand it back and exit)."""
    with Client(settings=settings) as client:
        procs.dispatcher()
        procs.worker("node-a", "--gpus", "2", "--slots", "2", *TASKS)
        wait_nodes_up(client, ["node-a"])
        by_name: dict[str, list[dict[str, object]]] = {A: [], "tests.warm_state": []}
        for _ in range(3):
            by_name[A].append(run(client, A, gpus=1))
            by_name["tests.warm_state"].append(run(client, "tests.warm_state", gpus=1, reuse=True))
        for name, runs in by_name.items():
            assert len({r["cuda"] for r in runs}) == 1 and len({r["pid"] for r in runs}) == 1, (name, runs)
            assert [r["runs"] for r in runs] == [1, 2, 3], (name, runs)
        assert by_name[A][0]["cuda"] != by_name["tests.warm_state"][0]["cuda"]
        wait_until(lambda: starts(client) == {"node-a": (4, 2)}, 10, what=f"warm starts counted ({starts(client)})")
