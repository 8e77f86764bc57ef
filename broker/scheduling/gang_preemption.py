"""Gang preemption (issue 13): a pending gang that cannot be placed stops running tasks on
several nodes, the fewest that let every one of its members fit at once.

The rules are a single task's (``preemption``: preemptible victims only, after
``min_runtime_s``, fewer than ``max_preemptions`` stops, by priority, fair-share reclaim or
srtf), judged for the gang as one request (its priority, its tenant, all members' demand).

How the victim set is found, per group of nodes the members may share (all nodes, or one per
value of ``same_label``):

    1 what each node holds for members now, judged over [now, now + grace + run) as a single
      preemptor's hold is: what is free, less holds, plus what is already stopping
    2 a ladder per node: for 1, 2, ... members (one at most with ``spread``), the victims that
      make room for that many there: taken greedily (borrowers, then lowest priority, then
      least work lost) until they fit, then every victim they fit without dropped again
    3 across nodes, the cheapest ladder steps adding up to every member (a knapsack over
      members): fewest victims, then fewest GPUs stopped, then least work lost, then fewest
      nodes; the cheapest group wins
    4 the chosen victims together are checked with the gang's own placement rule
      (``gang.choose``: pack, spread, same_label) and each dropped if the gang fits without it

Nothing is stopped when even every eligible victim stopped would not make room. What stopping
the victims frees is held for the gang's members from now (as a single preemptor's node is),
and on later passes, while they stop, the gang holds what is coming back instead of stopping
more; reserve_gang.lua then commits all members at once when the capacity is free. A running
gang is a victim unit of ``Preemptor`` (all its members, on every node).
"""

from __future__ import annotations

from dataclasses import replace

from broker.models import MILLI
from broker.scheduling import gang
from broker.scheduling.explain import Cause
from broker.scheduling.model import NodeFree, Placement, RunningTask, TaskRequest, demand
from broker.scheduling.preemption import Preemptor
from broker.scheduling.timeline import INF, Hold, Usage

_Victims = list[tuple[RunningTask, str]]
_Cost = tuple[float, float, float, int]  # victims, GPUs stopped, GPU-seconds lost, nodes
_Pick = list[tuple[str, _Victims]]  # (node, victims stopped there) per node used


SHORTLIST = 32  # at least this many nodes with victims get a ladder (4 per member beyond)
WAITS = ","  # between the nodes of a preemptor that waits on several (the `preempting` hash's value)


