"""The timeline's per-node profile answers exactly as rebuilding the node at each time does.

``Plain`` is that rebuild, written from the timeline's rules: free at ``t`` is free now plus
every release at or before ``t``, less every hold in force at ``t``; free over a span is the
least of that at its start and at each hold start inside it; a task's earliest start on a node
is the first of now, a release or a hold's end at which it fits over its whole run. Random
nodes (whole GPUs and shares, CPU, memory, slots) get random releases and holds, and both
answer the same questions."""

from __future__ import annotations

import random

import pytest

from broker.models import MILLI
from broker.scheduling.model import NodeFree, TaskRequest
from broker.scheduling.timeline import INF, Hold, Timeline, Usage
from tests.scheduling.helpers import GiB, node, task

NOW = 1000.0


class Plain:
    def __init__(self, timeline: Timeline) -> None:
        self.t = timeline

    def state_at(self, node_id: str, when: float) -> NodeFree:
        state = self.t.nodes[node_id].copy()
        for at, usage in self.t.releases[node_id]:
            if at <= when:
                usage.apply(state, 1)
        for h in self.t.holds.get(node_id, ()):
            if h.start <= when < h.end:
                h.usage.apply(state, -1)
        return state

    def window(self, node_id: str, start: float, end: float) -> NodeFree:
        points = [start, *(h.start for h in self.t.holds.get(node_id, ()) if start < h.start < end)]
        states = [self.state_at(node_id, p) for p in points]
        least = states[0]
        for s in states[1:]:
            least.free_milli = [min(a, b) for a, b in zip(least.free_milli, s.free_milli, strict=True)]
            least.free_mem = [min(a, b) for a, b in zip(least.free_mem, s.free_mem, strict=True)]
            least.free_cpu_milli = min(least.free_cpu_milli, s.free_cpu_milli)
            least.free_memory_mb = min(least.free_memory_mb, s.free_memory_mb)
            least.free_slots = min(least.free_slots, s.free_slots)
        return least

    def earliest(self, t: TaskRequest, duration: float, order: dict[str, int]) -> tuple[float, str, list[int]] | None:
        best = None
        for node_id, free in self.t.nodes.items():
            if len(free.free_milli) < t.whole_gpus or not free.matches(t):
                continue
            times = sorted({NOW, *(at for at, _ in self.t.releases[node_id] if at < INF),
                            *(h.end for h in self.t.holds.get(node_id, ()) if NOW < h.end < INF)})
            for when in times:
                gpus = self.window(node_id, when, when + duration).gpus_for(t)
                if gpus is not None:
                    rank = (when, free.preference(t), order[node_id])
                    if best is None or rank < best[0]:
                        best = (rank, node_id, gpus)
                    break
        return None if best is None else (best[0][0], best[1], best[2])


def _usage(rng: random.Random, free: NodeFree, i: int) -> Usage:
    """Something a task holds on ``free``: a few whole GPUs or a share of one, CPU and memory."""
    count = len(free.free_milli)
    if count and rng.random() < 0.6:
        gpus = tuple(sorted(rng.sample(range(count), rng.randint(1, count))))
        return Usage(f"u{i}", gpus, MILLI, free.gpu_memory_mb, rng.choice([0, 1000, 4000]), rng.choice([0, 8 * GiB]))
    if count and rng.random() < 0.7:
        milli = rng.choice([250, 500])
        return Usage(f"u{i}", (rng.randrange(count),), milli, milli * free.gpu_memory_mb // MILLI, 500, GiB)
    return Usage(f"u{i}", (), 0, 0, rng.choice([1000, 8000]), rng.choice([GiB, 32 * GiB]))


def random_timeline(rng: random.Random) -> Timeline:
    nodes = {}
    for n in range(rng.randint(1, 5)):
        free = node(f"n{n}", gpus=rng.choice([0, 2, 4, 8]), mem=40 * GiB, cpus=32, ram=256 * GiB, slots=8,
                    zone=rng.choice("ab"))
        nodes[free.id] = free
    timeline = Timeline(NOW, nodes)
    times = [NOW, NOW + 10, NOW + 30, NOW + 60, NOW + 100, NOW + 200]
    for i in range(rng.randint(0, 14)):
        node_id = rng.choice(list(nodes))
        usage = _usage(rng, nodes[node_id], i)
        if rng.random() < 0.5:  # running now: take it from free now, give it back at its end
            usage.apply(nodes[node_id], -1)
            timeline.release(node_id, rng.choice([*times, INF]), usage)
        else:
            start = rng.choice(times)
            end = rng.choice([start, start + 15, start + 50, start + 120, INF])
            timeline.hold(Hold(node_id, start, end, usage))
    return timeline


def random_task(rng: random.Random, i: int) -> TaskRequest:
    shape = rng.random()
    labels = {"zone": rng.choice("ab")} if rng.random() < 0.3 else {}
    if shape < 0.5:
        return task(f"t{i}", rng.choice([1, 2, 4, 8]), cpus=rng.choice([0, 2]), **labels)
    if shape < 0.8:
        return task(f"t{i}", rng.choice([0.25, 0.5]), **labels)
    return task(f"t{i}", 0, cpus=rng.choice([1, 8]), ram=rng.choice([GiB, 64 * GiB]), **labels)


@pytest.mark.parametrize("seed", range(60))
def test_profile_answers_as_a_rebuild_at_each_time(seed: int) -> None:
    rng = random.Random(seed)
    timeline = random_timeline(rng)
    plain = Plain(timeline)
    order = {n: i for i, n in enumerate(timeline.nodes)}
    points = [NOW, NOW + 5, NOW + 10, NOW + 30, NOW + 45, NOW + 60, NOW + 100, NOW + 150, NOW + 200, NOW + 500]
    for node_id in timeline.nodes:
        for when in points:
            assert timeline.state_at(node_id, when) == plain.state_at(node_id, when), (node_id, when)
            for length in (1, 20, 70, 400, INF):
                assert timeline.window(node_id, when, when + length) == plain.window(node_id, when, when + length)
    for i in range(12):
        t = random_task(rng, i)
        for duration in (5.0, 40.0, 150.0, INF):
            assert timeline.earliest(t, duration, order) == plain.earliest(t, duration, order), (t, duration)


def test_profile_follows_changes_made_after_it_was_read() -> None:
    """A hold or release added after a question is asked is seen by the next question."""
    free = node("n0", gpus=2, mem=40 * GiB)
    timeline = Timeline(NOW, {"n0": free})
    whole = Usage("r", (0, 1), MILLI, free.gpu_memory_mb, 0, 0)
    two = task("big", 2)
    assert timeline.earliest(two, 50.0, {"n0": 0}) == (NOW, "n0", [0, 1])
    timeline.hold(Hold("n0", NOW, NOW + 100, whole))
    assert timeline.earliest(two, 50.0, {"n0": 0}) == (NOW + 100, "n0", [0, 1])
    assert timeline.window("n0", NOW, NOW + 10).free_milli == [0, 0]
    assert timeline.window("n0", NOW + 100, NOW + 110).free_milli == [MILLI, MILLI]
