"""What the scheduler works on: pure value types, no Redis, no Celery, no clock.

The dispatcher (and the simulator) read a ``Snapshot`` from Redis through ``broker.store``,
the planner turns it into a ``Plan``, and reserve.lua re-checks every placement, so a bug
here can waste a cycle but cannot over-commit a node. ``NodeFree`` carries the two
predicates every placer, the timeline and preemption share: ``matches`` and ``gpus_for``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from broker.models import MILLI, Exact, Prefer, labels_fit

if TYPE_CHECKING:
    from broker.scheduling.placement.free_index import FreeIndex

GpuKind = tuple[int, int]  # the GPU part of a request: (whole GPUs, 0) or (0, milli of one GPU); (0, 0) for none
Vector = tuple[float, float, float]  # an amount of GPUs (a share as its fraction), CPUs and memory (MiB)


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
    order of preference (``Resources(labels={"gpu": ["H100", "A100"]})``). ``shape`` is the
    whole request (tasks of one shape fit wherever each other fits); ``gpu_kind`` only its GPU part.

    A gang (``replicas`` > 1) is one request of ``replicas`` members, each asking for the
    resources above, placed all or nothing (``gang``): ``spread`` puts one member per node,
    ``same_label`` (a node label key) puts all members on nodes sharing one value of it. With
    ``replicas`` 1 both are ignored: a single task is placed exactly as before."""

    id: str
    whole_gpus: int = 0
    gpu_milli: int = 0  # share of one GPU for a fractional request, else 0
    gpu_memory_mb: int = 0  # 0: unspecified (a share then takes the same fraction of memory)
    cpu_milli: int = 0
    memory_mb: int = 0
    labels: Exact = ()
    priority: int = 0
    seq: int = 0  # position in the pending queue (priority, then submit order)
    tenant: str = "default"
    name: str = ""
    estimate_s: float | None = None  # the task's own estimate, else a learned one, else None
    submitted_at: float = 0.0  # seconds
    preemptible: bool = False
    prefer: Prefer = ()
    replicas: int = 1  # members of a gang, each with the resources above
    spread: bool = False  # gang: one member per node
    same_label: str | None = None  # gang: all members on nodes with one value of this label key
    min_gpus: int = 0  # elastic (issue 13): it runs with any whole number from this to whole_gpus; 0: exactly
    min_replicas: int = 0  # elastic gang: it runs with any number of members from this to replicas; 0: all

    @property
    def shape(self) -> tuple[Any, ...]:
        """Everything that decides where it fits: two tasks of one shape fit on the same nodes
        (the name counts since a node may run only some task names)."""
        single = (self.whole_gpus, self.gpu_milli, self.gpu_memory_mb, self.cpu_milli,
                  self.memory_mb, self.labels, self.prefer, self.name, self.min_gpus)
        return single if self.replicas == 1 else (*single, self.replicas, self.spread, self.same_label,
                                                  self.min_replicas)

    @property
    def is_elastic(self) -> bool:
        """It may run with less than it asks for (``broker.scheduling.elastic`` grants how much)."""
        return 0 < self.min_gpus < self.whole_gpus or 0 < self.min_replicas < self.replicas

    @property
    def is_gang(self) -> bool:
        """Placed all or nothing by reserve_gang.lua (an elastic gang granted one member is one too)."""
        return self.replicas > 1 or self.min_replicas > 0

    @property
    def gpus(self) -> float:
        """GPUs asked for, a share counting as its fraction."""
        return self.whole_gpus or self.gpu_milli / MILLI

    @property
    def gpu_kind(self) -> GpuKind:
        return (self.whole_gpus, self.gpu_milli)


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
    preemptions: int = 0  # times it was stopped for a more urgent task (SchedulingConfig.max_preemptions)
    checkpoint_at: float | None = None  # seconds; its last checkpoint in this attempt, if it reported one
    gang: str | None = None  # the gang it is a member of: preempting it stops every member (gang_preemption)

    def work_at_risk(self, now: float) -> float:
        """Seconds of work stopping it now would lose: since its last checkpoint, else since it started."""
        saved = self.started_at if self.checkpoint_at is None else max(self.started_at, self.checkpoint_at)
        return max(0.0, now - saved)

    @property
    def gpus(self) -> float:
        return len(self.gpu_indices) * self.gpu_milli / MILLI

    @property
    def gpu_kind(self) -> GpuKind:
        """The GPU part of the request it runs for (as TaskRequest.gpu_kind)."""
        whole = bool(self.gpu_indices) and self.gpu_milli >= MILLI
        return (len(self.gpu_indices), 0) if whole else (0, self.gpu_milli if self.gpu_indices else 0)


