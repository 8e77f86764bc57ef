"""An attempt's processes are one unit, and an attempt stops itself before its lease can expire.

Real dispatcher, workers and Redis. The tasks (``tests.family``, ``tests.ticker``) leave a trace
in files as they run: a grandchild started with ``setsid`` appends the time every 20 ms for as
long as it lives, an attempt appends ``<attempt> <time>``. So each test reads, after the fact,
whether anything of an attempt was still alive when its capacity went to the next one.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from pathlib import Path

import pytest
import redis

from broker import Client, Resources, TaskState, TaskStatus
from broker.settings import Settings
from broker.store.keys import PoolKeys
from tests.e2e.test_faults import assert_node_free, wait_nodes_up, wait_state
from tests.invariants import assert_capacity_invariant
from tests.support import Processes, StallingProxy, wait_until
from workers.unit import cgroup_root

pytestmark = pytest.mark.e2e

TASKS = ("--tasks", "tests.tasks_for_tests")
ONE_GPU = ("--gpus", "1", "--gpu-memory-mb", "16000", "--cpus", "4", "--memory-mb", "8192", "--slots", "2")
NO_CGROUPS = {"GPUBROKER_TASK_CGROUPS": "false"}
CGROUPS = pytest.param({}, id="cgroup", marks=pytest.mark.skipif(
    cgroup_root() is None, reason="this machine does not let the worker create cgroup v2 groups"))
MODES = [CGROUPS, pytest.param(NO_CGROUPS, id="no-cgroup")]


def ticks(path: Path) -> list[float]:
    """The times a grandchild (or an attempt) wrote to ``path``."""
    if not path.exists():
        return []
    return [float(line.split()[-1]) for line in path.read_text().splitlines() if line.strip()]


def marked(pid: int) -> bool:
    """Is ``pid`` alive and still the ticker a test task started (not a process that reused its pid)?"""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z" and b"time.sleep(0.02)" in cmdline


def final(client: Client, task_id: str, timeout: float = 60) -> TaskStatus:
    """The task's status the moment it is first seen final (polled every 10 ms)."""
    status: TaskStatus = wait_until(lambda: (s := client.status(task_id)).state.is_final and s, timeout, 0.01,
                                    what=f"task {task_id} to end")
    return status


@pytest.mark.parametrize("mode", MODES)
def test_what_a_task_started_is_gone_before_its_gpu_is_released(procs: Processes, settings: Settings,
                                                                 tmp_path: Path, mode: dict[str, str]) -> None:
    with Client(settings=settings) as client:
        procs.dispatcher()
        procs.spawn("worker-n1", "worker", "--node", "n1", *ONE_GPU, *TASKS, env=mode)
        wait_nodes_up(client, ["n1"])
        path = tmp_path / "family"
        task_id = client.submit("tests.family", kwargs={"path": str(path), "seconds": 0.5},
                                resources=Resources(gpus=1)).id
        done = final(client, task_id)
        pid = int(Path(f"{path}.1.pid").read_text())
        assert done.state is TaskState.SUCCEEDED
        assert not marked(pid), "the grandchild outlived the attempt that started it"
        assert ticks(Path(f"{path}.1")), "the grandchild ran"
        assert max(ticks(Path(f"{path}.1"))) < (done.finished_at or 0)
        assert_node_free(client, "n1")


@pytest.mark.parametrize(("mode", "scrub"), [
    pytest.param(NO_CGROUPS, False, id="no-cgroup"),
    pytest.param({}, False, id="cgroup", marks=CGROUPS.marks),
    pytest.param({}, True, id="cgroup-no-marker", marks=CGROUPS.marks),  # only the cgroup can find it
])
def test_the_orphans_of_a_killed_attempt_die_before_the_next_attempt_starts(
        procs: Processes, settings: Settings, tmp_path: Path, mode: dict[str, str], scrub: bool) -> None:
    # Attempt 1 starts a grandchild, then is SIGKILLed (as the OOM killer would): the grandchild
    # is an orphan now. It must be gone before attempt 2 gets the GPU.
    with Client(settings=settings) as client:
        procs.dispatcher()
        procs.spawn("worker-n1", "worker", "--node", "n1", *ONE_GPU, *TASKS, env=mode)
        wait_nodes_up(client, ["n1"])
        path = tmp_path / "family"
        task_id = client.submit("tests.family", kwargs={"path": str(path), "seconds": 0.5, "die_on": 1,
                                                        "scrub": scrub}, resources=Resources(gpus=1)).id
        done = final(client, task_id)
        assert (done.state, done.attempts) == (TaskState.SUCCEEDED, 2), (done.state, done.error)
        orphan = int(Path(f"{path}.1.pid").read_text())
        assert not marked(orphan)
        second = ticks(Path(f"{path}.2"))
        assert second and max(ticks(Path(f"{path}.1"))) < min(second), "attempt 1's orphan ran beside attempt 2"
        assert not marked(int(Path(f"{path}.2.pid").read_text()))


