"""Gangs: one request of ``replicas`` members, placed all or nothing, as close together as asked.

A distributed job's ranks make no progress unless every rank runs, so a member that holds
capacity while another waits only wastes it, and two half-placed gangs can block each other
for ever (Kueue's and Volcano's reason for gang admission). So the planner admits a gang as
one unit: ``choose`` finds a place for every member in the same pass or returns None, and
nothing is taken until it has.

Closeness (as Slurm's ``--nodes`` and Ray's PACK/SPREAD): by default the fewest nodes (two
4-GPU members on one free 8-GPU node beat two nodes), and on the last node the tightest fit;
``spread`` puts one member per node; ``same_label`` keeps all members on nodes sharing one
value of that label key (the group that needs the fewest nodes wins). Gangs use this rule
whatever the pool's placer: the placer's per-task criteria (best fit, spread, fragmentation)
rank nodes for one task, not a set of nodes for many.

``earliest`` is the gang's backfill start: the soonest time at which enough nodes are free
together for its whole run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

from broker.models import MILLI
from broker.scheduling.model import NodeFree, Placement, TaskRequest
from broker.scheduling.timeline import Timeline

Fits = dict[str, list[list[int]]]  # node id -> the GPU indices of each member that fits there


def member_of(gang: TaskRequest) -> TaskRequest:
    """One member of ``gang``: a single task with the gang's id and per-member resources."""
    return replace(gang, replicas=1, spread=False, same_label=None, min_replicas=0)


def members_on(state: NodeFree, member: TaskRequest, limit: int) -> list[list[int]]:
    """GPU indices for each of up to ``limit`` members that fit together on ``state``."""
    if not state.matches(member):
        return []
    state, out = state.copy(), list[list[int]]()
    while len(out) < limit:
        gpus = state.gpus_for(member)
        if gpus is None:
            break
        state.take(member, gpus)
        out.append(gpus)
    return out


def _eligible(gang: TaskRequest, node: NodeFree) -> bool:
    return not gang.same_label or gang.same_label in node.labels


def groups(gang: TaskRequest, node_ids: Iterable[str], nodes: Mapping[str, NodeFree]) -> list[list[str]]:
    """Nodes the members may share: all of them, or one list per value of ``same_label``."""
    if not gang.same_label:
        return [list(node_ids)]
    by_value: dict[str, list[str]] = {}
    for node_id in node_ids:
        by_value.setdefault(nodes[node_id].labels[gang.same_label], []).append(node_id)
    return list(by_value.values())


def _pack(replicas: int, counts: Mapping[str, int], rank: Mapping[str, tuple[int, int]]
          ) -> list[tuple[str, int]] | None:
    """Fewest nodes holding ``replicas`` members: while no node holds the rest, take the node
    holding most; then the node that holds the rest most tightly. ``rank``: (preference, order)."""
    left, out, free = replicas, [], dict(counts)
    while left > 0 and free:
        enough = [n for n, c in free.items() if c >= left]
        if enough:
            node_id = min(enough, key=lambda n: (rank[n][0], free[n], rank[n][1]))
        else:
            node_id = min(free, key=lambda n: (-free[n], rank[n][0], rank[n][1]))
        take = min(left, free.pop(node_id))
        out.append((node_id, take))
        left -= take
    return out if left == 0 else None


def arrange(gang: TaskRequest, fits: Fits, nodes: Mapping[str, NodeFree], order: Mapping[str, int]
            ) -> list[Placement] | None:
    """The members' placements (rank order) from what fits on each node, or None."""
    member = member_of(gang)
    rank = {n: (nodes[n].preference(member), order[n]) for n in fits}
    best: tuple[tuple[int, int], list[tuple[str, int]]] | None = None
    for group in groups(gang, fits, nodes):
        chosen = _pack(gang.replicas, {n: len(fits[n]) for n in group}, rank)
        if chosen is not None:
            key = (len(chosen), min(rank[n][1] for n, _ in chosen))
            if best is None or key < best[0]:
                best = (key, chosen)
    if best is None:
        return None
    return [Placement(gang.id, node_id, tuple(fits[node_id][k])) for node_id, count in best[1] for k in range(count)]


