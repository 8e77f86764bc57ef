"""Ordering and placement: pure functions, no Redis, no Celery, no clock.

The dispatcher feeds these a snapshot and commits what they propose through
reserve.lua, which re-checks every placement; a bug here can waste a cycle but
cannot over-commit a node. The simulator drives the same code.

Spine policy:
- order: higher priority first, then submit order (``seq``);
- skip-ahead: a task that does not fit now does not block smaller ones behind it;
- placement, best fit: whole-GPU tasks go to the node with the fewest wholly free
  GPUs that still has enough (fills busy nodes, keeps empty ones whole); GPU
  shares go to the GPU they fill best (least share left over); CPU tasks prefer
  nodes without GPUs, then the tightest CPU fit.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Container, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

MILLI = 1000


# Placement and TaskRequest are value objects, but not frozen: the dispatcher builds tens of
# thousands per cycle, and a frozen dataclass's __init__ (object.__setattr__ per field) took
# four times as long. unsafe_hash keeps them hashable by value, as frozen ones are.
@dataclass(slots=True, unsafe_hash=True)
class Placement:
    """A proposal: run ``task_id`` on ``node_id`` using these GPU indices."""

    task_id: str
    node_id: str
    gpu_indices: tuple[int, ...] = ()


@dataclass(slots=True, unsafe_hash=True)
class TaskRequest:
    """A pending task as the policy sees it.

    ``labels`` must match exactly; ``prefer`` lists, per label key, the values accepted in
    order of preference (``Resources(labels={"gpu": ["H100", "A100"]})``)."""

    id: str
    whole_gpus: int = 0
    gpu_milli: int = 0  # share of one GPU for a fractional request, else 0
    gpu_memory_mb: int = 0  # 0: unspecified (a share then takes the same fraction of memory)
    cpu_milli: int = 0
    memory_mb: int = 0
    labels: tuple[tuple[str, str], ...] = ()
    priority: int = 0
    seq: int = 0  # position in the pending queue (priority, then submit order)
    tenant: str = "default"
    name: str = ""
    estimate_s: float | None = None  # the task's own estimate, else a learned one, else None
    submitted_at: float = 0.0  # seconds
    preemptible: bool = False
    prefer: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @classmethod
    def from_wire(cls, task_id: str, wire: dict[str, Any], seq: int = 0) -> TaskRequest:
        """Build from the compact request stored in Redis (see ``client.request_wire``)."""
        labels = wire["l"]
        exact = tuple(sorted((k, v) for k, v in labels.items() if isinstance(v, str)))
        prefer = tuple(sorted((k, tuple(v)) for k, v in labels.items() if not isinstance(v, str)))
        return cls(task_id, wire["g"], wire["m"], wire["gm"], wire["c"], wire["r"], exact, wire["p"], seq,
                   wire.get("t", "default"), wire.get("n", ""), wire.get("e"), 0.0, bool(wire.get("x")), prefer)

    @property
    def shape(self) -> tuple[Any, ...]:
        return (self.whole_gpus, self.gpu_milli, self.gpu_memory_mb, self.cpu_milli,
                self.memory_mb, self.labels, self.prefer)

    @property
    def gpus(self) -> float:
        """GPUs asked for, a share counting as its fraction."""
        return self.whole_gpus or self.gpu_milli / MILLI


@dataclass(slots=True)
class RunningTask:
    """A RESERVED or RUNNING task: what it holds and what the policy knows of its end."""

    id: str
    node_id: str
    gpu_indices: tuple[int, ...]
    gpu_milli: int  # held on each of gpu_indices (1000 for a whole GPU)
    gpu_mem: int  # MiB held on each of gpu_indices
    cpu_milli: int
    memory_mb: int
    priority: int = 0
    tenant: str = "default"
    name: str = ""
    started_at: float = 0.0  # seconds; when reserved, for a task not yet started
    estimate_s: float | None = None
    preemptible: bool = False
    preempting: bool = False  # already asked to stop; its capacity is about to come back
    seq: int = 0
    submitted_at: float = 0.0

    @property
    def gpus(self) -> float:
        return len(self.gpu_indices) * self.gpu_milli / MILLI

    def expected_end(self, now: float) -> float | None:
        """When it should end by its estimate (``now`` if already overdue); None if unknown."""
        if self.estimate_s is None:
            return None
        return max(now, self.started_at + self.estimate_s)


@dataclass(slots=True)
class Snapshot:
    """Everything one planning pass sees; built by the dispatcher (or the simulator) from Redis."""

    now: float  # seconds
    nodes: list[NodeFree]
    pending: list[TaskRequest]  # in queue order: priority, then submit order
    running: list[RunningTask] = field(default_factory=list)
    # Learned mean runtimes: (task name, shape key) and (task name, "") -> seconds.
    runtimes: dict[tuple[str, str], float] = field(default_factory=dict)
    # Request mix for frag_aware: shape key -> how many such tasks were submitted.
    mix: dict[str, int] = field(default_factory=dict)
    # Pending tasks waiting for preempted victims to stop: preemptor id -> node id.
    preempting_for: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Preemption:
    """Stop ``victims`` (all on ``node_id``) so that ``task_id`` fits there."""

    task_id: str
    node_id: str
    victims: tuple[str, ...]
    reason: str  # e.g. "priority 10 > 5", "reclaim: tenant a under its guarantee", "srtf"


@dataclass(slots=True)
class Waiting:
    """Why a pending task did not start this pass, and when it is expected to."""

    position: int  # 1-based, in the order the policy ranked the queue
    reason: str
    estimated_start: float | None = None  # seconds; None when unknown


@dataclass(slots=True)
class Plan:
    placements: list[Placement] = field(default_factory=list)
    preemptions: list[Preemption] = field(default_factory=list)
    waiting: dict[str, Waiting] = field(default_factory=dict)


@dataclass(slots=True)
class NodeFree:
    """What is free on one schedulable node, per GPU index."""

    id: str
    gpu_memory_mb: int
    free_milli: list[int]
    free_mem: list[int]
    free_cpu_milli: int
    free_memory_mb: int
    free_slots: int
    labels: dict[str, str] = field(default_factory=dict)
    # Registered capacity (0 when the reader did not fill it in); the GPU count is len(free_milli).
    cap_cpu_milli: int = 0
    cap_memory_mb: int = 0
    cap_slots: int = 0

    def copy(self) -> NodeFree:
        return NodeFree(self.id, self.gpu_memory_mb, list(self.free_milli), list(self.free_mem),
                        self.free_cpu_milli, self.free_memory_mb, self.free_slots, dict(self.labels),
                        self.cap_cpu_milli, self.cap_memory_mb, self.cap_slots)

    def gpu_is_whole(self, i: int) -> bool:
        return self.free_milli[i] == MILLI and self.free_mem[i] == self.gpu_memory_mb

    def whole_indices(self) -> list[int]:
        """GPUs nobody holds any share of, lowest index first."""
        memory = self.gpu_memory_mb  # gpu_is_whole inlined: this runs for every placement
        return [i for i, (milli, mem) in enumerate(zip(self.free_milli, self.free_mem, strict=True))
                if milli == MILLI and mem == memory]

    def host_fits(self, task: TaskRequest) -> bool:
        if self.free_slots < 1 or self.free_cpu_milli < task.cpu_milli or self.free_memory_mb < task.memory_mb:
            return False
        if task.labels and not all(self.labels.get(k) == v for k, v in task.labels):
            return False
        return not task.prefer or all(self.labels.get(k) in values for k, values in task.prefer)

    def preference(self, task: TaskRequest) -> int:
        """0 for the node a task prefers most; higher for each step down its preference lists."""
        return sum(values.index(self.labels[k]) for k, values in task.prefer if self.labels.get(k) in values)

    def share_memory(self, task: TaskRequest) -> int:
        """GPU memory a fractional task takes on this node's GPUs."""
        return task.gpu_memory_mb or task.gpu_milli * self.gpu_memory_mb // MILLI

    def take(self, task: TaskRequest, gpus: Sequence[int]) -> None:
        for i in gpus:
            if task.gpu_milli:
                self.free_milli[i] -= task.gpu_milli
                self.free_mem[i] -= self.share_memory(task)
            else:
                self.free_milli[i] = 0
                self.free_mem[i] = 0
        self.free_cpu_milli -= task.cpu_milli
        self.free_memory_mb -= task.memory_mb
        self.free_slots -= 1