def test_cancel_kills_a_stubborn_task_and_everything_it_started(procs: Processes, settings: Settings,
                                                                tmp_path: Path) -> None:
    # The task and its grandchild ignore SIGTERM: after the grace period both are SIGKILLed,
    # and only then does the next task get the GPU.
    with Client(settings=settings) as client:
        procs.dispatcher()
        procs.spawn("worker-n1", "worker", "--node", "n1", *ONE_GPU, *TASKS, env={"GPUBROKER_CANCEL_GRACE_S": "1"})
        wait_nodes_up(client, ["n1"])
        path = tmp_path / "family"
        task_id = client.submit("tests.family", kwargs={"path": str(path), "seconds": 60, "stubborn": True},
                                resources=Resources(gpus=1)).id
        wait_state(client, task_id, TaskState.RUNNING)
        wait_until(lambda: len(ticks(Path(f"{path}.1"))) > 3, 10, what="the grandchild to run")
        assert client.cancel(task_id).state is TaskState.RUNNING  # until its processes are gone
        nxt = tmp_path / "next"
        after = client.submit("tests.ticker", kwargs={"path": str(nxt), "seconds": 0.3}, resources=Resources(gpus=1)).id
        cancelled = final(client, task_id)
        assert cancelled.state is TaskState.CANCELLED
        assert not marked(int(Path(f"{path}.1.pid").read_text()))
        assert client.wait(after, 30).state is TaskState.SUCCEEDED
        assert max(ticks(Path(f"{path}.1"))) < min(ticks(nxt)), "the next task ran beside the cancelled one"
        assert "grace over, SIGKILL" in procs.log("worker-n1")


# ---- self-fencing ----------------------------------------------------------------------------

def _two_nodes(procs: Processes, client: Client, first_url: str | None = None) -> None:
    """n1 (preferred: zone a) and n2, one GPU each; n1 talks to Redis through ``first_url``."""
    procs.dispatcher()
    env = {"GPUBROKER_REDIS_URL": first_url} if first_url else None
    procs.spawn("worker-n1", "worker", "--node", "n1", *ONE_GPU, *TASKS, "--label", "zone=a", env=env)
    procs.spawn("worker-n2", "worker", "--node", "n2", *ONE_GPU, *TASKS, "--label", "zone=b")
    wait_nodes_up(client, ["n1", "n2"])


def _attempts(path: Path) -> dict[int, list[float]]:
    by: dict[int, list[float]] = {}
    for line in path.read_text().splitlines():
        attempt, at = line.split()
        by.setdefault(int(attempt), []).append(float(at))
    return by


def _assert_attempts_never_overlapped(path: Path) -> None:
    """Each attempt that ran had stopped before the next one started."""
    runs = sorted(_attempts(path).items())
    assert len(runs) >= 2, [attempt for attempt, _ in runs]
    for (a, ticks_a), (b, ticks_b) in itertools.pairwise(runs):
        assert max(ticks_a) < min(ticks_b), f"attempt {a} ran {max(ticks_a) - min(ticks_b):.2f}s beside attempt {b}"


def test_a_partitioned_worker_stops_its_task_before_the_lease_expires(procs: Processes, settings: Settings,
                                                                      tmp_path: Path,
                                                                      redis_client: redis.Redis) -> None:
    # n1 reaches Redis through a proxy that stops moving bytes: no error, no reset, nothing.
    proxy = StallingProxy(int(settings.redis_url.rsplit(":", 1)[1].split("/")[0]))
    try:
        with Client(settings=settings) as client:
            _two_nodes(procs, client, proxy.url())
            path = tmp_path / "ticks"
            task_id = client.submit("tests.ticker", kwargs={"path": str(path), "seconds": 12},
                                    resources=Resources(gpus=1, labels={"zone": ["a", "b"]})).id
            assert wait_state(client, task_id, TaskState.RUNNING).node == "n1"
            time.sleep(0.5)
            proxy.stall()
            stalled_at = time.time()
            # The lease (4 s) expires; the dispatcher requeues the task on n2.
            wait_until(lambda: client.status(task_id).attempts == 2, 30, what="the task to be requeued")
            first = _attempts(path)[1]
            assert max(first) - stalled_at < settings.lease_s, "attempt 1 stopped itself within the lease"
            proxy.resume()
            done = client.wait(task_id, 60)
            assert (done.state, done.node, done.result["attempt"]) == (TaskState.SUCCEEDED, "n2", 2)
            _assert_attempts_never_overlapped(path)
            assert "lease was not renewed in time" in procs.log("worker-n1")
            wait_nodes_up(client, ["n1", "n2"], 30)  # n1 came back by itself
            assert procs.procs[1].poll() is None
            assert_capacity_invariant(redis_client, PoolKeys(settings.pool))
    finally:
        proxy.close()


