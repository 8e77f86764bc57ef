"""The dispatcher's metrics after a known workload, scraped from a real dispatcher process with a
real worker: queue depth by tenant and priority class, age of the oldest pending task, outcomes
and durations by tenant (counted by the scripts, read by the dispatcher), capacity per node,
nodes by state, rejected messages; and a metrics port already taken is a warning, not a crash."""

from __future__ import annotations

import socket
import time
import urllib.request

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from broker import Client, Resources, TaskState
from broker.settings import Settings
from broker.store.keys import PoolKeys
from tests.support import Processes, free_port, wait_until

pytestmark = pytest.mark.e2e

NODE = "n1"
PROBE = "workers.tasks.probe"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset({"pool": "test", **labels}.items())))


def test_metrics_after_a_known_workload(procs: Processes, settings: Settings, redis_client: redis.Redis) -> None:
    port = free_port()
    with Client(settings=settings) as client:
        dispatcher = procs.spawn("dispatcher", "dispatcher", "--metrics-port", str(port))
        wait_until(lambda: _scrapes(port), 30, what="the metrics endpoint")
        # Every series of a tenant present at 0 before anything happens (the endpoint may answer
        # before the dispatcher's first refresh has filled it in).
        wait_until(lambda: value(scrape(port), "gpubroker_tasks_total", tenant="default", outcome="succeeded")
                   is not None, 30, what="the first metrics refresh")
        empty = scrape(port)
        assert value(empty, "gpubroker_tasks_total", tenant="default", outcome="succeeded") == 0
        assert value(empty, "gpubroker_pending_tasks", tenant="default", priority_class="high") == 0
        assert value(empty, "gpubroker_nodes", state="up") == 0

        procs.worker(NODE, "--gpus", "2", "--gpu-memory-mb", "1000", "--cpus", "4", "--memory-mb", "4000",
                     "--slots", "4", "--tasks", "tests.tasks_for_tests")
        wait_until(lambda: [n.state for n in client.nodes()] == ["up"], 30, what="the node to register")
        # carol holds both GPUs, so bob's GPU tasks wait
        hog = client.submit("tests.sleeper", args=(60,), tenant="carol",
                            resources=Resources(gpus=2, cpus=1, memory_mb=1000)).id
        wait_until(lambda: client.status(hog).state is TaskState.RUNNING, 30, what="carol's task to run")
        ok = [client.submit(PROBE, tenant="alice").id for _ in range(3)]
        bad = client.submit("tests.boom", tenant="alice").id
        later = client.submit(PROBE, tenant="alice", countdown=3600).id
        client.cancel(later)
        bob = [client.submit(PROBE, tenant="bob", priority=p, resources=Resources(gpus=1)).id for p in (0, 5)]
        submitted = time.time()
        for task_id in ok:
            assert client.wait(task_id, 30).state is TaskState.SUCCEEDED
        assert client.wait(bad, 30).state is TaskState.FAILED
        redis_client.hincrby(PoolKeys(settings.pool).rejected, NODE, 2)  # as workers.rejects counts one

        def settled() -> Samples | None:
            s = scrape(port)
            done = value(s, "gpubroker_tasks_total", tenant="alice", outcome="failed") == 1
            return s if done and value(s, "gpubroker_rejected_messages_total", node=NODE) == 2 else None

        s = wait_until(settled, 15, what="the outcomes in the metrics")
        for outcome, count in {"succeeded": 3, "failed": 1, "cancelled": 1, "preempted": 0, "requeued": 0}.items():
            assert value(s, "gpubroker_tasks_total", tenant="alice", outcome=outcome) == count, outcome
        for kind in ("wait", "run"):  # the three that succeeded and the one that failed ran
            assert value(s, f"gpubroker_task_{kind}_seconds_count", tenant="alice") == 4
            assert value(s, f"gpubroker_task_{kind}_seconds_bucket", tenant="alice", le="+Inf") == 4
            assert 0 <= (value(s, f"gpubroker_task_{kind}_seconds_sum", tenant="alice") or -1) < 60
        assert value(s, "gpubroker_task_run_seconds_bucket", tenant="alice", le="5.0") == 4
        pending = {(t, c): value(s, "gpubroker_pending_tasks", tenant=t, priority_class=c)
                   for t in ("alice", "bob") for c in ("high", "normal", "low")}
        assert pending == {**dict.fromkeys(pending, 0.0), ("bob", "normal"): 1, ("bob", "high"): 1}
        oldest = value(s, "gpubroker_oldest_pending_seconds", tenant="bob")
        assert oldest is not None and 0 < oldest < time.time() - submitted + 30
        assert value(s, "gpubroker_oldest_pending_seconds", tenant="alice") == 0
        assert {state: value(s, "gpubroker_nodes", state=state) for state in ("up", "draining", "down")} == {
            "up": 1, "draining": 0, "down": 0}
        for name, allocated, free in (("gpus", 2, 0), ("gpu_memory_mb", 2000, 0), ("cpus", 1, 3),
                                      ("memory_mb", 1000, 3000)):
            assert value(s, f"gpubroker_node_{name}", node=NODE, state="allocated") == allocated, name
            assert value(s, f"gpubroker_node_{name}", node=NODE, state="free") == free, name

        # carol's task cancelled while running: the GPUs go to bob, whose tasks run
        client.cancel(hog)
        for task_id in bob:
            assert client.wait(task_id, 30).state is TaskState.SUCCEEDED

        def bob_done() -> Samples | None:
            x = scrape(port)
            return x if value(x, "gpubroker_tasks_total", tenant="bob", outcome="succeeded") == 2 else None

        s = wait_until(bob_done, 15, what="bob's outcomes in the metrics")
        assert value(s, "gpubroker_tasks_total", tenant="carol", outcome="cancelled") == 1
        assert value(s, "gpubroker_tasks_total", tenant="carol", outcome="succeeded") == 0
        assert value(s, "gpubroker_pending_tasks", tenant="bob", priority_class="high") == 0
        assert value(s, "gpubroker_oldest_pending_seconds", tenant="bob") == 0
        assert value(s, "gpubroker_node_gpus", node=NODE, state="free") == 2
        assert dispatcher.poll() is None