def preempt_gang(p: Preemptor, task: TaskRequest, duration: float, may_stop: bool, waits_on: str | None = None
                 ) -> Cause | None:
    """Hold what is already stopping if every member fits with it; else, while its victims stop
    (``waits_on``: their nodes), hold what members fit there; else (``may_stop``) stop the
    cheapest victims across nodes that make room for all members, and hold it; None if nothing does."""
    end = p.now + p.config.preempt_grace_s + duration
    member, limit = gang.member_of(task), 1 if task.spread else task.replicas
    base = {n: _state(p, n, end) for n, node in p.placer.nodes.items() if _may_host(task, member, node)}
    if p.stopping_nodes:
        placements = gang.choose(task, base, p.node_order)
        if placements is not None:
            _hold(p, member, placements, end)
            return Cause("stopping", _where(placements))
    if waits_on:
        # Its victims stopped, or not yet seen so (the free view is read before the running
        # tasks: one that ended in between is in neither): keep what is free on their nodes
        # from lower-ranked tasks until every member fits.
        nodes = [n for n in waits_on.split(WAITS) if n in base]
        for node_id in nodes:
            _hold_free(p, member, limit, node_id, base[node_id], end)
        return Cause("stopping", ", ".join(nodes)) if nodes else None
    if not may_stop or not p.victims:
        return None
    reclaim = p.fair and p.ledger.within_guarantee(task.tenant, demand(task))
    key = ("gang", task.shape, task.priority, task.tenant if p.fair else "", duration, reclaim, p.ledger.epoch)
    if key in p.no_victims:
        return None
    eligible = {n: stop for n in base if (stop := p.eligible(task, p.victims.get(n, []), reclaim))}
    if not eligible or gang.choose(task, _without(p, base, eligible, end), p.node_order) is None:
        p.no_victims.add(key)  # not even with every eligible victim stopped
        return None
    shortlist = _shortlist(p, member, base, eligible, max(SHORTLIST, 4 * task.replicas))
    ladders = {n: _ladder(p, n, member, limit, base[n], shortlist.get(n, []), end) for n in base}
    best: tuple[_Cost, _Pick] | None = None
    for group in gang.groups(task, base, base):
        found = _cheapest(p, group, ladders, task.replicas)
        if found is not None and (best is None or found[0] < best[0]):
            best = found
    if best is None:
        p.no_victims.add(key)
        return None
    victims = list({r.id: (r, why) for _, chosen in best[1] for r, why in chosen}.values())
    scope = {n: base[n] for n, _ in best[1]}  # the nodes chosen: enough for every member
    placements = gang.choose(task, _without(p, scope, {"": victims}, end), p.node_order)
    if placements is None:
        return None  # victims of one gang counted on two nodes: the ladders were optimistic
    for entry in reversed(list(victims)):  # drop each victim the gang fits without
        rest = [v for v in victims if v is not entry]
        fits = gang.choose(task, _without(p, scope, {"": rest}, end), p.node_order)
        if fits is not None:
            victims, placements = rest, fits
    p.stop(task.id, victims, placements[0].node_id)
    p.ledger.add(task.tenant, demand(task))
    _hold(p, member, placements, end)
    return Cause("preempting", _where(placements), victims=int(p.cost(victims)[0]))


def _may_host(task: TaskRequest, member: TaskRequest, node: NodeFree) -> bool:
    return ((not task.same_label or task.same_label in node.labels) and node.matches(member)
            and len(node.free_milli) >= member.whole_gpus)


def _state(p: Preemptor, node_id: str, end: float) -> NodeFree:
    """Free on ``node_id`` over [now, end): less holds, plus what is stopping (it comes back now)."""
    if node_id in p.timeline.holds or node_id in p.stopping_nodes:
        return p.timeline.window(node_id, p.now, end)
    return p.placer.nodes[node_id]


def _without(p: Preemptor, base: dict[str, NodeFree], victims: dict[str, _Victims], end: float
             ) -> dict[str, NodeFree]:
    """``base`` with every task of ``victims`` (lists by any key) stopped, on every node they hold."""
    moved = {t.id: t.node_id for chosen in victims.values() for r, _ in chosen for t in p.tasks_of(r)}
    out = dict(base)
    for node_id in set(moved.values()) & base.keys():
        out[node_id] = p.timeline.window(node_id, p.now, end, moved)
    return out


def _shortlist(p: Preemptor, member: TaskRequest, base: dict[str, NodeFree], eligible: dict[str, _Victims],
               size: int) -> dict[str, _Victims]:
    """The ``size`` nodes whose victims look cheapest for one member, by a count without the
    timeline: for whole-GPU members, victims (largest first) until enough whole GPUs are free;
    else the fewest victims. Ladders are built only there (each costs a timeline read per
    victim: 1 ms a node, 2 s for a gang on 2,000 busy nodes before this cut)."""
    if len(eligible) <= size:
        return eligible
    def estimate(node_id: str) -> tuple[float, ...]:
        if not member.whole_gpus:
            return (len(eligible[node_id]), p.node_order[node_id])
        free, count, gpus = len(base[node_id].whole_indices()), 0, 0.0
        for run in sorted((sum(len(t.gpu_indices) for t in p.tasks_of(r) if t.node_id == node_id and t.gpu_milli
                               >= MILLI) for r, _ in eligible[node_id]), reverse=True):
            if free >= member.whole_gpus:
                break
            free, count, gpus = free + run, count + 1, gpus + run
        return (count if free >= member.whole_gpus else INF, gpus, p.node_order[node_id])
    return {n: eligible[n] for n in sorted(eligible, key=estimate)[:size]}


