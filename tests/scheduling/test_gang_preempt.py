"""Gang preemption (issue 13), both ways: a pending gang stops the cheapest victims across
several nodes (never when even all of them would not make room), and a running preemptible
gang is one victim: all its members stopped, all counted, all their capacity freed."""

from __future__ import annotations

from typing import Any

from broker.scheduling.model import NodeFree, Plan, RunningTask, TaskRequest
from tests.scheduling.helpers import MIN, node, planner, running, snapshot, task
from tests.scheduling.test_gang import gang

NOW = 100 * MIN


def low(task_id: str, node_id: str, gpus: tuple[int, ...], **kw: Any) -> RunningTask:
    kw.setdefault("preemptible", True)
    return running(task_id, node_id, gpus, **kw)


def member(gang_id: str, rank: int, node_id: str, gpus: tuple[int, ...], **kw: Any) -> RunningTask:
    run = low(f"{gang_id}:m{rank}", node_id, gpus, **kw)
    run.gang = gang_id
    return run


def plan_of(nodes: list[NodeFree], pending: list[TaskRequest], run: list[RunningTask], **config: Any) -> Plan:
    config.setdefault("preemption", True)
    return planner(**config).plan(snapshot(nodes, pending, run, now=NOW))


def victims(plan: Plan) -> dict[str, tuple[str, ...]]:
    """Node -> the victims stopped there, for every preemption of the plan."""
    out: dict[str, tuple[str, ...]] = {}
    for p in plan.preemptions:
        out[p.node_id] = tuple(sorted((*out.get(p.node_id, ()), *p.victims)))
    return out


# ---- a pending gang preempts ------------------------------------------------------------------

def test_a_gang_stops_the_small_tasks_filling_two_nodes_and_holds_both() -> None:
    nodes = [node("a", 8), node("b", 8)]
    run = [low(f"a{i}", "a", (2 * i, 2 * i + 1)) for i in range(4)] + [low(f"b{i}", "b", (2 * i, 2 * i + 1))
                                                                       for i in range(4)]
    plan = plan_of(nodes, [gang("g", 2, 8, priority=5), task("later", 2, priority=1)], run)
    assert victims(plan) == {"a": ("a0", "a1", "a2", "a3"), "b": ("b0", "b1", "b2", "b3")}
    assert {p.task_id for p in plan.preemptions} == {"g"} and plan.gangs == []
    assert plan.waiting["g"].reason == "preempting 8 tasks on node a, b"
    assert plan.placements == []  # what is stopping is held for the gang, not given to a lower task
    assert plan.preemptions[0].reason == "priority 5 > 0"


def test_the_fewest_victims_across_nodes_then_fewest_gpus() -> None:
    """Two 4-GPU members: a has 4 free and one 4-GPU victim (1 victim, 4 GPUs stopped); c one
    8-GPU victim (1 victim, 8 GPUs); b eight 1-GPU victims (4 victims for one member)."""
    nodes = [node("a", 8), node("b", 8), node("c", 8)]
    run = [low("va", "a", (4, 5, 6, 7)), *(low(f"b{i}", "b", (i,)) for i in range(8)),
           low("vc", "c", tuple(range(8)))]
    plan = plan_of(nodes, [gang("g", 2, 4, priority=5)], run)
    assert victims(plan) == {"a": ("va",)}


def test_the_cheapest_split_over_nodes_when_no_node_frees_enough_alone() -> None:
    """Three 4-GPU members on 8-GPU nodes: one victim on each of two nodes beats two on one."""
    nodes = [node("a", 8), node("b", 8), node("c", 8)]
    run = [low("a0", "a", (0, 1, 2, 3)), low("a1", "a", (4, 5, 6, 7)), low("b0", "b", (0, 1, 2, 3), started=NOW - 60),
           low("c0", "c", (0, 1, 2, 3), started=NOW - 60), low("c1", "c", (4, 5, 6, 7))]
    # b has 4 free (one member); stopping b0 gives b a second; then one more from a or c.
    plan = plan_of(nodes, [gang("g", 3, 4, priority=5)], run)
    assert sum(len(v) for v in victims(plan).values()) == 2
    assert "b" in victims(plan) and victims(plan)["b"] == ("b0",)


