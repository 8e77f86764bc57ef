"""Jobs larger than any node replay as gangs of whole nodes: all or nothing, one hold, their own figures."""

from __future__ import annotations

import pytest

from broker.scheduling.config import SchedulingConfig
from broker.scheduling.model import NodeFree, Snapshot, TaskRequest
from broker.scheduling.planner import Planner
from broker.sim.engine import simulate
from broker.sim.gangs import GangBook, GangPlanner, gang_shape
from broker.sim.report import metrics
from broker.sim.results import SimResult
from broker.sim.traces import ClusterNode, TraceJob
from tests.support import RedisServer

TWO = [ClusterNode(f"n{i}", gpus=2, gpu_memory_mb=1000, cpus=8, memory_mb=1000, slots=4) for i in (1, 2)]


def run(redis_server: RedisServer, jobs: list[TraceJob], nodes: list[ClusterNode],
        config: SchedulingConfig | None = None, estimates: str = "learned") -> SimResult:
    return simulate(jobs, nodes, config, redis_url=redis_server.url, estimates=estimates)


def timeline(result: SimResult) -> dict[str, tuple[float | None, float | None]]:
    return {o.job.id: (o.started_s, o.finished_s) for o in result.jobs}


def test_gang_shapes_of_whole_nodes() -> None:
    eight = [ClusterNode(f"n{i}", gpus=8) for i in range(4)]
    shape = gang_shape(TraceJob("j", 0, 10, gpus=16, cpus=4), eight)
    assert shape is not None and (shape.replicas, shape.member.gpus, shape.member.cpus) == (2, 8.0, 2.0)
    twelve = gang_shape(TraceJob("j", 0, 10, gpus=12), eight)
    assert twelve is not None and (twelve.replicas, twelve.member.gpus) == (2, 8.0)  # whole nodes
    assert gang_shape(TraceJob("j", 0, 10, gpus=8), eight) is None  # one node holds it
    assert gang_shape(TraceJob("j", 0, 10, gpus=40), eight) is None  # 5 nodes of 8: never, refused as before


def test_a_gang_waits_until_every_member_fits_and_starts_them_together(redis_server: RedisServer) -> None:
    """n2 is free at 1 but n1 holds a until 10: the 2 x 2-GPU gang takes nothing until both
    nodes are free; the 1-GPU job c behind it runs meanwhile (best effort)."""
    jobs = [TraceJob("a", 0, 10, gpus=1), TraceJob("g", 1, 5, gpus=4), TraceJob("c", 2, 3, gpus=1)]
    result = run(redis_server, jobs, TWO)
    assert timeline(result) == {"a": (0, 10), "g": (10, 15), "c": (2, 5)}
    members = sorted((node, gpus) for job, node, gpus, t in result.placements if job == "g")
    assert members == [("n1", (0, 1)), ("n2", (0, 1))]
    assert {t for job, _, _, t in result.placements if job == "g"} == {10.0}
    m = metrics(result)
    assert (m["gang_jobs"], m["rejected"], m["completed"]) == (1, 0, 3)
    assert m["gang_wait_mean"] == 9 and m["single_wait_mean"] == 0
    assert m["allocation_peak"] == 1.0  # the gang's 4 GPUs over [10, 15]


def test_backfill_runs_short_work_before_a_gang_only_if_it_ends_in_time(redis_server: RedisServer) -> None:
    """The gang holds both nodes from 10 (a's end); c (3 s) ends before and runs, d (20 s) would
    delay it and waits for the gang's end."""
    jobs = [TraceJob("a", 0, 10, gpus=1), TraceJob("g", 1, 5, gpus=4), TraceJob("c", 2, 3, gpus=1),
            TraceJob("d", 3, 20, gpus=1)]
    config = SchedulingConfig.parse({"ordering": "fifo", "mode": "backfill"})
    result = run(redis_server, jobs, TWO, config, estimates="true")
    assert timeline(result) == {"a": (0, 10), "g": (10, 15), "c": (2, 5), "d": (15, 35)}