def _scrapes(port: int) -> bool:
    try:
        scrape(port)
    except OSError:
        return False
    return True


def test_a_metrics_port_already_taken_is_a_warning(procs: Processes) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        dispatcher = procs.spawn("dispatcher", "dispatcher", "--metrics-port", str(port))
        wait_until(lambda: "metrics not served" in procs.log("dispatcher"), 20, what="the warning")
        time.sleep(1)
        assert dispatcher.poll() is None, procs.log("dispatcher")
        assert "Traceback" not in procs.log("dispatcher")


def test_a_worker_serves_its_own_node_and_processes(procs: Processes, settings: Settings) -> None:
    """``worker --metrics-port``: its lease, what its node holds and its pool processes, read at
    each scrape; a GPU task running shows as an allocated GPU and a busy process, and both are
    free again once it ended."""
    port = free_port()
    with Client(settings=settings) as client:
        procs.dispatcher()
        procs.worker(NODE, "--gpus", "2", "--slots", "2", "--tasks", "tests.tasks_for_tests",
                     "--metrics-port", str(port))
        wait_until(lambda: _scrapes(port), 30, what="the worker's metrics endpoint")
        wait_until(lambda: [n.state for n in client.nodes()] == ["up"], 30, what="the node to register")
        idle = scrape(port)
        assert value(idle, "gpubroker_worker_redis_up", node=NODE) == 1
        assert 0 < (value(idle, "gpubroker_worker_lease_seconds", node=NODE) or 0) <= settings.lease_s
        assert value(idle, "gpubroker_worker_gpus", node=NODE, state="free") == 2
        assert value(idle, "gpubroker_worker_gpus", node=NODE, state="allocated") == 0
        assert value(idle, "gpubroker_pending_tasks", tenant="default", priority_class="high") is None  # not the pool's

        task = client.submit("tests.sleeper", args=(60,), resources=Resources(gpus=1)).id
        wait_until(lambda: client.status(task).state is TaskState.RUNNING, 30, what="the task to run")
        busy = wait_until(lambda: _scraped_with(port, "gpubroker_worker_processes", "busy", 1), 15,
                          what="a busy pool process in the worker's metrics")
        assert value(busy, "gpubroker_worker_gpus", node=NODE, state="allocated") == 1
        assert value(busy, "gpubroker_worker_slots", node=NODE, state="allocated") == 1
        assert value(busy, "gpubroker_worker_tasks", node=NODE) == 1

        client.cancel(task)
        wait_until(lambda: client.status(task).state is TaskState.CANCELLED, 30, what="the task to be cancelled")
        done = wait_until(lambda: _scraped_with(port, "gpubroker_worker_gpus", "free", 2), 30,
                          what="the GPU free again in the worker's metrics")
        assert value(done, "gpubroker_worker_tasks", node=NODE) == 0
        # The process leaves the board just after its outcome is recorded (or it is gone).
        wait_until(lambda: _scraped_with(port, "gpubroker_worker_processes", "busy", 0), 15,
                   what="no busy pool process in the worker's metrics")


def _scraped_with(port: int, name: str, state: str, want: float) -> Samples | None:
    """A scrape of the worker's metrics in which ``name{state}`` of its node reads ``want``."""
    samples = scrape(port)
    return samples if value(samples, name, node=NODE, state=state) == want else None