def test_no_preemption_when_even_every_victim_stopped_would_not_make_room() -> None:
    nodes = [node("a", 8), node("b", 8)]
    run = [low("va", "a", tuple(range(8))), running("keep", "b", (0,))]  # b's task is not preemptible
    plan = plan_of(nodes, [gang("g", 2, 8, priority=5)], run)
    assert plan.preemptions == [] and plan.waiting["g"].reason.startswith("needs 2 × 8 GPUs")


def test_the_rules_of_single_tasks_hold_for_a_gang() -> None:
    def plan(run: list[RunningTask], **config: Any) -> Plan:
        return plan_of([node("a", 8), node("b", 8)], [gang("g", 2, 8, priority=5)], run, **config)

    assert plan([low("va", "a", tuple(range(8))), low("vb", "b", tuple(range(8)), priority=5)]).preemptions == []
    young = [low("va", "a", tuple(range(8))), low("vb", "b", tuple(range(8)), started=NOW - 30)]
    assert plan(young, min_runtime_s=60).preemptions == []
    assert victims(plan(young, min_runtime_s=20)) == {"a": ("va",), "b": ("vb",)}
    assert plan(young, preemption=False).preemptions == []
    assert victims(plan(young, preempt_equal_priority=True)) == {"a": ("va",), "b": ("vb",)}


def test_spread_takes_one_member_per_node() -> None:
    """Two 4-GPU members one per node: a holds one in its free half; the second needs another
    node (stopping va would make room on a, but a takes one member only)."""
    nodes = [node("a", 8), node("b", 8), node("c", 8)]
    run = [low("va", "a", (4, 5, 6, 7), started=NOW - 10), low("vb1", "b", (0, 1, 2, 3)),
           low("vb2", "b", (4, 5, 6, 7), started=NOW - 60), low("vc", "c", tuple(range(8)), started=NOW - 30)]
    plan = plan_of(nodes, [gang("g", 2, 4, spread=True, priority=5)], run)
    assert victims(plan) == {"b": ("vb2",)}


def test_same_label_preempts_within_one_group_the_cheapest() -> None:
    nodes = [node("a", 8, rack="r1"), node("b", 8, rack="r1"), node("c", 8, rack="r2"), node("d", 8, rack="r2")]
    run = [low("b0", "b", (0, 1, 2, 3)), low("b1", "b", (4, 5, 6, 7)), low("d0", "d", tuple(range(8)))]
    plan = plan_of(nodes, [gang("g", 2, 8, same_label="rack", priority=5)], run)
    assert victims(plan) == {"d": ("d0",)}  # r1 needs two victims, r2 one


def test_while_the_victims_stop_the_gang_holds_their_capacity_and_stops_no_more() -> None:
    nodes = [node("a", 8), node("b", 8)]
    run = [low("va", "a", tuple(range(8)), preempting=True), low("vb", "b", tuple(range(8)), preempting=True),
           low("other", "b", (), cpus=1)]
    snap = snapshot(nodes, [gang("g", 2, 8, priority=5), task("later", 1, priority=1)], run, now=NOW,
                    preempting_for={"g": "b"})
    plan = planner(preemption=True).plan(snap)
    assert plan.preemptions == [] and plan.placements == []
    assert plan.waiting["g"].reason == "waiting for preempted tasks to stop on node a, b"


# ---- a running gang is preempted whole ------------------------------------------------------

def running_gang(**kw: Any) -> list[RunningTask]:
    return [member("rg", 0, "a", tuple(range(8)), **kw), member("rg", 1, "b", tuple(range(8)), **kw)]


def test_a_member_chosen_stops_the_whole_gang_and_the_preemptors_node_comes_last() -> None:
    nodes = [node("a", 8), node("b", 8)]
    plan = plan_of(nodes, [task("t", 8, priority=5)], running_gang())
    assert victims(plan) == {"a": ("rg:m0",), "b": ("rg:m1",)}
    assert plan.preemptions[-1].node_id == "a"  # preempt.lua notes the last call's node as the one t waits for
    assert plan.waiting["t"].reason == "preempting 2 tasks on node a"