def gpu_shape_key(whole_gpus: int, gpu_milli: int) -> str:
    """A GPU shape as the pool's request mix counts it (frag_aware): "2,0", "0,500"."""
    return f"{whole_gpus},{gpu_milli}"


def mix_key(task: TaskRequest) -> str:
    return gpu_shape_key(task.whole_gpus, task.gpu_milli)


class Placer(Protocol):
    """Chooses where tasks go, one at a time, on its own copy of the free capacity.

    ``choose`` proposes without taking; ``take`` applies a placement (from ``choose`` or
    not) to the copy. ``views`` (backfill holds) maps node ids to a NodeFree to judge
    that node by instead of the placer's own copy (less what is held for others); the
    placement chosen is still taken from the placer's own copy. A task's ``labels``
    must match; among nodes meeting its ``prefer`` lists, lower ``NodeFree.preference``
    wins before the placer's own criterion."""

    nodes: dict[str, NodeFree]

    def choose(self, task: TaskRequest, views: dict[str, NodeFree] | None = None) -> Placement | None: ...

    def take(self, task: TaskRequest, placement: Placement) -> None: ...

    def place(self, task: TaskRequest) -> Placement | None: ...


class ChooseThenTake:
    """``place`` for a Placer: take what ``choose`` proposes."""

    def choose(self, task: TaskRequest, views: dict[str, NodeFree] | None = None) -> Placement | None:
        raise NotImplementedError

    def take(self, task: TaskRequest, placement: Placement) -> None:
        raise NotImplementedError

    def place(self, task: TaskRequest) -> Placement | None:
        placement = self.choose(task)
        if placement is not None:
            self.take(task, placement)
        return placement


