"""End to end: elastic requests (issue 13) through real Redis, a real dispatcher and real workers
on simulated 8-GPU nodes, under each grant rule of the pool's scheduling config.

Each test first runs a 2-GPU task of tenant a and a 1-GPU (or 4-GPU) task of tenant b, then
submits tenant a's elastic request, and checks what it was granted three ways: the broker's
record (``status``), what its code saw (``CUDA_VISIBLE_DEVICES``, ``GPUBROKER_GPUS``,
``WORLD_SIZE``) and that all capacity comes back."""

from __future__ import annotations

import json

import pytest

from broker import Client, Resources, TaskState
from broker.models import MILLI
from broker.settings import Settings
from tests.support import Processes, wait_until

pytestmark = pytest.mark.e2e

MEMBER = "tests.gang_member"  # returns its environment (GANG_ENV) and node
NODE = ["--gpus", "8", "--gpu-memory-mb", "16000", "--cpus", "16", "--memory-mb", "65536", "--slots", "8",
        "--tasks", "tests.tasks_for_tests", "--address", "127.0.0.1"]


def start(procs: Processes, client: Client, rule: str, nodes: tuple[str, ...]) -> None:
    for node in nodes:
        procs.worker(node, *NODE)
    wait_until(lambda: {n.id for n in client.nodes() if n.state == "up"} == set(nodes), 30, what="nodes")
    procs.spawn("dispatcher", "dispatcher", "--log-level", "INFO",
                env={"GPUBROKER_SCHEDULING": json.dumps({"elastic": rule})})


def run_blocker(client: Client, gpus: int, tenant: str) -> str:
    """A long task of ``tenant`` holding ``gpus`` GPUs, running before the elastic request arrives."""
    handle = client.submit("tests.sleeper", kwargs={"seconds": 60}, resources=Resources(gpus=gpus), tenant=tenant)
    wait_until(lambda: client.status(handle.id).state is TaskState.RUNNING, 30, what=f"{tenant}'s blocker to run")
    return handle.id


def free_gpus(client: Client) -> int:
    return sum(1 for n in client.nodes() for g in n.gpus if g.free_milli == MILLI)


# One 8-GPU node; a holds 2, b holds 1: 5 free. a's request: 1 to 8 GPUs.
# max: all 5 free; min: 1; fair: two active tenants of weight 1 share 8 -> 4 each, a holds 2 -> 2.
@pytest.mark.parametrize(("rule", "granted"), [("max", 5), ("min", 1), ("fair", 2)])
def test_min_gpus_is_granted_by_the_rule_and_the_task_sees_its_grant(procs: Processes, settings: Settings,
                                                                     rule: str, granted: int) -> None:
    with Client(settings=settings) as client:
        start(procs, client, rule, ("n1",))
        blockers = [run_blocker(client, 2, "a"), run_blocker(client, 1, "b")]
        handle = client.submit(MEMBER, resources=Resources(gpus=8, min_gpus=1), tenant="a")
        done = client.wait(handle.id, timeout=60)
        assert done.state is TaskState.SUCCEEDED, done
        assert done.resources == Resources(gpus=8, min_gpus=1)  # what was asked, beside what was granted
        assert len(done.gpus) == granted
        env = done.result["env"]
        assert env["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, done.gpus))
        assert env["GPUBROKER_GPUS"] == str(granted)
        assert env["WORLD_SIZE"] is None  # a single task: no rendezvous
        for blocker in blockers:
            client.cancel(blocker)
        wait_until(lambda: free_gpus(client) == 8, 30, what="every GPU back")


# Two 8-GPU nodes; a holds 4 and b holds 4 (best fit packs both onto one node): 8 free on the
# other. a's gang: 1 to 8 members of 2 GPUs. max: 4 members (the 8 free GPUs); min: 1;
# fair: 16 GPUs over two active tenants -> 8 each, a holds 4 -> (8 - 4) / 2 = 2 members.
@pytest.mark.parametrize(("rule", "granted"), [("max", 4), ("min", 1), ("fair", 2)])
def test_min_replicas_admits_the_members_the_rule_grants(procs: Processes, settings: Settings,
                                                         rule: str, granted: int) -> None:
    with Client(settings=settings) as client:
        start(procs, client, rule, ("n1", "n2"))
        blockers = [run_blocker(client, 4, "a"), run_blocker(client, 4, "b")]
        handle = client.submit(MEMBER, resources=Resources(gpus=2), replicas=8, min_replicas=1, tenant="a")
        done = client.wait(handle.id, timeout=60)
        assert done.state is TaskState.SUCCEEDED, done
        assert done.members is not None and len(done.members) == granted
        assert all(len(m.gpus) == 2 and m.state is TaskState.SUCCEEDED for m in done.members)
        envs = [client.status(f"{handle.id}:m{rank}").result["env"] for rank in range(granted)]
        assert [e["WORLD_SIZE"] for e in envs] == [str(granted)] * granted
        assert [e["RANK"] for e in envs] == [str(rank) for rank in range(granted)]
        assert all(e["GPUBROKER_GPUS"] == "2" for e in envs)
        for blocker in blockers:
            client.cancel(blocker)
        wait_until(lambda: free_gpus(client) == 16, 30, what="every GPU back")


def test_elastic_bounds_are_checked_before_anything_is_written(procs: Processes, settings: Settings) -> None:
    from broker.errors import InvalidRequest, Unsatisfiable

    with Client(settings=settings) as client:
        start(procs, client, "max", ("n1",))
        with pytest.raises(InvalidRequest) as bad:
            client.submit(MEMBER, resources=Resources(gpus=8), replicas=4, min_replicas=5)
        assert list(bad.value.problems) == ["min_replicas"]
        with pytest.raises(Unsatisfiable) as never:  # one 8-GPU node: 3 members of 4 can never all run
            client.submit(MEMBER, resources=Resources(gpus=4), replicas=4, min_replicas=3)
        assert "min_replicas" in never.value.problems
        with pytest.raises(Unsatisfiable):  # its minimum is larger than any node
            client.submit(MEMBER, resources=Resources(gpus=16, min_gpus=9))
        assert client.queue() == []
        # ...while a maximum above any node is fine: it is granted what fits.
        done = client.wait(client.submit(MEMBER, resources=Resources(gpus=16, min_gpus=2)).id, timeout=60)
        assert done.state is TaskState.SUCCEEDED and len(done.gpus) == 8
