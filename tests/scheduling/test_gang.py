"""Gangs in the planner: all or nothing, fewest nodes, spread, same_label, fair share, backfill, words."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from broker.errors import InvalidRequest
from broker.models import SubmitRequest
from broker.scheduling.model import NodeFree, Plan, TaskRequest, demand
from broker.store.records import StoredRequest, UnreadableRecord, decode_request, encode_request, task_request
from tests.scheduling.helpers import MIN, node, placed, planner, running, snapshot, task


def gang(task_id: str, replicas: int, gpus: float, *, spread: bool = False, same_label: str | None = None,
         **kw: Any) -> TaskRequest:
    return replace(task(task_id, gpus, **kw), replicas=replicas, spread=spread, same_label=same_label)


def members(plan: Plan, task_id: str) -> list[tuple[str, tuple[int, ...]]]:
    """The gang's members as (node, GPUs), rank order; [] when it was not placed."""
    found = [g for g in plan.gangs if g.task_id == task_id]
    return [(p.node_id, p.gpu_indices) for p in found[0].members] if found else []


def test_room_for_one_of_two_members_places_nothing() -> None:
    """All or nothing: one 8-GPU node free, the gang asks two; no member is proposed or held."""
    nodes = [node("a", 8), node("b", 8)]
    plan = planner().plan(snapshot(nodes, [gang("g", 2, 8)], [running("r", "b", (0,))]))
    assert plan.gangs == [] and plan.placements == []
    assert plan.waiting["g"].reason == "needs 2 × 8 GPUs; 1 node can hold members now"


def test_a_gang_takes_no_single_placement_and_later_tasks_still_run() -> None:
    """Best effort: the gang that cannot start leaves its capacity to the tasks behind it."""
    nodes = [node("a", 8), node("b", 8)]
    plan = planner().plan(snapshot(nodes, [gang("g", 3, 8), task("t", 8)]))
    assert members(plan, "g") == [] and placed(plan) == {"t": ("a", tuple(range(8)))}


@pytest.mark.parametrize("placement", ["best_fit", "spread", "first_fit", "frag_aware"])
def test_two_four_gpu_members_share_one_free_node(placement: str) -> None:
    """Fewest nodes first, whatever the placer: one free 8-GPU node beats two half-free ones."""
    nodes = [node("a", 8), node("b", 8), node("c", 8)]
    run = [running("ra", "a", (0, 1, 2, 3)), running("rc", "c", (0, 1, 2, 3))]
    plan = planner(placement=placement).plan(snapshot(nodes, [gang("g", 2, 4)], run))
    assert members(plan, "g") == [("b", (0, 1, 2, 3)), ("b", (4, 5, 6, 7))]


def test_packing_fills_the_largest_then_the_tightest() -> None:
    """Three 2-GPU members: the 4-free node takes two, then the 2-free node (not the 8-free) the last."""
    nodes = [node("big", 8), node("four", 8), node("two", 8)]
    run = [running("r4", "four", (0, 1, 2, 3)), running("r2", "two", (0, 1, 2, 3, 4, 5))]
    plan = planner().plan(snapshot(nodes, [gang("g", 5, 2)], run))
    # 5 members of 2: big holds 4 of them, then one more: two (1 free slot of 2) is the tightest.
    assert members(plan, "g") == [("big", (0, 1)), ("big", (2, 3)), ("big", (4, 5)), ("big", (6, 7)),
                                  ("two", (6, 7))]


def test_spread_puts_one_member_per_node() -> None:
    nodes = [node("a", 8), node("b", 8), node("c", 8)]
    plan = planner().plan(snapshot(nodes, [gang("g", 3, 2, spread=True)]))
    assert sorted(n for n, _ in members(plan, "g")) == ["a", "b", "c"]
    plan = planner().plan(snapshot(nodes, [gang("g", 4, 2, spread=True)]))
    assert members(plan, "g") == []
    assert "needs 4 × 2 GPUs one per node; 3 nodes can hold members now" == plan.waiting["g"].reason


def test_same_label_keeps_members_on_one_value() -> None:
    """rack r1 has room for one 8-GPU member on each of two nodes split across racks: only r2 has two."""
    nodes = [node("a", 8, rack="r1"), node("b", 8, rack="r2"), node("c", 8, rack="r1"), node("d", 8, rack="r2"),
             node("x", 8)]
    run = [running("busy", "c", (0,))]
    plan = planner().plan(snapshot(nodes, [gang("g", 2, 8, same_label="rack")], run))
    assert [n for n, _ in members(plan, "g")] == ["b", "d"]
    plan = planner().plan(snapshot(nodes, [gang("g", 3, 8, same_label="rack")], run))
    assert members(plan, "g") == []
    assert plan.waiting["g"].reason == "needs 3 × 8 GPUs on nodes sharing one rack; 3 nodes can hold members now"