def order(tasks: Iterable[TaskRequest]) -> list[TaskRequest]:
    """Dispatch order: higher priority first, then submit order."""
    return sorted(tasks, key=lambda t: (-t.priority, t.seq))


class LabelGroups:
    """Nodes by their exact label set: a task's labels are matched once per group, not per node."""

    def __init__(self, nodes: Iterable[NodeFree]) -> None:
        self.labels: list[dict[str, str]] = []
        self.of: dict[str, int] = {}  # node id -> group
        known: dict[tuple[tuple[str, str], ...], int] = {}
        for node in nodes:
            key = tuple(sorted(node.labels.items()))
            if key not in known:
                known[key] = len(self.labels)
                self.labels.append(dict(node.labels))
            self.of[node.id] = known[key]
        self._matching: dict[tuple[Any, ...], list[tuple[int, int]]] = {}

    def matching(self, task: TaskRequest) -> list[tuple[int, int]]:
        """(group, its ``NodeFree.preference``) for each group carrying the task's labels and preferences."""
        key = (task.labels, task.prefer)
        found = self._matching.get(key)
        if found is None:
            found = self._matching[key] = [
                (group, sum(values.index(labels[k]) for k, values in task.prefer))
                for group, labels in enumerate(self.labels)
                if all(labels.get(k) == v for k, v in task.labels)
                and all(labels.get(k) in values for k, values in task.prefer)]
        return found


Entries = list[tuple[list[tuple[int, ...]], tuple[int, ...]]]  # (sorted index, the node's entry in it)


def reindex(before: Entries, after: Entries) -> None:
    """Move a node's entries that changed (same indexes, same order in both lists) to their new place."""
    for (entries, old), (_, new) in zip(before, after, strict=True):
        if old != new:
            del entries[bisect_left(entries, old)]
            insort(entries, new)