def test_gang_members_are_never_preempted(redis_server: RedisServer) -> None:
    """srtf with every job preemptible: the long gang keeps running while a short job waits."""
    jobs = [TraceJob("g", 0, 100, gpus=4), TraceJob("s", 1, 2, gpus=1)]
    config = SchedulingConfig.parse({"ordering": "srtf", "preemption": True, "preemptible_default": True})
    result = run(redis_server, jobs, TWO, config, estimates="true")
    assert timeline(result) == {"g": (0, 100), "s": (100, 102)}
    assert metrics(result)["preemptions"] == 0


@pytest.mark.parametrize("policy", [{"ordering": "sjf", "mode": "backfill"}, {"ordering": "priority"}])
def test_a_philly_like_day_with_gangs_completes(redis_server: RedisServer, policy: dict[str, str]) -> None:
    """16- and 24-GPU jobs among small ones on four 8-GPU nodes: every job runs, each gang on
    whole nodes, never two jobs on one GPU (the engine checks reservations against start.lua)."""
    nodes = [ClusterNode(f"n{i}", gpus=8, gpu_memory_mb=24576, cpus=48, memory_mb=393216) for i in range(4)]
    jobs = [TraceJob(f"j{i}", i * 30.0, 600.0 + 97 * i % 900, gpus=[1, 2, 4, 8, 16, 1, 24, 2][i % 8],
                     tenant=f"vc{i % 3}") for i in range(40)]
    result = run(redis_server, jobs, nodes, SchedulingConfig.parse(policy), estimates="true")
    m = metrics(result)
    assert (m["jobs"], m["completed"], m["rejected"], m["gang_jobs"]) == (40, 40, 0, 10)
    for o in result.jobs:
        if o.members > 1:
            spots = [(node, gpus, t) for job, node, gpus, t in result.placements if job == o.job.id]
            assert len(spots) == o.members and len({t for _, _, t in spots}) == 1
            assert all(len(gpus) == 8 for _, gpus, _ in spots) and len({n for n, _, _ in spots}) == o.members


def test_without_gangs_a_job_larger_than_any_node_is_refused_as_before(redis_server: RedisServer) -> None:
    result = simulate([TraceJob("g", 0, 5, gpus=4)], TWO, redis_url=redis_server.url, gangs=False)
    assert result.jobs[0].rejected == "resources.gpus: asks 4 GPUs on one node; the largest node has 2"
    assert metrics(result)["gang_jobs"] == 0


def test_the_planner_stand_in_folds_members_and_skips_a_gang_cut_by_the_window() -> None:
    """Members become one gang request at the first member's place; a gang with a member
    outside this pass's window is left for the next; the gang's placement comes back per member."""
    book = GangBook()
    book.add("g", ["g-m0", "g-m1"])
    book.add("h", ["h-m0", "h-m1"])
    nodes = [NodeFree(f"n{i}", 1000, [1000] * 2, [1000] * 2, 8000, 1000, 4) for i in (1, 2)]
    pending = [TaskRequest("a", 1, seq=1), TaskRequest("g-m0", 2, seq=2), TaskRequest("g-m1", 2, seq=3),
               TaskRequest("h-m0", 2, seq=4)]
    planner = GangPlanner(Planner(SchedulingConfig.parse({"preemption": False})), book)
    folded = planner._fold(pending)
    assert [(t.id, t.replicas) for t in folded] == [("a", 1), ("g", 2)]
    plan = planner.plan(Snapshot(0.0, nodes, pending))
    # a takes one GPU of n1: g's two 2-GPU members need two whole nodes, so only a is placed.
    assert [p.task_id for p in plan.placements] == ["a"]
    plan = planner.plan(Snapshot(0.0, [n.copy() for n in nodes], pending[1:]))
    assert sorted((p.task_id, p.node_id) for p in plan.placements) == [("g-m0", "n1"), ("g-m1", "n2")]