def choose(gang: TaskRequest, states: Mapping[str, NodeFree], order: Mapping[str, int]) -> list[Placement] | None:
    """Where every member goes now, judging each node by ``states`` (free, or a backfill view),
    or None when they do not all fit."""
    member, limit = member_of(gang), 1 if gang.spread else gang.replicas
    fits = {}
    for node_id, state in states.items():
        if _eligible(gang, state):
            found = members_on(state, member, limit)
            if found:
                fits[node_id] = found
    if sum(len(f) for f in fits.values()) < gang.replicas:
        return None
    return arrange(gang, fits, states, order)


def room(gang: TaskRequest, nodes: Mapping[str, NodeFree]) -> int:
    """How many members fit on ``nodes`` now, all together (an upper bound: ``same_label`` may
    allow only one group of them)."""
    member, limit = member_of(gang), 1 if gang.spread else gang.replicas
    return sum(len(members_on(n, member, limit)) for n in nodes.values() if _eligible(gang, n))


def nodes_with_room(gang: TaskRequest, nodes: Mapping[str, NodeFree]) -> int:
    """How many nodes could take at least one member now."""
    member = member_of(gang)
    return sum(1 for n in nodes.values() if _eligible(gang, n) and members_on(n, member, 1))


def _fused(member: TaskRequest, count: int) -> TaskRequest:
    """``count`` members as one request on one node: whole GPUs and host resources add up."""
    return replace(member, id=f"{member.id}*{count}", whole_gpus=member.whole_gpus * count,
                   cpu_milli=member.cpu_milli * count, memory_mb=member.memory_mb * count)


def earliest(gang: TaskRequest, duration: float, timeline: Timeline, order: Mapping[str, int]
             ) -> tuple[float, list[Placement]] | None:
    """The soonest start at which every member fits for ``duration`` by expected ends and holds,
    and where: (start, placements), or None when no known end frees enough.

    Per node, the earliest start of 1, 2, ... members (each count as one request, so a share
    member counts at most once per node: a lower bound on what fits, never over) gives the
    candidate times; at each, in order, the nodes are checked over the whole run."""
    member, nodes = member_of(gang), timeline.nodes
    limit = 1 if gang.spread or member.gpu_milli else gang.replicas
    starts: list[tuple[float, str, int]] = []
    for node_id, node in nodes.items():
        if not _eligible(gang, node) or len(node.free_milli) < member.whole_gpus or not node.matches(member):
            continue
        most = min(limit, len(node.free_milli) // member.whole_gpus) if member.whole_gpus else limit
        for count in range(1, most + 1):
            found = timeline.earliest_on(node_id, _fused(member, count) if count > 1 else member, duration)
            if found is None:
                break
            starts.append((found[0], node_id, count))
    starts.sort()
    bound: dict[str, int] = {}
    for i, (when, node_id, count) in enumerate(starts):
        bound[node_id] = max(bound.get(node_id, 0), count)
        if (i + 1 < len(starts) and starts[i + 1][0] == when) or sum(bound.values()) < gang.replicas:
            continue
        fits: Fits = {}
        for candidate in bound:
            room = members_on(timeline.window(candidate, when, when + duration), member, limit)
            if room:
                fits[candidate] = room
        placements = arrange(gang, fits, nodes, order) if sum(map(len, fits.values())) >= gang.replicas else None
        if placements is not None:
            return when, placements
    return None


def describe(gang: TaskRequest) -> str:
    """Members times what each asks ("4 GPUs", "0.5 of a GPU", "2 CPUs"), and where they must go."""
    if gang.whole_gpus:
        each = f"{gang.whole_gpus} GPU{'s' * (gang.whole_gpus > 1)}"
    elif gang.gpu_milli:
        each = f"{gang.gpu_milli / MILLI:g} of a GPU"
    else:
        each = f"{gang.cpu_milli / MILLI:g} CPUs"
    where = " one per node" if gang.spread else ""
    if gang.same_label:
        where += f" on nodes sharing one {gang.same_label}"
    return f"{gang.replicas} × {each}{where}"