def test_same_label_prefers_the_group_needing_fewest_nodes() -> None:
    nodes = [node("a", 4, zone="z1"), node("b", 4, zone="z1"), node("c", 8, zone="z2")]
    plan = planner().plan(snapshot(nodes, [gang("g", 2, 4, same_label="zone")]))
    assert [n for n, _ in members(plan, "g")] == ["c", "c"]


def test_labels_and_members_of_a_share() -> None:
    """A member's labels must match; share members pack onto one GPU as single shares do."""
    nodes = [node("a", 2, gpu="A100"), node("h", 1, gpu="H100")]
    plan = planner().plan(snapshot(nodes, [gang("g", 2, 0.5, gpu="H100")]))
    assert members(plan, "g") == [("h", (0,)), ("h", (0,))]


def test_fair_share_counts_the_sum_of_members() -> None:
    """Under fair, a tenant's gang of 2 x 4 GPUs counts 8 GPUs: the other tenant goes next."""
    nodes = [node("a", 8), node("b", 8), node("c", 4)]
    pending = [gang("g", 2, 4, tenant="x", seq=1), task("x2", 4, tenant="x", seq=2), task("y1", 4, tenant="y", seq=3),
               task("y2", 4, tenant="y", seq=4)]
    plan = planner(ordering="fair").plan(snapshot(nodes, pending))
    assert members(plan, "g") and [p.task_id for p in plan.placements][:1] == ["y1"]
    assert demand(pending[0]) == (8.0, 0.0, 0.0)


def test_quota_refuses_a_gang_by_its_sum() -> None:
    config = {"ordering": "fair", "tenants": {"x": {"guarantee": {"gpus": 4}, "borrowing_limit": {"gpus": 2}}}}
    plan = planner(**config).plan(snapshot([node("a", 8), node("b", 8)], [gang("g", 2, 4, tenant="x")]))
    assert members(plan, "g") == []
    assert "tenant x over quota" in plan.waiting["g"].reason and "needs 8 more" in plan.waiting["g"].reason


def test_backfill_holds_the_nodes_a_gang_waits_for() -> None:
    """Two nodes busy until 60 and 120 min: the gang of two 8-GPU members is held to start at
    120 min; a 30-min task may run before it on the free node (ends in time), a 3-hour one may not."""
    nodes = [node("a", 8), node("b", 8), node("c", 8)]
    run = [running("ra", "a", tuple(range(8)), est=60 * MIN), running("rb", "b", tuple(range(8)), est=120 * MIN),
           running("rc", "c", (0,), est=10 * MIN)]
    pending = [gang("g", 2, 8, est=60 * MIN), task("long", 4, est=180 * MIN), task("short", 4, est=30 * MIN)]
    plan = planner(mode="backfill").plan(snapshot(nodes, pending, run))
    assert members(plan, "g") == []
    assert plan.waiting["g"].estimated_start == 60 * MIN  # a at 60 and c at 10: the first two nodes free
    assert "short" in placed(plan) and "long" not in placed(plan)
    assert plan.waiting["long"].reason == "held for higher-ranked task g (backfill)"


def test_backfill_a_gang_goes_ahead_when_it_ends_in_time() -> None:
    """A blocked 3-node gang holds a, b, c from 60 min; a 2 x 4-GPU gang of 30 min runs on c
    before it (ends in time), one of 90 min is held."""
    nodes = [node("a", 8), node("b", 8), node("c", 8)]
    run = [running("ra", "a", tuple(range(8)), est=60 * MIN), running("rb", "b", tuple(range(8)), est=45 * MIN)]
    pending = [gang("big", 3, 8, est=60 * MIN), gang("late", 2, 4, est=90 * MIN), gang("soon", 2, 4, est=30 * MIN)]
    plan = planner(mode="backfill").plan(snapshot(nodes, pending, run))
    assert plan.waiting["big"].estimated_start == 60 * MIN
    assert members(plan, "soon") == [("c", (0, 1, 2, 3)), ("c", (4, 5, 6, 7))]
    assert members(plan, "late") == [] and plan.waiting["late"].reason == "held for higher-ranked task big (backfill)"