@dataclass(slots=True)
class WarmMap:
    """Warm pool processes as workers publish them (store.warm_map; placement.warm): ``by_name``
    task name -> node id -> GPU sets (indices as reserved) whose warm process last ran it;
    ``held`` node id -> every GPU index some warm process holds; ``processes`` node id -> its warm
    processes (a node whose every slot has one has no fresh process: any other set evicts one)."""

    by_name: dict[str, dict[str, list[tuple[int, ...]]]] = field(default_factory=dict)
    held: dict[str, set[int]] = field(default_factory=dict)
    processes: dict[str, int] = field(default_factory=dict)

    def add(self, node_id: str, gpus: tuple[int, ...], name: str) -> None:
        self.by_name.setdefault(name, {}).setdefault(node_id, []).append(gpus)
        self.held.setdefault(node_id, set()).update(gpus)
        self.processes[node_id] = self.processes.get(node_id, 0) + 1

    def evicts(self, node_id: str, gpus: Iterable[int]) -> bool:
        """Would a task on these GPUs make a warm process holding one of them exit?"""
        held = self.held.get(node_id)
        return held is not None and any(i in held for i in gpus)

    @classmethod
    def of(cls, by_name: Mapping[str, Mapping[str, Iterable[tuple[int, ...]]]]) -> WarmMap:
        warm = cls()
        for name, nodes in by_name.items():
            for node_id, sets in nodes.items():
                for gpus in sets:
                    warm.add(node_id, tuple(gpus), name)
        return warm

    def __bool__(self) -> bool:
        return bool(self.held)


@dataclass(slots=True)
class Snapshot:
    """Everything one planning pass sees; built by the dispatcher (or the simulator) from Redis."""

    now: float  # seconds
    nodes: list[NodeFree]
    pending: list[TaskRequest]  # in queue order: priority, then submit order
    running: list[RunningTask] = field(default_factory=list)
    # Learned mean runtimes: (task name, GPU kind) and (task name, None) -> seconds.
    runtimes: dict[tuple[str, GpuKind | None], float] = field(default_factory=dict)
    # Request mix for frag_aware: GPU kind -> how many such tasks were submitted.
    mix: dict[GpuKind, int] = field(default_factory=dict)
    # Pending tasks waiting for preempted victims to stop: preemptor id -> node id.
    preempting_for: dict[str, str] = field(default_factory=dict)
    # Task names with a rate limit: name -> (starts allowed per second, starts its bucket allows now).
    rate_limits: dict[str, tuple[float, float]] = field(default_factory=dict)
    # Nodes that are up but draining: nothing is placed there; only a waiting task's reason names them.
    draining: list[NodeFree] = field(default_factory=list)
    # Warm GPU sets by the task name they last ran: the placers try them first (placement.warm).
    warm: WarmMap = field(default_factory=WarmMap)
    # The dispatcher's index of what is free, kept across cycles: best fit starts from it when it
    # holds exactly ``nodes`` (the same placements, without a visit per node; issue 14).
    index: FreeIndex | None = None


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
class GangPlacement:
    """A proposal for a whole gang: ``members[rank]`` is where member ``rank`` runs (its
    ``task_id`` is the gang's). Kept apart from ``Plan.placements``, which reserve.lua commits
    one task per placement: a gang must be committed in one call or not at all."""

    task_id: str
    members: tuple[Placement, ...]

    @property
    def nodes(self) -> list[str]:
        return list(dict.fromkeys(p.node_id for p in self.members))