def test_a_gang_costs_all_its_members_so_a_single_victim_elsewhere_wins() -> None:
    nodes = [node("a", 8), node("b", 8), node("c", 8)]
    run = [*running_gang(started=NOW - 60), low("v", "c", tuple(range(8)), started=0)]  # v lost more work
    plan = plan_of(nodes, [task("t", 8, priority=5)], run)
    assert victims(plan) == {"c": ("v",)}


def test_what_the_stopped_gang_frees_on_its_other_nodes_counts() -> None:
    """t stops the gang for node a; t2 then waits for b, freed by the same stop: no more victims."""
    nodes = [node("a", 8), node("b", 8)]
    plan = plan_of(nodes, [task("t", 8, priority=5), task("t2", 8, priority=5)], running_gang())
    assert {p.task_id for p in plan.preemptions} == {"t"}
    assert plan.waiting["t"].reason == "preempting 2 tasks on node a"
    assert plan.waiting["t2"].reason == "waiting for preempted tasks to stop on node b"


def test_a_gang_submitted_not_preemptible_is_never_stopped() -> None:
    nodes = [node("a", 8), node("b", 8)]
    assert plan_of(nodes, [task("t", 8, priority=5)], running_gang(preemptible=False)).preemptions == []


def test_a_gang_already_stopping_is_not_chosen_again() -> None:
    nodes = [node("a", 8), node("b", 8)]
    run = running_gang()
    run[1].preempting = True  # one member marked: the gang is being stopped
    plan = plan_of(nodes, [task("t", 8, priority=5), task("t2", 8, priority=5)], run)
    assert all("rg:m0" not in p.victims for p in plan.preemptions)


def test_a_gang_preempts_a_lower_gang_whole() -> None:
    nodes = [node("a", 8), node("b", 8)]
    plan = plan_of(nodes, [gang("g", 2, 8, priority=5)], running_gang())
    assert victims(plan) == {"a": ("rg:m0",), "b": ("rg:m1",)}
    assert plan.waiting["g"].reason == "preempting 2 tasks on node a, b"


def test_waiting_on_its_nodes_the_gang_keeps_even_what_it_cannot_use_yet() -> None:
    """The free view is read before the running tasks: a victim that ended in between is in
    neither, so n2 shows a GPU busy that nobody holds and no member fits there. The gang still
    keeps n2's three free GPUs from its requeued victims (they would be preempted again)."""
    stale = node("n2", 4)
    stale.free_milli[0], stale.free_mem[0] = 0, 0
    run = [low("v", "n1", (3,), preempting=True)]
    pending = [gang("g", 2, 4, priority=10), *(task(f"s{i}", 1) for i in range(6))]
    snap = snapshot([node("n1", 4), stale], pending, run, now=NOW, preempting_for={"g": "n2,n1"})
    plan = planner(preemption=True).plan(snap)
    assert plan.placements == [] and plan.preemptions == []
    assert plan.waiting["g"].reason == "waiting for preempted tasks to stop on node n2, n1"


def test_a_task_that_stopped_a_gang_waits_on_its_own_node_the_last_recorded() -> None:
    nodes = [node("a", 8), node("b", 8)]
    run = [member("rg", 0, "a", tuple(range(8)), preempting=True), member("rg", 1, "b", tuple(range(8)),
                                                                          preempting=True)]
    snap = snapshot(nodes, [task("t", 8, priority=5), task("t2", 8, priority=1)], run, now=NOW,
                    preempting_for={"t": "b,a"})
    plan = planner(preemption=True).plan(snap)
    assert plan.waiting["t"].reason == "waiting for preempted tasks to stop on node a"
    assert plan.waiting["t2"].reason == "waiting for preempted tasks to stop on node b"


def test_a_gang_stopped_max_preemptions_times_runs_on() -> None:
    """Its members carry the gang's count (reserve_gang.lua copies it): the budget is the gang's."""
    nodes = [node("a", 8), node("b", 8)]
    run = running_gang()
    for m in run:
        m.preemptions = 3
    assert plan_of(nodes, [task("t", 8, priority=5)], run).preemptions == []
    assert plan_of([node("a", 8), node("b", 8)], [task("t", 8, priority=5)], run, max_preemptions=4).preemptions