def test_strict_stops_behind_a_gang() -> None:
    nodes = [node("a", 8)]
    plan = planner(mode="strict").plan(snapshot(nodes, [gang("g", 2, 8), task("t", 1)]))
    assert plan.placements == [] and plan.waiting["t"].reason == "behind g (strict order)"


def test_gang_preempts_on_several_nodes_and_singles_still_do() -> None:
    def cluster() -> list[NodeFree]:
        return [node("a", 8), node("b", 8)]

    run = [running("low", "a", tuple(range(8)), priority=0, preemptible=True),
           running("low2", "b", tuple(range(8)), priority=0, preemptible=True)]
    plan = planner(preemption=True).plan(snapshot(cluster(), [gang("g", 2, 8, priority=5)], run))
    assert sorted((p.node_id, p.victims) for p in plan.preemptions) == [("a", ("low",)), ("b", ("low2",))]
    assert members(plan, "g") == []  # placed once the victims are gone (tests/scheduling/test_gang_preempt.py)
    plan = planner(preemption=True).plan(snapshot(cluster(), [task("t", 8, priority=5)], run))
    assert [p.task_id for p in plan.preemptions] == ["t"]


def test_no_node_can_hold_a_member() -> None:
    plan = planner().plan(snapshot([node("a", 8)], [gang("g", 2, 16)]))
    assert plan.waiting["g"].reason == ("needs 2 × 16 GPUs; no node can hold a member now: needs 16 GPUs on one "
                                        "node; no matching node has that many")


def test_replicas_below_one_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"pending\[0\]\.replicas: must be at least 1"):
        planner().plan(snapshot([node("a", 8)], [gang("g", 0, 1)]))


def test_one_replica_is_a_single_task() -> None:
    """replicas=1 (whatever spread and same_label say) places as today, in Plan.placements."""
    single = gang("t", 1, 2, spread=True, same_label="rack")
    plan = planner().plan(snapshot([node("a", 8)], [single]))
    assert placed(plan) == {"t": ("a", (0, 1))} and plan.gangs == []
    assert single.shape == task("t", 2).shape


@pytest.mark.parametrize(("fields", "field", "words"), [
    ({"replicas": 0}, "replicas", "greater than or equal to 1"),
    ({"replicas": 5000}, "replicas", "less than or equal to 1024"),
    ({"replicas": "2"}, "replicas", "integer"),
    ({"spread": "yes"}, "spread", "boolean"),
    ({"same_label": "no spaces"}, "same_label", "not a valid label key"),
])
def test_submit_request_names_the_gang_field(fields: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        SubmitRequest(task_name="workers.tasks.probe", **fields)
    assert field in caught.value.problems and words in caught.value.problems[field]


def test_submit_request_gang_defaults_and_a_valid_gang() -> None:
    assert (SubmitRequest(task_name="a.b").replicas, SubmitRequest(task_name="a.b").spread) == (1, False)
    req = SubmitRequest(task_name="a.b", replicas=4, spread=True, same_label="rack")
    assert (req.replicas, req.spread, req.same_label) == (4, True, "rack")


def test_a_gangs_request_carries_its_shape_and_reads_back() -> None:
    """The stored request of a gang says how many members and where (k, sp, sl); a member's,
    and a single task's, are the bytes they always were (reserve.lua reads them)."""
    req = SubmitRequest(task_name="a.b", replicas=3, spread=True, same_label="rack")
    wire = decode_request(StoredRequest.of(req).text)
    assert (wire["k"], wire["sp"], wire["sl"]) == (3, True, "rack")
    back = task_request("g", wire)
    assert (back.replicas, back.spread, back.same_label) == (3, True, "rack")
    assert encode_request(req, member=True) == StoredRequest.of(SubmitRequest(task_name="a.b")).text
    assert '"k"' not in StoredRequest.of(SubmitRequest(task_name="a.b")).text


@pytest.mark.parametrize(("key", "value"), [("k", 1), ("k", "2"), ("k", 5000), ("sp", "yes"), ("sl", 3)])
def test_an_unreadable_gang_request_names_its_key(key: str, value: object) -> None:
    wire = json.loads(StoredRequest.of(SubmitRequest(task_name="a.b", replicas=2)).text)
    with pytest.raises(UnreadableRecord) as caught:
        decode_request(json.dumps({**wire, key: value}))
    assert caught.value.field == key