def test_an_attempt_stops_itself_when_its_workers_main_process_freezes(procs: Processes, settings: Settings,
                                                                       tmp_path: Path,
                                                                       redis_client: redis.Redis) -> None:
    # Only the worker's main process stops (its heartbeat with it); the attempt's own process runs
    # on, until it stops itself. (Its report reaches Redis: the task may be placed on n1 again,
    # where the frozen worker never starts it, before n1's lease expires and it goes to n2.)
    with Client(settings=settings) as client:
        _two_nodes(procs, client)
        path = tmp_path / "ticks"
        task_id = client.submit("tests.ticker", kwargs={"path": str(path), "seconds": 12},
                                resources=Resources(gpus=1, labels={"zone": ["a", "b"]})).id
        assert wait_state(client, task_id, TaskState.RUNNING).node == "n1"
        main = procs.procs[1].pid
        os.kill(main, signal.SIGSTOP)
        try:
            wait_until(lambda: client.status(task_id).attempts == 2, 30, what="the task to be requeued")
            done = client.wait(task_id, 60)
        finally:
            os.kill(main, signal.SIGCONT)
        assert (done.state, done.node) == (TaskState.SUCCEEDED, "n2")
        _assert_attempts_never_overlapped(path)
        wait_nodes_up(client, ["n1", "n2"], 30)
        assert procs.procs[1].poll() is None
        assert_capacity_invariant(redis_client, PoolKeys(settings.pool))


def test_every_attempt_of_a_preempted_task_gets_its_sigterm_and_grace(procs: Processes, settings: Settings,
                                                                      tmp_path: Path) -> None:
    # A preemptible task is preempted twice; each attempt must get SIGTERM and the grace period
    # (and so save its checkpoint), not only the first.
    with Client(settings=settings) as client:
        procs.spawn("dispatcher", "dispatcher", "--log-level", "INFO",
                    env={"GPUBROKER_SCHEDULING": '{"ordering": "priority", "preempt_grace_s": 5}'})
        procs.spawn("worker-n1", "worker", "--node", "n1", *ONE_GPU, *TASKS)
        wait_nodes_up(client, ["n1"])
        checkpoint = tmp_path / "ckpt"
        victim = client.submit("tests.checkpointed", kwargs={"seconds": 3, "path": str(checkpoint)},
                               resources=Resources(gpus=1), preemptible=True).id
        saved = []
        for _ in range(2):
            wait_state(client, victim, TaskState.RUNNING)
            time.sleep(0.7)
            urgent = client.submit("workers.tasks.probe", kwargs={"seconds": 0.2}, resources=Resources(gpus=1),
                                   priority=10).id
            assert client.wait(urgent, 30).state is TaskState.SUCCEEDED
            wait_until(checkpoint.exists, 10, what="the checkpoint")
            saved.append(float(checkpoint.read_text()))
        done = client.wait(victim, 60)
        assert (done.state, done.preemptions) == (TaskState.SUCCEEDED, 2)
        assert saved[1] > saved[0] > 0, saved  # the second attempt saved further progress
        assert done.result["resumed_from"] == saved[1]
        sigterms = [line for line in procs.log("worker-n1").splitlines() if f"task {victim} preempted: SIGTERM" in line]
        assert len(sigterms) == 2, sigterms


@pytest.mark.parametrize("mode", MODES)
def test_a_worker_of_the_same_node_name_in_another_pool_leaves_this_ones_tasks_alone(
        procs: Processes, settings: Settings, mode: dict[str, str]) -> None:
    """A starting worker kills what an earlier worker of its node left running on the machine.
    A node of the same name in another pool (or on another Redis) is another node: its start must
    not touch this one's attempts."""
    with Client(settings=settings) as client:
        procs.dispatcher()
        procs.spawn("worker-n1", "worker", "--node", "n1", *ONE_GPU, *TASKS, env=mode)
        wait_nodes_up(client, {"n1"})
        handle = client.submit("tests.sleeper", kwargs={"seconds": 6}, resources=Resources(gpus=1))
        wait_state(client, handle.id, TaskState.RUNNING)
        procs.spawn("worker-n1-other", "worker", "--node", "n1", *ONE_GPU, *TASKS,
                    env={**mode, "GPUBROKER_POOL": "other"})
        with Client(settings=settings.model_copy(update={"pool": "other"})) as other:
            wait_nodes_up(other, {"n1"})
        done = client.wait(handle.id, timeout=60)
        assert done.state is TaskState.SUCCEEDED and done.attempts == 1, done