@dataclass(slots=True)
class Plan:
    placements: list[Placement] = field(default_factory=list)
    gangs: list[GangPlacement] = field(default_factory=list)
    preemptions: list[Preemption] = field(default_factory=list)
    waiting: dict[str, Waiting] = field(default_factory=dict)
    tokens: dict[str, float] = field(default_factory=dict)  # starts each rate-limited name has left


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
    # The task names its worker runs; None: any (a node that does not say, a simulated one).
    serves: frozenset[str] | None = None
    # Draining: nothing new is placed on it; readers hand such nodes to the planner only to explain.
    draining: bool = False

    def copy(self) -> NodeFree:
        return NodeFree(self.id, self.gpu_memory_mb, list(self.free_milli), list(self.free_mem),
                        self.free_cpu_milli, self.free_memory_mb, self.free_slots, dict(self.labels),
                        self.cap_cpu_milli, self.cap_memory_mb, self.cap_slots, self.serves, self.draining)

    def could_hold(self, task: TaskRequest) -> bool:
        """Whether the node, empty, would fit ``task`` (its registered capacity, not what is free)."""
        gpus = len(self.free_milli)
        if task.whole_gpus and (gpus < task.whole_gpus or self.gpu_memory_mb < task.gpu_memory_mb):
            return False
        if task.gpu_milli and (not gpus or self.gpu_memory_mb < task.gpu_memory_mb):
            return False
        return (self.matches(task) and self.cap_cpu_milli >= task.cpu_milli and self.cap_memory_mb >= task.memory_mb
                and self.cap_slots >= 1)

    def gpu_is_whole(self, i: int) -> bool:
        return self.free_milli[i] == MILLI and self.free_mem[i] == self.gpu_memory_mb

    def whole_indices(self) -> list[int]:
        """GPUs nobody holds any share of, lowest index first."""
        memory = self.gpu_memory_mb  # gpu_is_whole inlined: this runs for every placement
        return [i for i, (milli, mem) in enumerate(zip(self.free_milli, self.free_mem, strict=True))
                if milli == MILLI and mem == memory]

    def matches(self, task: TaskRequest) -> bool:
        """The node runs the task's name and has its labels (one value of each preference list),
        whatever is free."""
        return (self.serves is None or task.name in self.serves) and labels_fit(self.labels, task.labels, task.prefer)

    def host_fits(self, task: TaskRequest) -> bool:
        if self.free_slots < 1 or self.free_cpu_milli < task.cpu_milli or self.free_memory_mb < task.memory_mb:
            return False
        if self.serves is not None and task.name not in self.serves:
            return False
        return not (task.labels or task.prefer) or labels_fit(self.labels, task.labels, task.prefer)

    def preference(self, task: TaskRequest) -> int:
        """0 for the node a task prefers most; higher for each step down its preference lists."""
        return sum(values.index(self.labels[k]) for k, values in task.prefer if self.labels.get(k) in values)

    def share_memory(self, task: TaskRequest) -> int:
        """GPU memory a fractional task takes on this node's GPUs."""
        return task.gpu_memory_mb or task.gpu_milli * self.gpu_memory_mb // MILLI

    def gpus_for(self, task: TaskRequest, pick: str = "fill") -> list[int] | None:
        """The GPU indices ``task`` would take here ([] for a CPU task), or None if it does not fit.

        Whole GPUs: the lowest wholly free ones. A share: the GPU it fills best (``pick="spread"``:
        the one with most share free; ``"first"``: the lowest index), lowest index on ties."""
        if not self.host_fits(task):
            return None
        if task.whole_gpus:
            if self.gpu_memory_mb < task.gpu_memory_mb:
                return None
            whole = self.whole_indices()
            return whole[: task.whole_gpus] if len(whole) >= task.whole_gpus else None
        if not task.gpu_milli:
            return []
        memory = self.share_memory(task)
        best, best_key = -1, 0
        for i, (milli, mem) in enumerate(zip(self.free_milli, self.free_mem, strict=True)):
            if milli >= task.gpu_milli and mem >= memory:
                key = -milli if pick == "spread" else milli if pick == "fill" else i
                if best < 0 or key < best_key:
                    best, best_key = i, key
        return None if best < 0 else [best]

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


def demand(task: TaskRequest) -> Vector:
    """What a pending task asks for, as fair share counts it: a gang, the sum of its members."""
    k = task.replicas
    return (k * task.gpus, k * task.cpu_milli / MILLI, float(k * task.memory_mb))


def held(task: RunningTask) -> Vector:
    """What a running task holds, as fair share counts it."""
    return (task.gpus, task.cpu_milli / MILLI, float(task.memory_mb))
