"""Node churn with real processes: drain/undrain, a worker stopped with SIGTERM, removing and
forgetting down nodes, the submit-time fit check, and a producer's cancel under the ACL roles.

docs/reliability.md ("Node lifecycle") describes what the user sees in each; a real
redis-server, ``gpubroker dispatcher`` and ``gpubroker worker`` processes run every test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from broker import Client, Resources, TaskState, Unsatisfiable
from broker.errors import NodeNotFound, NodeRejected
from broker.settings import Settings
from broker.store.keys import PoolKeys
from tests.e2e.test_faults import EXECUTED, assert_node_free, wait_nodes_up, wait_state
from tests.invariants import assert_capacity_invariant
from tests.support import GPUBROKER, ROOT, Processes, wait_until
from tests.test_security import FAST_LEASES, SecureRedis, acl_server, admin, fresh_pool, url  # noqa: F401

pytestmark = pytest.mark.e2e

PROBE = "workers.tasks.probe"
NODE = ("--gpus", "2", "--gpu-memory-mb", "16384", "--cpus", "4", "--memory-mb", "8192", "--slots", "2")


def cli(procs: Processes, *args: str) -> subprocess.CompletedProcess[str]:
    """``gpubroker ARGS`` as an operator runs it, against the test's Redis and pool."""
    return subprocess.run([*GPUBROKER, *args], env=procs.env, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)


def reason(client: Client, task_id: str) -> str:
    return client.status(task_id).reason or ""


def node_ids(client: Client) -> list[str]:
    return [n.id for n in client.nodes()]


def test_drain_stops_new_placements_lets_running_finish_and_undrain_resumes(
        procs: Processes, settings: Settings, redis_client: redis.Redis) -> None:
    with Client(settings=settings) as client:
        procs.dispatcher()
        procs.worker("n1", *NODE)
        wait_nodes_up(client, ["n1"])
        running = client.submit(PROBE, kwargs={"seconds": 3}, resources=Resources(gpus=1)).id
        wait_state(client, running, TaskState.RUNNING)

        drained = cli(procs, "drain", "n1")
        assert drained.returncode == 0, drained.stderr
        listed = cli(procs, "nodes")
        assert "draining" in listed.stdout, listed.stdout
        (view,) = client.nodes()
        assert view.draining and view.state == "up"

        waiting = client.submit(PROBE, resources=Resources(gpus=1)).id
        wait_until(lambda: "only draining node n1 could hold it" in reason(client, waiting), 30,
                   what="the waiting reason to name the draining node")
        done = client.wait(running, 30)
        assert (done.state, done.node) == (TaskState.SUCCEEDED, "n1"), "the running task finished on the node"
        # A GPU is free now, and the finish woke the dispatcher: still nothing is placed there.
        wait_until(lambda: client.nodes()[0].free_gpus == 2, 10, what="the finished task's GPU back")
        time.sleep(1.0)
        assert client.status(waiting).state is TaskState.PENDING
        assert "draining" in reason(client, waiting)

        undrained = cli(procs, "undrain", "n1")
        assert undrained.returncode == 0, undrained.stderr
        placed = client.wait(waiting, 30)
        assert (placed.state, placed.node) == (TaskState.SUCCEEDED, "n1"), "placements resumed"
        assert not client.nodes()[0].draining
        assert_capacity_invariant(redis_client, PoolKeys(settings.pool))
        assert_node_free(client, "n1")


def test_sigterm_hands_back_reserved_tasks_lets_running_finish_and_leaves_the_pool(
        procs: Processes, settings: Settings, redis_client: redis.Redis) -> None:
    with Client(settings=settings) as client:
        procs.dispatcher()
        leaving = procs.worker("n1", *NODE)
        procs.worker("n2", *NODE)
        wait_nodes_up(client, ["n1", "n2"])
        client.drain("n2")  # until n1 holds a reserved task: nothing may go to n2
        running = client.submit(PROBE, kwargs={"seconds": 6}, resources=Resources(gpus=1)).id
        wait_state(client, running, TaskState.RUNNING)

        with procs.paused(leaving):  # its message waits unread: the task stays RESERVED on n1
            reserved = client.submit(PROBE, resources=Resources(gpus=1)).id
            assert wait_state(client, reserved, TaskState.RESERVED, 3).node == "n1"
            client.undrain("n2")
            os.kill(leaving.pid, signal.SIGTERM)  # delivered first when the worker resumes
        moved = client.wait(reserved, 30)
        assert (moved.state, moved.node, moved.attempts) == (TaskState.SUCCEEDED, "n2", 2)
        # Handed back, not reaped: n1 is still running its task (and heartbeating) meanwhile.
        assert client.status(running).state is TaskState.RUNNING and leaving.poll() is None
        assert "n1" in node_ids(client) and next(n for n in client.nodes() if n.id == "n1").draining

        done = client.wait(running, 30)
        assert (done.state, done.node, done.attempts) == (TaskState.SUCCEEDED, "n1", 1), "the running one finished"
        assert leaving.wait(60) == 0
        assert node_ids(client) == ["n2"], "the node left the pool"
        log = procs.log("worker-n1")
        assert "handed back 1 task(s)" in log and "left the pool" in log
        assert reserved not in EXECUTED.findall(log), "the handed-back task never ran on n1"
        assert_capacity_invariant(redis_client, PoolKeys(settings.pool))
        assert_node_free(client, "n2")


