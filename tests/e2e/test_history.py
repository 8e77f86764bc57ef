"""History, usage and health with real dispatcher and worker processes: a known workload on two
nodes and two tenants, then SIGKILL of the dispatcher and of a worker."""

from __future__ import annotations

import subprocess

import pytest

from broker import Client, Resources, TaskState
from broker.settings import Settings
from tests.support import GPUBROKER, ROOT, Processes, wait_until

pytestmark = pytest.mark.e2e

TEST_TASKS = ("--tasks", "tests.tasks_for_tests")
NODE = ("--gpus", "2", "--gpu-memory-mb", "16384", "--cpus", "4", "--memory-mb", "8192", "--slots", "2")


def health(procs: Processes, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GPUBROKER, "health", *args], check=False, cwd=ROOT, env=procs.env, capture_output=True,
                          text=True, timeout=30)


def test_tasks_usage_and_health_with_real_processes(procs: Processes, settings: Settings) -> None:
    dispatcher = procs.dispatcher()
    workers = {node: procs.worker(node, *NODE, "--label", f"zone={zone}", *TEST_TASKS)
               for node, zone in (("n1", "a"), ("n2", "b"))}
    client = Client(settings=settings)
    wait_until(lambda: {n.id for n in client.nodes() if n.state == "up"} == {"n1", "n2"}, 60, what="nodes up")

    def on(zone: str, gpus: int) -> Resources:
        return Resources(gpus=gpus, labels={"zone": zone})

    ids = {
        "a1": client.submit("tests.sleeper", args=(1.0,), resources=on("a", 1), tenant="alpha").id,
        "b1": client.submit("tests.sleeper", args=(2.0,), resources=on("b", 2), tenant="beta").id,
        "b2": client.submit("tests.boom", resources=on("a", 1), tenant="beta").id,
        "a2": client.submit("tests.sleeper", args=(1.0,), resources=on("b", 1), tenant="alpha", countdown=600).id,
    }
    client.cancel(ids["a2"])
    final = {name: client.wait(task_id, 60) for name, task_id in ids.items()}
    assert {n: s.state for n, s in final.items()} == {"a1": TaskState.SUCCEEDED, "b1": TaskState.SUCCEEDED,
                                                      "b2": TaskState.FAILED, "a2": TaskState.CANCELLED}
    names = {v: k for k, v in ids.items()}

    def listed(**options: object) -> set[str]:
        return {names[r.id] for r in client.tasks(**options)}  # type: ignore[arg-type]

    assert listed(state="finished") == {"a1", "b1"}
    assert listed(state="failed") == {"b2"}
    assert listed(state="cancelled") == {"a2"}
    assert listed(state=["running", "pending"]) == set()
    assert listed(tenant="alpha") == {"a1", "a2"}
    assert listed(node="n1") == {"a1", "b2"}
    assert listed(node="n2") == {"b1"}
    assert listed(since="1h", tenant="beta") == {"b1", "b2"}

    usage = {u.key: u for u in client.usage(since="1h")}
    alpha, beta = usage["alpha"], usage["beta"]
    assert (alpha.tasks, alpha.succeeded, alpha.cancelled, beta.tasks, beta.succeeded, beta.failed) == (2, 1, 1, 2,
                                                                                                       1, 1)
    # 1 GPU for 1 s; 2 GPUs for 2 s plus a failure at once (within a second of start-up overhead).
    assert alpha.gpu_hours == pytest.approx(1 / 3600, abs=0.5 / 3600)
    assert beta.gpu_hours == pytest.approx(4 / 3600, abs=1 / 3600)
    by_node = {u.key: u.tasks for u in client.usage(by="node")}
    assert by_node == {"n1": 2, "n2": 1, "-": 1}

    # Health: 0 while they run, non-zero within seconds of a SIGKILL, with a one-line reason.
    assert health(procs, "dispatcher", "--max-age", "3").returncode == 0
    assert health(procs, "worker", "--node", "n1", "--max-age", "3").returncode == 0
    procs.kill(dispatcher)
    failed = wait_until(lambda: (r := health(procs, "dispatcher", "--max-age", "3")).returncode != 0 and r, 10,
                        what="health dispatcher to fail")
    assert failed.returncode == 1 and failed.stderr.strip().startswith("unhealthy: last dispatcher cycle")
    assert health(procs, "worker", "--node", "n2", "--max-age", "3").returncode == 0
    procs.kill(workers["n1"])
    failed = wait_until(lambda: (r := health(procs, "worker", "--node", "n1", "--max-age", "3")).returncode != 0
                        and r, 10, what="health worker to fail")
    assert "n1: last heartbeat" in failed.stderr and len(failed.stderr.strip().splitlines()) == 1
    assert health(procs, "worker", "--node", "n2", "--max-age", "3").returncode == 0
    client.close()