class BestFit:
    """Places tasks one at a time onto a private copy of the cluster's free capacity.

    Indexed so that a placement looks at the few nodes that can win, not every node: wholly
    free GPU count -> nodes (whole GPUs); per label group, every GPU sorted by (free share,
    its node's wholly free count, node rank, index), and nodes sorted by (free CPU, rank),
    apart for nodes with and without GPUs. Rank (the order nodes came in) breaks ties as the
    plain scan over all nodes did."""

    def __init__(self, nodes: Iterable[NodeFree]) -> None:
        # The caller's nodes, copied only when a placement takes from one (own()): most cycles
        # place a few tasks on a few of thousands of nodes.
        self.nodes = {n.id: n for n in nodes}
        self.owned: set[str] = set()
        self.max_gpus = max((len(n.free_milli) for n in self.nodes.values()), default=0)
        # Wholly free GPU count -> node ids, insertion-ordered so ties break the same way each run.
        self.by_whole: list[dict[str, None]] = [{} for _ in range(self.max_gpus + 1)]
        self.whole: dict[str, int] = {}
        # Node id -> its wholly free GPU indices, ascending: kept up to date as tasks are placed
        # rather than recounted, since every placement needs them.
        self.whole_gpus: dict[str, list[int]] = {}
        for node in self.nodes.values():
            self.whole_gpus[node.id] = node.whole_indices()
            self._file(node, len(self.whole_gpus[node.id]))
        self.free_slots = sum(n.free_slots for n in self.nodes.values())
        self.ranked = list(self.nodes.values())
        self.rank = {node.id: rank for rank, node in enumerate(self.ranked)}
        self.groups = LabelGroups(self.ranked)
        # The share and CPU indexes are built when the first such task asks: a pass of whole-GPU
        # tasks (most cycles, often with one task) should not pay for sorting every GPU.
        self.indexed = False
        self.shares: list[list[tuple[int, ...]]] = [[] for _ in self.groups.labels]
        self.cpus: list[list[tuple[int, ...]]] = [[] for _ in range(2 * len(self.groups.labels))]

    def own(self, node_id: str) -> NodeFree:
        """The node, as this placer's own copy (made on first use) that placements may change."""
        node = self.nodes[node_id]
        if node_id not in self.owned:
            self.owned.add(node_id)
            node = self.nodes[node_id] = self.ranked[self.rank[node_id]] = node.copy()
        return node

    def index(self) -> None:
        if self.indexed:
            return
        self.indexed = True
        for node in self.ranked:
            for entries, entry in self._entries(node):
                entries.append(entry)
        for entries in (*self.shares, *self.cpus):
            entries.sort()

    def indexed_entries(self, node: NodeFree) -> Entries:
        """The node's index entries, or none while the indexes are not built."""
        return self._entries(node) if self.indexed else []

    def _entries(self, node: NodeFree) -> Entries:
        group, rank, whole = self.groups.of[node.id], self.rank[node.id], self.whole[node.id]
        shares = self.shares[group]
        out: Entries = [(shares, (milli, whole, rank, i)) for i, milli in enumerate(node.free_milli)]
        out.append((self.cpus[2 * group + (len(node.free_milli) > 0)], (node.free_cpu_milli, rank)))
        return out

    def _file(self, node: NodeFree, count: int) -> None:
        self.whole[node.id] = count
        self.by_whole[count][node.id] = None

    def _refile(self, node: NodeFree, count: int) -> None:
        """Move the node to the back of the bucket for ``count``, even when that is its own bucket."""
        del self.by_whole[self.whole[node.id]][node.id]
        self.whole[node.id] = count
        self.by_whole[count][node.id] = None

    def place(self, task: TaskRequest) -> Placement | None:
        if self.free_slots <= 0:
            return None
        if task.whole_gpus:
            choice = self._whole(task)
        elif task.gpu_milli:
            choice = self._share(task)
        else:
            choice = self._cpu(task)
        if choice is None:
            return None
        node, gpus = choice
        node = self.own(node.id)
        before = self.indexed_entries(node)
        whole = self.whole_gpus[node.id]
        if task.whole_gpus:
            del whole[: len(gpus)]  # _whole hands out the lowest wholly free indices
        elif gpus and gpus[0] in whole:
            whole.remove(gpus[0])  # a share leaves its GPU partly used
        node.take(task, gpus)
        self._refile(node, len(whole))
        reindex(before, self.indexed_entries(node))
        self.free_slots -= 1
        return Placement(task.id, node.id, tuple(gpus))

    def _whole(self, task: TaskRequest) -> tuple[NodeFree, list[int]] | None:
        for bucket in self.by_whole[task.whole_gpus:]:
            for node_id in bucket:
                node = self.nodes[node_id]
                if node.gpu_memory_mb >= task.gpu_memory_mb and node.host_fits(task):
                    return node, self.whole_gpus[node_id][: task.whole_gpus]
        return None

    def _share(self, task: TaskRequest) -> tuple[NodeFree, list[int]] | None:
        best = self._best_share(task)
        return None if best is None else (self.ranked[best[2]], [best[3]])

    def _best_share(self, task: TaskRequest, skip: Container[str] = ()) -> tuple[int, ...] | None:
        """The least (free share, node's wholly free count, rank, index) of a GPU the share fits on,
        outside nodes in ``skip``: least share left over, then the node with fewest whole GPUs."""
        self.index()
        best: tuple[int, ...] | None = None
        for group, _ in self.groups.matching(task):
            entries = self.shares[group]
            for k in range(bisect_left(entries, (task.gpu_milli,)), len(entries)):
                entry = entries[k]
                if best is not None and entry >= best:
                    break
                node = self.ranked[entry[2]]
                if (node.free_mem[entry[3]] >= node.share_memory(task) and node.host_fits(task)
                        and node.id not in skip):
                    best = entry
                    break
        return best

    def _cpu(self, task: TaskRequest) -> tuple[NodeFree, list[int]] | None:
        best = self._best_cpu(task)
        return None if best is None else (self.ranked[best[2]], [])

    def _best_cpu(self, task: TaskRequest, skip: Container[str] = ()) -> tuple[int, ...] | None:
        """The least (has GPUs, free CPU, rank) of a node the task fits on, outside ``skip``:
        nodes without GPUs first, then the tightest CPU fit."""
        self.index()
        best: tuple[int, ...] | None = None
        for gpus in (0, 1):
            for group, _ in self.groups.matching(task):
                entries = self.cpus[2 * group + gpus]
                for k in range(bisect_left(entries, (task.cpu_milli,)), len(entries)):
                    entry = (gpus, *entries[k])
                    if best is not None and entry >= best:
                        break
                    node = self.ranked[entry[2]]
                    if node.host_fits(task) and node.id not in skip:
                        best = entry
                        break
            if best is not None:
                return best
        return None


def propose(tasks: Iterable[TaskRequest], nodes: Iterable[NodeFree]) -> Iterator[Placement]:
    """Propose placements for ``tasks`` (already in dispatch order) onto ``nodes``, one at a time.

    Lazy on both sides: the dispatcher commits each batch while the next is planned, and
    ``tasks`` is not read past the point where every free slot is taken."""
    fit = BestFit(nodes)
    failed: set[tuple[Any, ...]] = set()
    pending = iter(tasks)
    while fit.free_slots > 0:  # checked before taking a task: the next one may cost a Redis read
        task = next(pending, None)
        if task is None:
            return
        if failed and task.shape in failed:  # capacity only shrinks within a plan
            continue
        placement = fit.place(task)
        if placement is None:
            failed.add(task.shape)
        else:
            yield placement


def plan(tasks: Sequence[TaskRequest], nodes: Iterable[NodeFree]) -> list[Placement]:
    """Propose placements for ``tasks`` (already in dispatch order) onto ``nodes``."""
    return list(propose(tasks, nodes))