def test_down_nodes_are_removed_by_hand_or_forgotten_and_the_fit_check_names_them(
        procs: Processes, settings: Settings) -> None:
    procs.spawn("dispatcher", "dispatcher", env={"GPUBROKER_NODE_FORGET_AFTER_S": "8"})
    small = procs.worker("small", "--gpus", "1", "--slots", "1")
    big = procs.worker("big", "--gpus", "4", "--slots", "1")
    gone = procs.worker("gone", "--gpus", "1", "--slots", "1")
    with Client(settings=settings) as client:
        wait_nodes_up(client, ["small", "big", "gone"])
        refused = cli(procs, "nodes", "remove", "small")
        assert refused.returncode == 3 and "node small is up" in refused.stderr, refused.stderr
        with pytest.raises(NodeRejected, match="node small is up"):
            client.remove_node("small")
        with pytest.raises(NodeNotFound, match="no node 'nobody'"):
            client.remove_node("nobody")
        assert node_ids(client) == ["big", "gone", "small"], "nothing changed"
        assert client.submit(PROBE, resources=Resources(gpus=4)).id

        Processes.kill(big)
        Processes.kill(gone)
        wait_until(lambda: {n.id for n in client.nodes() if n.state == "down"} == {"big", "gone"}, 30,
                   what="big and gone to be reaped")
    with Client(settings=settings) as client:  # a fresh client: no cached view of the nodes
        with pytest.raises(Unsatisfiable, match=r"asks 4 GPUs .*only node big, now down, could have held it"):
            client.submit(PROBE, resources=Resources(gpus=4))
        assert client.submit(PROBE, resources=Resources(gpus=1)).id

        removed = cli(procs, "nodes", "remove", "gone")
        assert removed.returncode == 0, removed.stderr
        assert "gone" not in node_ids(client)
        wait_until(lambda: node_ids(client) == ["small"], 30, what="big to be forgotten after 8 s down")
        with pytest.raises(Unsatisfiable, match=r"the largest node has 1$"):
            client.submit(PROBE, resources=Resources(gpus=4))
    assert small.poll() is None


@pytest.fixture
def acl_procs(tmp_path: Path, acl_server: SecureRedis) -> Iterator[Processes]:  # noqa: F811
    procs = Processes(tmp_path, url(acl_server, "monitor"), fresh_pool(), env=FAST_LEASES)
    yield procs
    procs.stop_all()


def test_a_producer_cancels_reserved_and_running_tasks_under_the_acl_roles(
        acl_server: SecureRedis, acl_procs: Processes) -> None:  # noqa: F811
    pool = acl_procs.env["GPUBROKER_POOL"]
    acl_procs.spawn("dispatcher", "dispatcher", env={"GPUBROKER_REDIS_URL": url(acl_server, "dispatcher")})
    worker = acl_procs.spawn("worker-n1", "worker", "--node", "n1", *NODE,
                             env={"GPUBROKER_REDIS_URL": url(acl_server, "worker")})
    with Client(url(acl_server, "producer"), pool=pool) as producer:
        wait_nodes_up(producer, ["n1"])
        running = producer.submit(PROBE, kwargs={"seconds": 60}, resources=Resources(gpus=1)).id
        wait_state(producer, running, TaskState.RUNNING)
        with acl_procs.paused(worker):
            reserved = producer.submit(PROBE, resources=Resources(gpus=1)).id
            wait_state(producer, reserved, TaskState.RESERVED, 3)
            # Asked, then released by the dispatcher (its role may write node state).
            assert producer.cancel(reserved).state in (TaskState.RESERVED, TaskState.CANCELLED)
            assert wait_state(producer, reserved, TaskState.CANCELLED, 3).error == "cancelled"
        assert producer.cancel(running).state is TaskState.RUNNING
        assert producer.wait(running, 20).state is TaskState.CANCELLED
        wait_until(lambda: (n := producer.nodes()[0]).tasks == 0 and n.free_slots == 2 and n.free_gpus == 2, 10,
                   what="n1's capacity whole again")
        assert not EXECUTED.findall(acl_procs.log("worker-n1")), "neither task ran to the end"