def _ladder(p: Preemptor, node_id: str, member: TaskRequest, limit: int, base: NodeFree, eligible: _Victims,
            end: float) -> dict[int, _Victims]:
    """For each count of members ``node_id`` can take (up to ``limit``), the fewest victims there
    that make room for that many: greedy in ``eligible``'s order, then each dropped if not needed."""
    def room(chosen: _Victims) -> int:
        state = p.timeline.window(node_id, p.now, end, p.ids_of(chosen)) if chosen else base
        return len(gang.members_on(state, member, limit))

    free = room([])
    out: dict[int, _Victims] = {k: [] for k in range(1, free + 1)}
    chosen: _Victims = []
    for entry in eligible:
        if free >= limit:
            break
        chosen.append(entry)
        now_fits = room(chosen)
        for k in range(free + 1, now_fits + 1):
            needed = list(chosen)
            for drop in reversed(list(needed)):
                rest = [c for c in needed if c is not drop]
                if room(rest) >= k:
                    needed = rest
            out[k] = needed
        free = max(free, now_fits)
    return out


def _cheapest(p: Preemptor, group: list[str], ladders: dict[str, dict[int, _Victims]], replicas: int
              ) -> tuple[_Cost, _Pick] | None:
    """The cheapest steps of the nodes' ladders that add up to ``replicas`` members (a knapsack
    over members; members beyond ``replicas`` count as ``replicas``)."""
    best: dict[int, tuple[_Cost, _Pick]] = {0: ((0, 0, 0, 0), [])}
    for node_id in sorted(group, key=p.node_order.__getitem__):
        steps = [(k, chosen, p.cost(chosen)) for k, chosen in ladders[node_id].items()]
        if not steps:
            continue
        after = dict(best)
        for have, (cost, pick) in best.items():
            if have >= replicas:
                continue
            for k, chosen, (n, gpus, lost) in steps:
                total = min(replicas, have + k)
                step: _Cost = (cost[0] + n, cost[1] + gpus, cost[2] + lost, cost[3] + 1)
                if total not in after or step < after[total][0]:
                    after[total] = (step, [*pick, (node_id, chosen)])
        best = after
    return best.get(replicas)


def _hold(p: Preemptor, member: TaskRequest, placements: list[Placement], end: float) -> None:
    """Keep each member's place from now until the gang's run would end."""
    for placement in placements:
        usage = Usage.of(member, p.placer.nodes[placement.node_id], placement.gpu_indices)
        p.timeline.hold(Hold(placement.node_id, p.now, end, usage))


def _hold_free(p: Preemptor, member: TaskRequest, limit: int, node_id: str, state: NodeFree, end: float) -> None:
    """Hold the members that fit on ``node_id``, and for whole-GPU members every whole GPU free
    there besides (up to what ``limit`` members take): a member may need them with a GPU the
    free view still counts busy."""
    room = gang.members_on(state, member, limit)
    node = p.placer.nodes[node_id]
    for gpus in room:
        p.timeline.hold(Hold(node_id, p.now, end, Usage.of(member, node, gpus)))
    if member.whole_gpus:
        taken = {i for gpus in room for i in gpus}
        rest = [i for i in state.whole_indices() if i not in taken][: member.whole_gpus * (limit - len(room))]
        if rest:
            p.timeline.hold(Hold(node_id, p.now, end, Usage.of(replace(member, cpu_milli=0, memory_mb=0), node, rest)))


def _where(placements: list[Placement]) -> str:
    return ", ".join(dict.fromkeys(pl.node_id for pl in placements))
