"""End to end: gangs through real Redis, two racing dispatchers and real workers on two simulated
8-GPU nodes. A gang is submitted once, reserved all members or none, each member gets the
rendezvous environment a PyTorch job reads, and no member's code runs before all have started."""

from __future__ import annotations

import importlib.util
import subprocess
import time

import pytest

from broker import Client, Resources, TaskState, TaskStatus
from broker.errors import InvalidRequest, Unsatisfiable
from broker.models import MILLI
from broker.settings import Settings
from tests import tasks_for_tests as t
from tests.e2e.native_cluster import Cluster
from tests.support import Processes, wait_until

pytestmark = pytest.mark.e2e

MEMBER = "tests.gang_member"
NODE = ["--gpus", "8", "--gpu-memory-mb", "16000", "--cpus", "16", "--memory-mb", "65536", "--slots", "8",
        "--tasks", "tests.tasks_for_tests"]


def start(procs: Processes, client: Client) -> dict[str, subprocess.Popen[bytes]]:
    procs.dispatcher()
    procs.dispatcher("dispatcher-2")  # racing dispatchers: reserve_gang.lua re-checks every member
    workers = {node: procs.worker(node, *NODE, "--address", "127.0.0.1") for node in ("n1", "n2")}
    wait_until(lambda: {n.id for n in client.nodes() if n.state == "up"} == {"n1", "n2"}, 30, what="nodes")
    return workers


def member_status(client: Client, gang_id: str, rank: int) -> TaskStatus:
    return client.status(f"{gang_id}:m{rank}")


def free_gpus(client: Client) -> dict[str, int]:
    return {n.id: sum(1 for g in n.gpus if g.free_milli == MILLI) for n in client.nodes()}


def test_gang_submit_refuses_what_can_never_run_naming_the_field(procs: Processes, settings: Settings) -> None:
    with Client(settings=settings) as client:
        start(procs, client)
        with pytest.raises(Unsatisfiable) as caught:  # 2 nodes: 3 members one per node never fit
            client.submit(MEMBER, resources=Resources(gpus=4), replicas=3, spread=True)
        assert "replicas" in caught.value.problems
        with pytest.raises(InvalidRequest) as bad:
            client.submit(MEMBER, resources=Resources(gpus=4), replicas=0)
        assert "replicas" in bad.value.problems
        with pytest.raises(InvalidRequest) as timed:
            client.submit(MEMBER, resources=Resources(gpus=4), replicas=2, countdown=5)
        assert "replicas" in timed.value.problems
        assert client.queue() == []


