"""Elastic requests in the planner (issue 13): min_gpus and min_replicas granted under each rule.

Table-driven: each case is the nodes (GPUs free), what runs, the rule and the pending requests,
and the grant each one gets (GPU count of a task, member count of a gang; None: it waits)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from broker.scheduling.config import SchedulingConfig
from broker.scheduling.elastic import Elastic, bounds, fair_amount, grants, least, sized
from broker.scheduling.fairshare import Ledger
from broker.scheduling.model import Plan, TaskRequest
from tests.scheduling.helpers import MIN, node, planner, running, snapshot, task


def elastic_task(task_id: str, gpus: int, min_gpus: int, **kw: Any) -> TaskRequest:
    return replace(task(task_id, gpus, **kw), min_gpus=min_gpus)


def elastic_gang(task_id: str, replicas: int, min_replicas: int, gpus: float, **kw: Any) -> TaskRequest:
    return replace(task(task_id, gpus, **kw), replicas=replicas, min_replicas=min_replicas)


def grant(plan: Plan, task_id: str) -> int | None:
    """GPUs of a placed task, members of a placed gang; None when it was not placed."""
    for p in plan.placements:
        if p.task_id == task_id:
            return len(p.gpu_indices)
    for g in plan.gangs:
        if g.task_id == task_id:
            return len(g.members)
    return None


# (rule, GPUs free on each 8-GPU node, request (max, min), grant)
GPU_CASES = [
    ("max", [8], (8, 2), 8),
    ("max", [5], (8, 2), 5),  # as much as fits now
    ("max", [5, 3], (8, 2), 5),  # on one node: the node with most room
    ("max", [1], (8, 2), None),  # below its minimum: it waits
    ("min", [8], (8, 2), 2),
    ("min", [3], (8, 2), 2),
    ("fair", [8, 8], (8, 2), 8),  # alone in the pool: its fair share is all 16 GPUs, clamped to 8
]


@pytest.mark.parametrize(("rule", "free", "asked", "granted"), GPU_CASES)
def test_min_gpus_grant_under_each_rule(rule: str, free: list[int], asked: tuple[int, int],
                                        granted: int | None) -> None:
    nodes = [node(f"n{i}", 8) for i in range(len(free))]
    run = [running(f"r{i}", f"n{i}", tuple(range(8 - f))) for i, f in enumerate(free) if f < 8]
    plan = planner(elastic=rule).plan(snapshot(nodes, [elastic_task("e", *asked)], run))
    assert grant(plan, "e") == granted
    for p in plan.placements:  # the grant is whole free GPUs of one node
        assert len(set(p.gpu_indices)) == len(p.gpu_indices)


def test_fair_grants_the_tenants_share_less_what_it_holds() -> None:
    """Two active tenants, equal weights, 16 GPUs: each is owed 8. Tenant a holds 6 already, so
    a's elastic task (2 to 8) is granted 8 - 6 = 2 although 10 are free; b's is granted 8."""
    nodes = [node("n0", 8), node("n1", 8)]
    run = [running("ra", "n0", tuple(range(6)), tenant="a")]
    pending = [elastic_task("ea", 8, 1, tenant="a"), elastic_task("eb", 8, 1, tenant="b")]
    plan = planner(elastic="fair").plan(snapshot(nodes, pending, run))
    assert grant(plan, "ea") == 2 and grant(plan, "eb") == 8


def test_fair_never_grants_below_the_minimum_nor_above_the_most() -> None:
    nodes = [node("n0", 8), node("n1", 8)]
    run = [running("ra", "n0", tuple(range(8)), tenant="a")]  # a holds its whole share already
    pending = [elastic_task("ea", 6, 3, tenant="a"), elastic_task("eb", 4, 1, tenant="b")]
    plan = planner(elastic="fair").plan(snapshot(nodes, pending, run))
    assert grant(plan, "ea") == 3  # share 8 - held 8 = 0: clamped up to its minimum
    assert grant(plan, "eb") == 4  # share 8: clamped down to its most


def test_fair_amount_counts_weights_and_what_the_pass_placed() -> None:
    config = SchedulingConfig.parse({"tenants": {"a": {"weight": 3}}})
    nodes = [node("n0", 8), node("n1", 8)]
    ledger = Ledger(config, nodes, [])
    e = elastic_task("e", 16, 1, tenant="a")
    assert fair_amount(e, ledger, {"a", "b"}) == 12  # 16 x 3 / (3 + 1)
    ledger.add("a", (5.0, 0.0, 0.0))
    assert fair_amount(e, ledger, {"a", "b"}) == 7


def test_min_leaves_the_rest_for_the_tasks_behind() -> None:
    nodes = [node("n0", 8)]
    pending = [elastic_task("e", 8, 2), task("t", 6)]
    assert grant(planner(elastic="min").plan(snapshot(nodes, pending)), "t") == 6
    plan = planner(elastic="max").plan(snapshot(nodes, pending))
    assert grant(plan, "e") == 8 and grant(plan, "t") is None


# (rule, GPUs free on each 8-GPU node, gang (replicas, min_replicas, GPUs per member), members granted)
GANG_CASES = [
    ("max", [8, 8], (8, 2, 4), 4),  # 4 members of 4 GPUs fit on two nodes
    ("max", [8, 4], (8, 2, 4), 3),
    ("max", [4], (8, 2, 4), None),  # one member fits: below its minimum, nothing is placed
    ("min", [8, 8], (8, 2, 4), 2),
    ("fair", [8, 8], (8, 2, 2), 8),  # alone: share 16 GPUs = 8 members of 2
    ("max", [2], (4, 1, 2), 1),  # a gang granted one member is still a gang
]


@pytest.mark.parametrize(("rule", "free", "asked", "granted"), GANG_CASES)
def test_min_replicas_grant_under_each_rule(rule: str, free: list[int], asked: tuple[int, int, int],
                                            granted: int | None) -> None:
    nodes = [node(f"n{i}", 8) for i in range(len(free))]
    run = [running(f"r{i}", f"n{i}", tuple(range(8 - f))) for i, f in enumerate(free) if f < 8]
    plan = planner(elastic=rule).plan(snapshot(nodes, [elastic_gang("g", *asked)], run))
    assert grant(plan, "g") == granted
    assert plan.placements == []  # a gang, whatever its grant, is committed by reserve_gang.lua only


def test_fair_gang_counts_its_members_against_the_tenants_share() -> None:
    """Two tenants over 16 GPUs: a holds 4, so its gang of 2-GPU members gets (8 - 4) / 2 = 2."""
    nodes = [node("n0", 8), node("n1", 8)]
    run = [running("ra", "n0", (0, 1, 2, 3), tenant="a")]
    pending = [elastic_gang("g", 8, 1, 2, tenant="a"), task("tb", 1, tenant="b")]
    plan = planner(elastic="fair").plan(snapshot(nodes, pending, run))
    assert grant(plan, "g") == 2


def test_an_elastic_task_that_fits_nowhere_holds_for_its_minimum() -> None:
    """Backfill: blocked, it holds the earliest start of its minimum (8 GPUs never free up here:
    one runs with no known end); the queue view says what it waits for: its minimum."""
    nodes = [node("n0", 8)]
    run = [running("r", "n0", tuple(range(6)), est=10 * MIN), running("forever", "n0", (7,))]
    plan = planner(mode="backfill", elastic="max").plan(snapshot(nodes, [elastic_task("e", 8, 2, est=MIN)], run))
    assert grant(plan, "e") is None
    assert plan.waiting["e"].estimated_start == 10 * MIN  # its most (8) would never start
    assert plan.waiting["e"].reason.startswith("needs 2 GPUs on one node")


def test_an_elastic_task_preempts_for_its_minimum_only() -> None:
    nodes = [node("n0", 8)]
    run = [running("low", "n0", tuple(range(7)), preemptible=True, priority=0)]
    plan = planner(preemption=True, elastic="max").plan(snapshot(nodes, [elastic_task("e", 8, 2, priority=5)],
                                                                    run))
    assert [p.task_id for p in plan.preemptions] == ["e"]
    assert plan.preemptions[0].victims == ("low",)


def test_helpers_bound_size_and_least() -> None:
    e, g = elastic_task("e", 8, 2), elastic_gang("g", 6, 2, 1)
    assert bounds(e) == (2, 8) and bounds(g) == (2, 6)
    assert sized(e, 5).whole_gpus == 5 and not sized(e, 5).is_elastic
    assert sized(g, 1).is_gang and sized(g, 1).replicas == 1
    assert least(e).whole_gpus == 2 and least(g).replicas == 2
    plain = task("p", 4)
    assert least(plain) is plain and not plain.is_elastic
    assert Elastic("fair") is Elastic.FAIR


def test_the_amounts_tried_start_at_what_could_fit_now() -> None:
    """A request of up to 1024 GPUs tries 5 first on a node with 5 free, not 1024 down to 6; a
    gang's most is the members that fit on all nodes together."""
    nodes = [node("n0", 8), node("n1", 8)]
    snap = snapshot(nodes, [], [running("r", "n0", (0, 1, 2)), running("s", "n1", tuple(range(6)))])
    by_id = {n.id: n for n in snap.nodes}
    ledger = Ledger(SchedulingConfig(), snap.nodes, snap.running)
    amounts = [t.whole_gpus for t in grants(Elastic.MAX, elastic_task("e", 1024, 1), ledger, set(), by_id)]
    assert amounts == [5, 4, 3, 2]
    members = [t.replicas for t in grants(Elastic.MAX, elastic_gang("g", 64, 1, 2), ledger, set(), by_id)]
    assert members == [3, 2]  # 2 members of 2 GPUs on n0, 1 on n1
