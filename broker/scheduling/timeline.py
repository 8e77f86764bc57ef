"""Free capacity over time, per node: the timeline backfill holds and earliest starts live on.

``Timeline`` knows, per node, when running tasks release what they hold (by their estimates)
and what is held for blocked higher-ranked tasks (backfill holds, preemptors). It builds the
``views`` a placer judges a node by, and finds a task's earliest start.

Each node's free capacity is a step function of time. It is built once per change on that
node (``_Profile``: the state after each distinct event time) and every question reads it:
what is free at ``t``, the least free over ``[start, end)``, the earliest start of a task.
Like Slurm's backfill map, this turns the search from "rebuild the node per candidate time"
into "walk the steps once".
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from broker.models import MILLI
from broker.scheduling.model import NodeFree, TaskRequest

INF = math.inf
Start = tuple[float, str, list[int]]  # when, node, GPU indices


@dataclass(slots=True)
class Usage:
    """What one task holds (or will hold) on one node: ``milli``/``mem`` on each GPU index."""

    task_id: str
    gpu_indices: tuple[int, ...]
    milli: int
    mem: int
    cpu_milli: int
    memory_mb: int

    @classmethod
    def of(cls, task: TaskRequest, node: NodeFree, gpus: Iterable[int]) -> Usage:
        share = bool(task.gpu_milli)
        return cls(task.id, tuple(gpus), task.gpu_milli if share else MILLI,
                   node.share_memory(task) if share else node.gpu_memory_mb, task.cpu_milli, task.memory_mb)

    def apply(self, node: NodeFree, sign: int) -> None:
        for i in self.gpu_indices:
            node.free_milli[i] += sign * self.milli
            node.free_mem[i] += sign * self.mem
        node.free_cpu_milli += sign * self.cpu_milli
        node.free_memory_mb += sign * self.memory_mb
        node.free_slots += sign


@dataclass(slots=True)
class Hold:
    """Capacity kept for ``usage.task_id`` on ``node_id`` over [start, end)."""

    node_id: str
    start: float
    end: float
    usage: Usage


def _min_into(into: NodeFree, other: NodeFree) -> None:
    into.free_milli = [min(a, b) for a, b in zip(into.free_milli, other.free_milli, strict=True)]
    into.free_mem = [min(a, b) for a, b in zip(into.free_mem, other.free_mem, strict=True)]
    into.free_cpu_milli = min(into.free_cpu_milli, other.free_cpu_milli)
    into.free_memory_mb = min(into.free_memory_mb, other.free_memory_mb)
    into.free_slots = min(into.free_slots, other.free_slots)


def _fresh(state: NodeFree) -> NodeFree:
    """A copy the caller may change (labels are shared: nothing here writes them)."""
    return NodeFree(state.id, state.gpu_memory_mb, list(state.free_milli), list(state.free_mem),
                    state.free_cpu_milli, state.free_memory_mb, state.free_slots, state.labels,
                    state.cap_cpu_milli, state.cap_memory_mb, state.cap_slots, state.serves)


class _Profile:
    """One node's free capacity from now on: ``states[i]`` holds over [times[i], times[i + 1]).

    ``times[0]`` is now. Only a hold's start takes capacity away, so the least free over a span
    is the state at its start or at a hold start inside it (``dips``); ``next_dip[i]`` is the
    first such index at or after ``i``."""

    __slots__ = ("next_dip", "states", "times")

    def __init__(self, now: float, free: NodeFree, releases: list[tuple[float, Usage]], holds: list[Hold]) -> None:
        events: dict[float, list[tuple[int, Usage]]] = {now: []}
        for at, usage in releases:
            if at < INF:
                events.setdefault(at, []).append((1, usage))
        for hold in holds:
            if hold.start < hold.end:  # an empty hold is never in force
                events.setdefault(max(hold.start, now), []).append((-1, hold.usage))
                if hold.end < INF:
                    events.setdefault(hold.end, []).append((1, hold.usage))
        state = _fresh(free)
        self.times = sorted(events)
        self.states: list[NodeFree] = []
        dips: list[bool] = []
        for when in self.times:
            for sign, usage in events[when]:
                usage.apply(state, sign)
            self.states.append(_fresh(state))
            dips.append(any(sign < 0 for sign, _ in events[when]))
        self.next_dip = [len(dips)] * (len(dips) + 1)
        for i in range(len(dips) - 1, -1, -1):
            self.next_dip[i] = i if dips[i] else self.next_dip[i + 1]

    def index(self, when: float) -> int:
        return bisect_right(self.times, when) - 1

    def least(self, i: int, end: float) -> NodeFree:
        """The least free over [times[i], end) (a fresh copy)."""
        state = _fresh(self.states[i])
        times, states, next_dip = self.times, self.states, self.next_dip
        j = next_dip[i + 1]
        while j < len(times) and times[j] < end:
            _min_into(state, states[j])
            j = next_dip[j + 1]
        return state


OVERDUE_MIN_S = 1.0  # the least an overdue task is still expected to run


def expected_end(started_at: float, estimate: float, now: float) -> float | None:
    """When a running task should end: ``started_at + estimate``; once it has outlived that, as
    long again as it has run so far (its estimate moves with it, and is never now: what it holds
    is not free yet). None: never known."""
    if estimate == INF:
        return None
    end = started_at + estimate
    return end if end > now else now + max(now - started_at, OVERDUE_MIN_S)


class Timeline:
    """Free capacity over time, per node: free now (the placer's live copy), plus releases at
    running tasks' expected ends, less holds. Releases only add, so a task that starts at ``t``
    and runs ``d`` fits if it fits at ``t`` and at each hold start in (t, t + d)."""

    def __init__(self, now: float, nodes: dict[str, NodeFree]) -> None:
        self.now = now
        self.nodes = nodes
        self.releases: dict[str, list[tuple[float, Usage]]] = {n: [] for n in nodes}
        self.holds: dict[str, list[Hold]] = {}
        self.later: set[str] = set()  # nodes with a hold that starts after now
        self._binding: dict[str, None] = {}  # nodes where some task's view is less than what is free (ordered)
        self._dirty: dict[str, None] = {}
        self.version: dict[str, int] = dict.fromkeys(nodes, 0)
        self.changes = 0  # bumped on every change anywhere: keys the caches below
        self._views: dict[tuple[str, int, int], NodeFree | None] = {}
        self._earliest: dict[tuple[Any, ...], Start | None] = {}
        self._node_earliest: dict[tuple[Any, ...], tuple[int, tuple[float, list[int]] | None]] = {}
        self._bounds: dict[str, tuple[int, list[float]]] = {}
        self._profiles: dict[str, tuple[int, _Profile]] = {}
        self._fits_memo: dict[tuple[str, Any], tuple[_Profile, list[bool]]] = {}

    def touch(self, node_id: str) -> None:
        self.version[node_id] += 1
        self.changes += 1
        self._dirty[node_id] = None

    def release(self, node_id: str, when: float | None, usage: Usage) -> None:
        """``usage`` comes back at ``when`` (None: not before the end of time, but a preemption may move it)."""
        self.releases[node_id].append((INF if when is None else max(when, self.now), usage))
        self.releases[node_id].sort(key=lambda r: r[0])
        self.touch(node_id)

    def release_now(self, node_id: str, task_id: str, usage: Usage) -> None:
        """A task asked to stop: what it holds counts as coming back now."""
        kept = [r for r in self.releases[node_id] if r[1].task_id != task_id]
        self.releases[node_id] = [(self.now, usage), *kept]
        self.touch(node_id)

    def hold(self, hold: Hold) -> None:
        self.holds.setdefault(hold.node_id, []).append(hold)
        if hold.start > self.now:
            self.later.add(hold.node_id)
        self.touch(hold.node_id)

    def _profile(self, node_id: str) -> _Profile:
        cached = self._profiles.get(node_id)
        if cached is None or cached[0] != self.version[node_id]:
            profile = _Profile(self.now, self.nodes[node_id], self.releases[node_id], self.holds.get(node_id, []))
            cached = self._profiles[node_id] = (self.version[node_id], profile)
        return cached[1]

    def state_at(self, node_id: str, when: float, moved: Collection[str] = ()) -> NodeFree:
        """Free at ``when``: ``moved`` task ids release now instead of at their end."""
        if not moved and when >= self.now:
            profile = self._profile(node_id)
            return _fresh(profile.states[profile.index(when)])
        state = self.nodes[node_id].copy()
        for at, usage in self.releases[node_id]:
            if at <= when or usage.task_id in moved:
                usage.apply(state, 1)
        for h in self.holds.get(node_id, ()):
            if h.start <= when < h.end:
                h.usage.apply(state, -1)
        return state

    def window(self, node_id: str, start: float, end: float, moved: Collection[str] = ()) -> NodeFree:
        """Free throughout [start, end): the least of what is free at each point."""
        if not moved and start >= self.now:
            profile = self._profile(node_id)
            return profile.least(profile.index(start), end)
        state = self.state_at(node_id, start, moved)
        for h in self.holds.get(node_id, ()):
            if start < h.start < end:
                _min_into(state, self.state_at(node_id, h.start, moved))
        return state

    def views(self, duration: float) -> dict[str, NodeFree] | None:
        """Per node with a hold starting before now + ``duration``: what a task running that long
        may take now without delaying any hold."""
        for node_id in self._dirty:  # a node whose view is its free capacity for the longest task is so for all
            if node_id in self.holds:
                view = self.window(node_id, self.now, INF)
                _min_into(view, self.nodes[node_id])
                if view == self.nodes[node_id]:
                    self._binding.pop(node_id, None)
                else:
                    self._binding[node_id] = None
        self._dirty.clear()
        out = {}
        for node_id in self._binding:
            holds = self.holds[node_id]
            starts = sum(1 for h in holds if h.start < self.now + duration)
            if not starts:
                continue
            key = (node_id, self.version[node_id], starts)
            if key not in self._views:
                view = self.window(node_id, self.now, self.now + duration)
                _min_into(view, self.nodes[node_id])
                self._views[key] = None if view == self.nodes[node_id] else view  # a hold on busy GPUs only
            found = self._views[key]
            if found is not None:
                out[node_id] = found
        return out or None

    def earliest(self, task: TaskRequest, duration: float, order: Mapping[str, int], fits_now: bool = True
                 ) -> Start | None:
        """When and where ``task`` could start soonest given expected ends and holds: (time, node, GPUs).

        ``fits_now=False`` promises it fits on no node's free capacity now (it was just refused)."""
        key = (task.shape, duration if self.holds else None, self.changes, fits_now)
        if key not in self._earliest:
            self._earliest[key] = self._search(task, duration, order, fits_now)
        return self._earliest[key]

    def earliest_on(self, node_id: str, task: TaskRequest, duration: float) -> tuple[float, list[int]] | None:
        """When and with which GPUs ``task`` could start soonest on ``node_id`` for ``duration``."""
        return self._node_earliest_cached(node_id, task, duration)

    def _search(self, task: TaskRequest, duration: float, order: Mapping[str, int], fits_now: bool) -> Start | None:
        candidates = [n for n in self.nodes.values()
                      if len(n.free_milli) >= task.whole_gpus and n.matches(task)
                      and (not task.gpu_milli or n.free_milli)]
        # Lower bounds, to visit likely nodes first and stop early: the k-th GPU to become wholly
        # free; else, for a task that fits nowhere now, a node's first release (nothing there changes before).
        bounds = {n.id: self._bound(n.id, task, fits_now) for n in candidates}
        candidates.sort(key=lambda n: bounds[n.id])
        best: tuple[tuple[float, int, int], str, list[int]] | None = None
        for node in candidates:
            if bounds[node.id] == INF or (best is not None and bounds[node.id] > best[0][0]):
                break
            found = self._node_earliest_cached(node.id, task, duration)
            if found is not None:
                rank = (found[0], node.preference(task), order[node.id])
                if best is None or rank < best[0]:
                    best = (rank, node.id, found[1])
        return None if best is None else (best[0][0], best[1], best[2])

    def _bound(self, node_id: str, task: TaskRequest, fits_now: bool) -> float:
        if task.whole_gpus:
            return self._whole_bound(node_id, task.whole_gpus)
        if fits_now or node_id in self.holds:
            return self.now
        releases = self.releases[node_id]
        return releases[0][0] if releases else INF

    def _whole_bound(self, node_id: str, count: int) -> float:
        cached = self._bounds.get(node_id)
        if cached is None or cached[0] != self.version[node_id]:
            cached = (self.version[node_id], self._ready_times(node_id))
            self._bounds[node_id] = cached
        return cached[1][count - 1]

    def _ready_times(self, node_id: str) -> list[float]:
        """When each GPU becomes wholly free by the expected ends, soonest first (inf: never known)."""
        node = self.nodes[node_id]
        ready = [self.now if node.gpu_is_whole(i) else INF for i in range(len(node.free_milli))]
        ultimate = node.copy()
        last = [self.now] * len(ready)
        for at, usage in self.releases[node_id]:
            if at == INF:
                break
            usage.apply(ultimate, 1)
            for i in usage.gpu_indices:
                last[i] = max(last[i], at)
        for i in range(len(ready)):
            if ready[i] == INF and ultimate.gpu_is_whole(i):
                ready[i] = last[i]
        return sorted(ready)

    def _node_earliest_cached(self, node_id: str, task: TaskRequest, duration: float) -> tuple[float, list[int]] | None:
        key = (node_id, task.shape, duration if node_id in self.holds else None)
        cached = self._node_earliest.get(key)
        if cached is not None and cached[0] == self.version[node_id]:
            return cached[1]
        found = self._node_earliest_at(node_id, task, duration)
        self._node_earliest[key] = (self.version[node_id], found)
        return found

    def _node_earliest_at(self, node_id: str, task: TaskRequest, duration: float) -> tuple[float, list[int]] | None:
        releases = self.releases[node_id]
        if node_id not in self.holds:  # free only grows: apply releases in time order until it fits
            state = self.nodes[node_id].copy()
            when, i = self.now, 0
            while True:
                while i < len(releases) and releases[i][0] <= when:
                    releases[i][1].apply(state, 1)
                    i += 1
                gpus = state.gpus_for(task)
                if gpus is not None:
                    return when, gpus
                if i == len(releases) or releases[i][0] == INF:
                    return None
                when = releases[i][0]
        # Only a release or a hold's end lets more start, and a pure dip never fits sooner than the
        # step before it, so every step of the profile is a candidate. A step the task does not
        # fit at rules out every start whose run spans it: skip past it.
        profile = self._profile(node_id)
        fits = self._fits(node_id, profile, task)
        times, next_dip, i = profile.times, profile.next_dip, 0
        while i < len(times):
            if not fits[i]:
                i += 1
                continue
            end, j, blocked = times[i] + duration, next_dip[i + 1], -1
            while j < len(times) and times[j] < end:
                if not fits[j]:
                    blocked = j
                j = next_dip[j + 1]
            if blocked >= 0:
                i = blocked + 1
                continue
            gpus = profile.least(i, end).gpus_for(task)
            if gpus is not None:
                return times[i], gpus
            i += 1
        return None

    def _fits(self, node_id: str, profile: _Profile, task: TaskRequest) -> list[bool]:
        """Whether ``task`` fits at each step of ``node_id``'s profile (whatever its duration)."""
        key = (node_id, task.shape)
        cached = self._fits_memo.get(key)
        if cached is None or cached[0] is not profile:
            cached = self._fits_memo[key] = (profile, [state.gpus_for(task) is not None for state in profile.states])
        return cached[1]
