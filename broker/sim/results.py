"""What a simulation returns: per-job outcomes, the cluster over time, and run figures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from broker.errors import GpuBrokerError
from broker.sim.traces import TraceJob

EPOCH_MS = 1_700_000_000_000  # virtual time 0 of every trace (scripts take ms since the epoch)


class SimulationError(GpuBrokerError):
    """The broker did something the simulation cannot follow (an invariant broke), or bad setup."""


class VirtualClock:
    """Milliseconds since the epoch, moved only by the simulation."""

    def __init__(self, now_ms: int = EPOCH_MS) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms

    @property
    def seconds(self) -> float:
        """Seconds since the trace's time 0."""
        return (self.now_ms - EPOCH_MS) / 1000


@dataclass(slots=True)
class JobOutcome:
    """What became of one trace job. Times are seconds from the trace's time 0."""

    job: TraceJob
    started_s: float | None = None  # first start
    finished_s: float | None = None
    node: str | None = None  # of the last start
    gpus: tuple[int, ...] = ()
    preemptions: int = 0
    rejected: str | None = None  # why submit refused it (no node could ever run it)
    order: int | None = None  # position among all placements of the run (last placement)
    members: int = 1  # a job larger than any node replays as a gang of this many (broker.sim.gangs)
    saved_s: float = 0.0  # run time kept by checkpoints across preemptions: a restart resumes here
    lost_s: float = 0.0  # run time redone after preemptions (since the last checkpoint of each stopped run)

    def stopped(self, ran_s: float, checkpoint_interval_s: float | None) -> None:
        """A run of ``ran_s`` seconds was preempted: keep what its last checkpoint saved."""
        self.preemptions += 1
        kept = ran_s // checkpoint_interval_s * checkpoint_interval_s if checkpoint_interval_s else 0.0
        self.saved_s += kept
        self.lost_s += ran_s - kept


@dataclass(slots=True)
class Series:
    """The cluster after each instant with events: allocation is the GPU capacity reserved
    (a share counts as its fraction), occupied the GPUs holding any task."""

    t_s: list[float] = field(default_factory=list)
    allocated_gpus: list[float] = field(default_factory=list)
    occupied_gpus: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    running: list[int] = field(default_factory=list)


@dataclass(slots=True)
class SimResult:
    label: str
    scheduling: dict[str, Any]
    nodes: int
    gpus: int
    jobs: list[JobOutcome]
    series: Series
    placements: list[tuple[str, str, tuple[int, ...], float]]  # (job id, node, GPUs, t) in commit order
    cycles: int = 0
    events: int = 0
    wall_s: float = 0.0
    dispatcher_s: float = 0.0  # wall time inside Dispatcher.run_cycle
    phase_s: dict[str, float] = field(default_factory=dict)  # the cycles' own phase timings, summed
    handoffs: int = 0  # placements finish.lua made, passing an ended task's place on (setting handoff)


@dataclass(slots=True)
class Batch:
    """One batch of a static run (``Simulator.run_batches``); ``allocated_gpus`` is the GPU
    capacity reserved once it is done, this batch's and the earlier ones' (a share counts its fraction)."""

    jobs: int
    placed: int
    dropped: int  # refused at submit, or pending when the batch's cycle was done (then cancelled)
    allocated_gpus: float