def test_members_get_the_rendezvous_and_none_runs_before_all_started(procs: Processes, settings: Settings) -> None:
    with Client(settings=settings) as client:
        start(procs, client)
        handle = client.submit(MEMBER, kwargs={"seconds": 0.2}, resources=Resources(gpus=4), replicas=2, spread=True)
        done = client.wait(handle.id, timeout=60)
        assert done.state is TaskState.SUCCEEDED, done
        assert done.members is not None and [m.rank for m in done.members] == [0, 1]
        assert {m.node for m in done.members} == {"n1", "n2"} and all(len(m.gpus) == 4 for m in done.members)
        members = [member_status(client, handle.id, rank) for rank in range(2)]
        assert done.result == members[0].result  # the job's result is rank 0's
        master = members[0].result["node"]
        for rank, m in enumerate(members):
            env = m.result["env"]
            assert (env["WORLD_SIZE"], env["RANK"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("2", str(rank), "0",
                                                                                                    "1")
            assert env["NODE_RANK"] == str(rank) and m.node == done.members[rank].node
            assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"] == members[0].result["env"]["MASTER_PORT"]
            assert env["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, m.gpus))
        assert members[0].node == master
        # The barrier: every member's code began after every member had passed its fence
        # (start.lua's started_at, in ms), and so within moments of each other.
        began = [m.result["began"] for m in members]
        started = [m.started_at for m in members]
        assert all(s is not None for s in started)
        assert min(began) >= max(s for s in started if s is not None) - 0.001, (began, started)
        assert max(began) - min(began) < 2.0, began
        assert free_gpus(client) == {"n1": 8, "n2": 8}


def test_a_gang_packs_onto_the_fewest_nodes(procs: Processes, settings: Settings) -> None:
    with Client(settings=settings) as client:
        start(procs, client)
        handle = client.submit(MEMBER, resources=Resources(gpus=4), replicas=2)
        done = client.wait(handle.id, timeout=60)
        assert done.state is TaskState.SUCCEEDED and done.members is not None
        assert len({m.node for m in done.members}) == 1
        envs = [member_status(client, handle.id, r).result["env"] for r in range(2)]
        assert [(e["LOCAL_RANK"], e["LOCAL_WORLD_SIZE"], e["NODE_RANK"]) for e in envs] == [("0", "2", "0"),
                                                                                              ("1", "2", "0")]


def test_room_for_one_member_of_two_starts_nothing_and_holds_nothing(procs: Processes, settings: Settings) -> None:
    with Client(settings=settings) as client:
        start(procs, client)
        blocker = client.submit("tests.sleeper", kwargs={"seconds": 4}, resources=Resources(gpus=6))
        wait_until(lambda: client.status(blocker.id).state is TaskState.RUNNING, 30, what="the blocker to run")
        node = client.status(blocker.id).node
        handle = client.submit(MEMBER, resources=Resources(gpus=4), replicas=2, spread=True)
        for _ in range(10):  # while the blocker runs: only one node has room for a member
            status = client.status(handle.id)
            assert status.state is TaskState.PENDING and status.members is not None
            assert all(m.node is None for m in status.members)
            other = next(n for n in ("n1", "n2") if n != node)
            assert free_gpus(client)[other] == 8, "a member holds capacity while the other waits"
            if client.status(blocker.id).state.is_final:
                break
            time.sleep(0.25)
        done = client.wait(handle.id, timeout=60)
        assert done.state is TaskState.SUCCEEDED
        blocked = client.status(blocker.id)
        assert blocked.finished_at is not None
        assert all((member_status(client, handle.id, r).reserved_at or 0) >= blocked.finished_at - 0.05
                   for r in range(2))


def test_cancelling_a_running_gang_stops_every_member(procs: Processes, settings: Settings) -> None:
    with Client(settings=settings) as client:
        start(procs, client)
        handle = client.submit(MEMBER, kwargs={"seconds": 60}, resources=Resources(gpus=4), replicas=2, spread=True)
        wait_until(lambda: client.status(handle.id).state is TaskState.RUNNING, 60, what="the gang to run")
        client.cancel(handle.id)
        done = client.wait(handle.id, timeout=60)
        assert done.state is TaskState.CANCELLED
        wait_until(lambda: all(member_status(client, handle.id, r).state.is_final for r in range(2)), 60,
                   what="every member to end")
        assert {member_status(client, handle.id, r).state for r in range(2)} == {TaskState.CANCELLED}
        wait_until(lambda: free_gpus(client) == {"n1": 8, "n2": 8}, 30, what="capacity back")


@pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                    reason="torch is not installed (optional extra gang-test: pip install 'torch==2.13.0+cpu')")
def test_a_gloo_process_group_across_members_on_two_nodes(procs: Processes, settings: Settings) -> None:
    with Client(settings=settings) as client:
        start(procs, client)
        handle = client.submit("tests.gloo_all_reduce", resources=Resources(gpus=1), replicas=2, spread=True)
        done = client.wait(handle.id, timeout=120)
        assert done.state is TaskState.SUCCEEDED, (done, [member_status(client, handle.id, r) for r in range(2)])
        results = [member_status(client, handle.id, r).result for r in range(2)]
        assert results == [{"rank": 0, "world": 2, "sum": 3.0}, {"rank": 1, "world": 2, "sum": 3.0}]
        assert {m.node for m in done.members or []} == {"n1", "n2"}


def test_apply_async_submits_a_gang_and_its_result_is_rank_0s(cluster: Cluster) -> None:
    """The Celery path: ``apply_async(replicas=...)`` on a GpuCelery task; ``AsyncResult.get``
    gives rank 0's return value once every member has succeeded."""
    result = t.gang_member.apply_async(kwargs={"seconds": 0}, resources=Resources(gpus=1), replicas=2)
    value = result.get(timeout=60)
    status = cluster.status(result.id)
    assert status.state is TaskState.SUCCEEDED and status.members is not None and len(status.members) == 2
    assert value == status.result and value["env"]["RANK"] == "0" and value["env"]["WORLD_SIZE"] == "2"


def test_a_failed_member_stops_the_others_and_the_gang_runs_again_whole(procs: Processes,
                                                                         settings: Settings) -> None:
    with Client(settings=settings) as client:
        start(procs, client)
        handle = client.submit("tests.gang_fail_once", kwargs={"seconds": 120}, resources=Resources(gpus=4),
                               replicas=2, spread=True, max_retries=1)
        done = client.wait(handle.id, timeout=120)
        assert done.state is TaskState.SUCCEEDED, done
        assert done.attempts == 2 and done.result == {"attempt": 2, "rank": 0, "pid": done.result["pid"]}
        # Rank 0's first attempt (120 s of work) was stopped once rank 1 failed, not waited for.
        assert done.finished_at is not None and done.finished_at - done.submitted_at < 60
        wait_until(lambda: free_gpus(client) == {"n1": 8, "n2": 8}, 30, what="capacity back")


def test_a_member_node_lost_fails_the_gang_and_stops_the_others(procs: Processes, settings: Settings) -> None:
    with Client(settings=settings) as client:
        workers = start(procs, client)
        handle = client.submit(MEMBER, kwargs={"seconds": 120}, resources=Resources(gpus=4), replicas=2, spread=True,
                               max_retries=0)
        wait_until(lambda: all(m.state is TaskState.RUNNING for m in client.status(handle.id).members or []), 60,
                   what="both members to run")
        lost = member_status(client, handle.id, 1).node
        kept = next(n for n in ("n1", "n2") if n != lost)
        assert lost is not None
        procs.kill(workers[lost])
        done = client.wait(handle.id, timeout=90)
        assert done.state is TaskState.FAILED and "member 1" in (done.error or ""), done
        assert member_status(client, handle.id, 0).state is TaskState.CANCELLED
        wait_until(lambda: free_gpus(client).get(kept) == 8, 30, what="the surviving member's GPUs back")


def test_members_share_one_label_value_when_asked(procs: Processes, settings: Settings) -> None:
    """``same_label="rack"``: rack a has one node, rack b two; two whole-node members can only
    share rack b, though packing in node order alone would take n1 (rack a) and n2."""
    with Client(settings=settings) as client:
        procs.dispatcher()
        for node, rack in (("n1", "a"), ("n2", "b"), ("n3", "b")):
            procs.worker(node, *NODE, "--address", "127.0.0.1", "--label", f"rack={rack}")
        wait_until(lambda: {n.id for n in client.nodes() if n.state == "up"} == {"n1", "n2", "n3"}, 30, what="nodes")
        done = client.wait(client.submit(MEMBER, resources=Resources(gpus=8), replicas=2, same_label="rack").id,
                           timeout=60)
        assert done.state is TaskState.SUCCEEDED and done.members is not None
        assert sorted(m.node or "" for m in done.members) == ["n2", "n3"]
        with pytest.raises(Unsatisfiable) as caught:  # no rack holds three whole-node members
            client.submit(MEMBER, resources=Resources(gpus=8), replicas=3, same_label="rack")
        assert "replicas" in caught.value.problems and "'rack'" in caught.value.problems["replicas"]


def test_a_member_left_alone_at_the_barrier_fails_the_attempt_and_the_gang_runs_again(
        procs: Processes, settings: Settings) -> None:
    """Member 1's worker is frozen after its reservation: member 0 waits at the barrier for
    ``gang_barrier_timeout_s`` (1 s here), not forever, never runs its code alone, and the attempt
    is requeued whole; once the node answers again the gang runs and succeeds."""
    with Client(settings=settings) as client:
        procs.dispatcher()
        workers = {node: procs.spawn(f"worker-{node}", "worker", "--node", node, *NODE, "--address", "127.0.0.1",
                                     env={"GPUBROKER_GANG_BARRIER_TIMEOUT_S": "1"}) for node in ("n1", "n2")}
        wait_until(lambda: {n.id for n in client.nodes() if n.state == "up"} == {"n1", "n2"}, 30, what="nodes")
        with procs.paused(workers["n2"]):
            handle = client.submit(MEMBER, kwargs={"seconds": 0}, resources=Resources(gpus=8), replicas=2,
                                   max_retries=5)
            wait_until(lambda: "had not started after 1s" in (client.status(handle.id).retry_reason or ""), 20,
                       what="the lone member's barrier to time out and the gang to wait again, saying why")
        assert "members [1] had not started" in (client.status(handle.id).retry_reason or "")
        done = client.wait(handle.id, timeout=90)
        assert done.state is TaskState.SUCCEEDED and done.attempts >= 2, done
        assert {m.node for m in done.members or []} == {"n1", "n2"}
        assert done.result["env"]["RANK"] == "0"
        wait_until(lambda: free_gpus(client) == {"n1": 8, "n2": 8}, 30, what="capacity back")
