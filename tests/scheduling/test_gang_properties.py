"""Property: with gangs in the queue, a plan never over-commits a node and places each gang whole or not at all.

Random clusters (labelled, partly busy, with running tasks' estimates), random queues of
single tasks and gangs (whole GPUs, shares, spread, same_label), every placer, mode and
ordering. The plan's placements and gang members are applied to the snapshot's free
capacity: nothing may go below zero, a whole GPU must be wholly free, a member must fit
its node's labels, and a gang's members must follow spread and same_label.
"""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.scheduling.model import GangPlacement, Placement, Plan, Snapshot, TaskRequest
from tests.scheduling.helpers import MIN, node, planner, running, snapshot, task

RACKS = ("r1", "r2")


@st.composite
def clusters(draw: st.DrawFn) -> Snapshot:
    nodes, run = [], []
    for i in range(draw(st.integers(1, 6))):
        gpus = draw(st.sampled_from([2, 4, 8]))
        labels = {"rack": draw(st.sampled_from(RACKS))} if draw(st.booleans()) else {}
        nodes.append(node(f"n{i}", gpus, cpus=16, ram=64, slots=draw(st.integers(1, 8)), **labels))
        busy = draw(st.integers(0, gpus))
        if busy:
            run.append(running(f"r{i}", f"n{i}", tuple(range(busy)), cpus=1, est=draw(st.sampled_from([10, 60])) * MIN))
    pending = []
    for j in range(draw(st.integers(1, 10))):
        gpus = draw(st.sampled_from([0.5, 1, 2, 4, 8]))
        t = task(f"t{j}", gpus, cpus=draw(st.sampled_from([0, 1, 4])), ram=draw(st.sampled_from([0, 8])),
                 priority=draw(st.integers(0, 2)), tenant=draw(st.sampled_from(["x", "y"])),
                 est=draw(st.sampled_from([5, 30, 120])) * MIN)
        if draw(st.booleans()):
            t = replace(t, replicas=draw(st.integers(2, 5)), spread=draw(st.booleans()),
                        same_label=draw(st.sampled_from([None, "rack"])))
        pending.append(t)
    return snapshot(nodes, pending, run)


def check(snap: Snapshot, plan: Plan) -> None:
    free = {n.id: n.copy() for n in snap.nodes}
    tasks = {t.id: t for t in snap.pending}

    def apply(t: TaskRequest, p: Placement) -> None:
        n = free[p.node_id]
        assert n.matches(t), f"{t.id} on {n.id} without its labels"
        if t.whole_gpus:
            assert len(p.gpu_indices) == t.whole_gpus and all(n.gpu_is_whole(i) for i in p.gpu_indices)
        n.take(t, p.gpu_indices)

    for p in plan.placements:
        assert tasks[p.task_id].replicas == 1, "a gang went out as a single placement"
        apply(tasks[p.task_id], p)
    for g in plan.gangs:
        t = tasks[g.task_id]
        assert len(g.members) == t.replicas, f"gang {t.id}: {len(g.members)} of {t.replicas} members"
        member = replace(t, replicas=1)
        for p in g.members:
            apply(member, p)
        nodes = [p.node_id for p in g.members]
        if t.spread:
            assert len(set(nodes)) == len(nodes)
        if t.same_label:
            assert len({free[n].labels.get(t.same_label) for n in nodes}) == 1
            assert all(t.same_label in free[n].labels for n in nodes)
    for n in free.values():
        assert min(n.free_milli, default=0) >= 0 and min(n.free_mem, default=0) >= 0
        assert n.free_cpu_milli >= 0 and n.free_memory_mb >= 0 and n.free_slots >= 0
    ids = [p.task_id for p in plan.placements] + [g.task_id for g in plan.gangs]
    assert len(ids) == len(set(ids)), "a task placed twice"


def _copy(snap: Snapshot) -> Snapshot:
    return Snapshot(snap.now, [n.copy() for n in snap.nodes], list(snap.pending), list(snap.running))


@settings(max_examples=150, deadline=None)
@given(snap=clusters(), placement=st.sampled_from(["best_fit", "spread", "first_fit", "frag_aware"]),
       mode=st.sampled_from(["best_effort", "backfill", "strict"]),
       ordering=st.sampled_from(["priority", "sjf", "fair"]))
def test_gangs_never_over_commit(snap: Snapshot, placement: str, mode: str, ordering: str) -> None:
    plan = planner(placement=placement, mode=mode, ordering=ordering).plan(_copy(snap))
    check(snap, plan)
    for t in snap.pending:
        assert t.id in plan.waiting or any(p.task_id == t.id for p in plan.placements) \
            or any(g.task_id == t.id for g in plan.gangs), f"{t.id} neither placed nor waiting"


def test_checker_catches_a_half_gang() -> None:
    """The property's own check refuses a gang with a member missing."""
    snap = snapshot([node("a", 8)], [replace(task("g", 4), replicas=2)])
    half = Plan(gangs=[GangPlacement("g", (Placement("g", "a", (0, 1, 2, 3)),))])
    try:
        check(snap, half)
    except AssertionError:
        return
    raise AssertionError("a half-placed gang passed the check")
