"""Warm pool processes (issue 14): CPU tasks and ``reuse=True`` GPU tasks keep their process and
its module state; every other GPU task gets a fresh one; the guarantees stay.

Real dispatcher, worker and Redis; GPUs are simulated (``--gpus N``): what a task sees is its
``CUDA_VISIBLE_DEVICES``. ``tests.warm_state``/``tests.warm_gpu`` return their pid and how many
tasks their process has run (a module-level counter).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from broker import Client, Resources, TaskState
from broker.settings import Settings
from tests.e2e.test_containment import CGROUPS, NO_CGROUPS, final, marked, ticks
from tests.e2e.test_faults import assert_node_free, wait_nodes_up, wait_state
from tests.support import Processes, wait_until

pytestmark = pytest.mark.e2e

TASKS = ("--tasks", "tests.tasks_for_tests")


def run(client: Client, name: str, gpus: float = 0, **options: Any) -> dict[str, Any]:
    status = final(client, client.submit(name, resources=Resources(gpus=gpus), **options).id)
    assert status.state is TaskState.SUCCEEDED, (status.state, status.error)
    assert status.attempts == 1  # a task handed to a fresh process was not started twice
    result: dict[str, Any] = status.result
    assert result["cuda"] == ",".join(str(g) for g in status.gpus), "it sees exactly its reserved GPUs"
    return result


def test_cpu_tasks_reuse_their_process_and_its_module_state(procs: Processes, settings: Settings) -> None:
    with Client(settings=settings) as client:
        procs.dispatcher()
        procs.worker("n1", "--slots", "1", *TASKS)
        wait_nodes_up(client, ["n1"])
        runs = [run(client, "tests.warm_state") for _ in range(3)]
        assert len({r["pid"] for r in runs}) == 1, runs
        assert [r["runs"] for r in runs] == [1, 2, 3]


def test_a_reuse_gpu_task_keeps_its_process_only_for_the_same_gpus(procs: Processes, settings: Settings) -> None:
    with Client(settings=settings) as client:
        procs.dispatcher()
        procs.worker("n1", "--gpus", "2", "--slots", "1", *TASKS)
        wait_nodes_up(client, ["n1"])
        cpu = run(client, "tests.warm_state")
        one = [run(client, "tests.warm_gpu", gpus=1) for _ in range(3)]
        assert cpu["pid"] != one[0]["pid"], "a process warm for CPU tasks never runs a GPU task"
        by_gpus: dict[str, list[dict[str, Any]]] = {}
        for r in one:
            by_gpus.setdefault(r["cuda"], []).append(r)
        for same in by_gpus.values():  # one process per GPU set, its state kept between tasks
            assert len({r["pid"] for r in same}) == 1 and [r["runs"] for r in same] == list(range(1, len(same) + 1))
        both = run(client, "tests.warm_gpu", gpus=2)
        assert both["cuda"] == "0,1" and both["pid"] not in {r["pid"] for r in one} and both["runs"] == 1
        again = run(client, "tests.warm_gpu", gpus=1)
        assert again["pid"] != both["pid"] and again["runs"] == 1  # GPU 0/1 went to "0,1": no warm one left
        fresh = [run(client, "tests.warm_gpu", gpus=1, reuse=False) for _ in range(2)]
        assert len({r["pid"] for r in [again, *fresh]}) == 3 and [r["runs"] for r in fresh] == [1, 1]
        undeclared = [run(client, "tests.warm_state", gpus=0.5, reuse=True) for _ in range(2)]
        assert undeclared[0]["pid"] == undeclared[1]["pid"] or undeclared[0]["cuda"] != undeclared[1]["cuda"]
        assert_node_free(client, "n1")


@pytest.mark.parametrize("gpus", [0, 1])
def test_cancel_of_a_task_in_a_warm_process_frees_what_it_held(procs: Processes, settings: Settings,
                                                               gpus: int) -> None:
    with Client(settings=settings) as client:
        procs.dispatcher()
        procs.worker("n1", "--gpus", "1", "--slots", "1", *TASKS)
        wait_nodes_up(client, ["n1"])
        name = "tests.warm_gpu" if gpus else "tests.warm_state"
        warm = run(client, name, gpus=gpus)
        task_id = client.submit(name, kwargs={"seconds": 60}, resources=Resources(gpus=gpus)).id
        wait_state(client, task_id, TaskState.RUNNING)
        client.cancel(task_id)
        assert final(client, task_id).state is TaskState.CANCELLED
        assert_node_free(client, "n1")
        after = run(client, name, gpus=gpus)
        assert after["cuda"] == warm["cuda"]
        # The stop reached only the cancelled task: the next one ran to the end, in a process that
        # had run the first (kept warm through the cancel) or in a fresh one, never half-stopped.
        assert (after["pid"] == warm["pid"] and after["runs"] == 3) or after["runs"] == 1
        assert_node_free(client, "n1")


def test_a_killed_warm_process_loses_nothing(procs: Processes, settings: Settings) -> None:
    with Client(settings=settings) as client:
        procs.dispatcher()
        procs.worker("n1", "--gpus", "1", "--slots", "1", *TASKS)
        wait_nodes_up(client, ["n1"])
        warm = run(client, "tests.warm_gpu", gpus=1)
        os.kill(warm["pid"], signal.SIGKILL)  # idle, warm for GPU 0
        after = run(client, "tests.warm_gpu", gpus=1)
        assert after["pid"] != warm["pid"] and after["runs"] == 1
        # Killed while running a task: the attempt is lost and runs again, to the end.
        cpu = run(client, "tests.warm_state")
        killed = client.submit("tests.killed_on_attempts", kwargs={"upto": 1}).id
        done = final(client, killed)
        assert (done.state, done.attempts) == (TaskState.SUCCEEDED, 2), (done.state, done.error)
        assert done.result["pid"] != cpu["pid"]
        wait_until(lambda: run(client, "tests.warm_state")["runs"] >= 1, 30)
        assert_node_free(client, "n1")


def test_a_redelivered_message_whose_attempts_process_is_gone_is_recorded_lost(
        procs: Processes, settings: Settings) -> None:
    """A warm process killed between start.lua and the pool's word that it took the task leaves
    the attempt RUNNING with no WorkerLostError to report it; its message comes back (kombu's
    redelivery). start.lua says ALREADY_RUNNING, and the process it recorded is gone: the attempt
    is recorded lost and runs again, instead of the message being dropped and the task left
    RUNNING for ever on a live node."""
    import subprocess
    import sys

    from broker.store.keys import PoolKeys
    from broker.store.scripts import Scripts, StartCode

    keys = PoolKeys(settings.pool)
    with Client(settings=settings) as client:
        worker = procs.worker("n1", "--slots", "1", *TASKS)
        wait_nodes_up(client, ["n1"])
        with procs.paused(worker):  # the worker takes nothing meanwhile
            procs.dispatcher()
            task = client.submit("tests.warm_state").id
            wait_state(client, task, TaskState.RESERVED, 30)
            message = client.redis.rpop(keys.queue("n1"))  # as the killed process's worker had taken it
            dead = subprocess.Popen([sys.executable, "-c", "pass"])
            dead.wait()
            tag = client.redis.hget(keys.task(task), "tag").decode()
            assert Scripts(client.redis, keys).start(task, "n1", tag, pid=dead.pid)[0] is StartCode.OK
            client.redis.lpush(keys.queue("n1"), message)  # its redelivery
        done = final(client, task)
        assert (done.state, done.attempts) == (TaskState.SUCCEEDED, 2), (done.state, done.error)
        assert "recording it lost" in procs.log("worker-n1")
        assert_node_free(client, "n1")


def test_reuse_that_is_not_a_bool_is_refused_naming_it(settings: Settings) -> None:
    from broker.client import Submit
    from broker.errors import InvalidRequest

    with Client(settings=settings) as client:
        with pytest.raises(InvalidRequest, match="reuse: must be True or False, not str"):
            client.submit("tests.warm_gpu", resources=Resources(gpus=1), reuse="yes")  # type: ignore[arg-type]
        with pytest.raises(InvalidRequest, match=r"requests\[1\]\.reuse: must be True or False"):
            client.submit_many([Submit(task_name="tests.warm_gpu"), Submit(task_name="tests.warm_gpu", reuse=1)])  # type: ignore[arg-type]
        assert client.redis.dbsize() == 0


@pytest.mark.parametrize(("mode", "scrub"), [
    pytest.param(NO_CGROUPS, False, id="no-cgroup"),
    pytest.param({}, True, id="cgroup-no-marker", marks=CGROUPS.marks),  # only the cgroup can find it
])
def test_what_a_task_in_a_warm_process_started_dies_with_its_attempt(procs: Processes, settings: Settings,
                                                                     tmp_path: Path, mode: dict[str, str],
                                                                     scrub: bool) -> None:
    with Client(settings=settings) as client:
        procs.dispatcher()
        procs.spawn("worker-n1", "worker", "--node", "n1", "--slots", "1", *TASKS, env=mode)
        wait_nodes_up(client, ["n1"])
        warm = run(client, "tests.warm_state")
        path = tmp_path / "family"
        done = final(client, client.submit("tests.family", kwargs={"path": str(path), "seconds": 0.3,
                                                                    "scrub": scrub}).id)
        assert done.state is TaskState.SUCCEEDED and done.result["node"] == "n1"
        assert not marked(int(Path(f"{path}.1.pid").read_text())), "the grandchild outlived its attempt"
        assert max(ticks(Path(f"{path}.1"))) < (done.finished_at or 0)
        after = run(client, "tests.warm_state")
        assert (after["pid"], after["runs"]) == (warm["pid"], 2), "the warm process ran the family task and lives on"
        # The warm process itself is killed mid-attempt: its orphan dies before the next attempt runs.
        path = tmp_path / "killed"
        done = final(client, client.submit("tests.family", kwargs={"path": str(path), "seconds": 0.5, "die_on": 1,
                                                                    "scrub": scrub}).id)
        assert (done.state, done.attempts) == (TaskState.SUCCEEDED, 2), (done.state, done.error)
        assert not marked(int(Path(f"{path}.1.pid").read_text()))
        second = ticks(Path(f"{path}.2"))
        assert second and max(ticks(Path(f"{path}.1"))) < min(second), "attempt 1's orphan ran beside attempt 2"
        assert_node_free(client, "n1")


def test_a_warm_process_retires_after_max_tasks_per_process(procs: Processes, settings: Settings) -> None:
    with Client(settings=settings) as client:
        procs.dispatcher()
        procs.spawn("worker-n1", "worker", "--node", "n1", "--slots", "1", *TASKS,
                    env={"GPUBROKER_MAX_TASKS_PER_PROCESS": "2"})
        wait_nodes_up(client, ["n1"])
        runs = [run(client, "tests.warm_state") for _ in range(3)]
        assert [r["runs"] for r in runs] == [1, 2, 1] and runs[0]["pid"] == runs[1]["pid"] != runs[2]["pid"], runs
