"""Ordering: fifo, priority with aging, sjf/srtf with learned estimates, and weighted DRF with quotas."""

from __future__ import annotations

import random
from typing import Any

import pytest

from broker.scheduling.model import RunningTask, TaskRequest
from tests.scheduling.helpers import MIN, node, order_of, planner, running, snapshot, task

ONE_SLOT = [node("n", 1)]


def ranks(tasks: list[TaskRequest], now: float = 0.0, runtimes: dict[tuple[str, str], float] | None = None,
          **config: Any) -> list[str]:
    """The policy's order, read from the positions of tasks that cannot run (no node fits them)."""
    result = planner(**config).plan(snapshot([node("n", 0)], tasks, now=now, runtimes=runtimes or {}))
    return sorted(result.waiting, key=lambda t: result.waiting[t].position)


ORDER_TABLE = [
    pytest.param({"ordering": "fifo"}, [task("a", 1, priority=9, at=20), task("b", 1, at=10), task("c", 1, at=10)],
                 0.0, None, ["b", "c", "a"], id="fifo: submit time, then seq"),
    pytest.param({"ordering": "priority"},
                 [task("a", 1, priority=1), task("b", 1, priority=5), task("c", 1, priority=5)], 0.0, None,
                 ["b", "c", "a"], id="priority: higher first, ties by seq"),
    pytest.param({"ordering": "priority", "aging_per_minute": 1.0},
                 [task("new", 1, priority=5, at=100 * MIN), task("old", 1, priority=0, at=0)],
                 100 * MIN, None, ["old", "new"], id="aging: 100 minutes waited outrank priority 5"),
    pytest.param({"ordering": "priority", "aging_per_minute": 1.0, "aging_cap": 3},
                 [task("new", 1, priority=5, at=100 * MIN), task("old", 1, priority=0, at=0)],
                 100 * MIN, None, ["new", "old"], id="aging is capped"),
    pytest.param({"ordering": "sjf"}, [task("long", 1, est=600), task("unknown", 1), task("short", 1, est=60)],
                 0.0, None, ["short", "long", "unknown"], id="sjf: shortest first, unknown last"),
    pytest.param({"ordering": "sjf"}, [task("a", 1, est=60, priority=1), task("b", 1, est=60, priority=7)],
                 0.0, None, ["b", "a"], id="sjf: ties by priority"),
    pytest.param({"ordering": "sjf"}, [task("a", 1, name="train"), task("b", 1, name="infer"), task("c", 1, name="x")],
                 0.0, {("train", (1, 0)): 900.0, ("infer", None): 30.0}, ["b", "a", "c"],
                 id="sjf: learned estimates by name and shape, then by name"),
    pytest.param({"ordering": "sjf", "default_runtime_s": 100},
                 [task("a", 1, name="x"), task("b", 1, est=200)], 0.0, None, ["a", "b"],
                 id="sjf: default runtime for tasks without estimates"),
    pytest.param({"ordering": "srtf"}, [task("long", 1, est=600), task("short", 1, est=60)],
                 0.0, None, ["short", "long"], id="srtf orders as sjf"),
    pytest.param({"ordering": "hrrn"}, [task("long", 1, est=600, at=0), task("unknown", 1, at=0),
                                        task("short", 1, est=60, at=0)],
                 0.0, None, ["short", "long", "unknown"], id="hrrn: no one has waited: sjf"),
    # at 1,200 s: long waited 1,200 s: 1 + 1200 / 600 = 3; short came at 1,170 s: 1 + 30 / 60 = 1.5
    pytest.param({"ordering": "hrrn"}, [task("long", 1, est=600, at=0), task("short", 1, est=60, at=1170)],
                 1200.0, None, ["long", "short"], id="hrrn: a long wait outranks a fresh short task"),
    # 8 s and 2 s both count as 10 s: 1 + 10 / 10 = 2 beats 1 + 2 / 10 (1 + 2 / 2 would tie)
    pytest.param({"ordering": "hrrn"}, [task("eight", 1, est=8, at=0), task("two", 1, est=2, at=8)],
                 10.0, None, ["eight", "two"], id="hrrn: runs under 10 s count as 10 s"),
]


@pytest.mark.parametrize(("config", "tasks", "now", "runtimes", "expected"), ORDER_TABLE)
def test_order(config: dict[str, Any], tasks: list[TaskRequest], now: float,
               runtimes: dict[tuple[str, str], float] | None, expected: list[str]) -> None:
    assert ranks(tasks, now, runtimes, **config) == expected


def test_aging_prevents_starvation() -> None:
    """A steady stream of priority-5 arrivals: the old priority-0 task gets the slot once it has aged."""
    config = {"ordering": "priority", "aging_per_minute": 0.5}
    old = task("old", 1, at=0.0)
    started_at = None
    for minute in range(0, 30):
        fresh = task(f"hi{minute}", 1, priority=5, at=minute * MIN)
        result = planner(**config).plan(snapshot([node("n", 1)], [old, fresh], now=minute * MIN))
        if order_of(result) == ["old"]:
            started_at = minute
            break
    assert started_at == 10  # 0.5 per minute reaches 5 after 10 minutes; the tie goes to the earlier submit
    no_aging = planner(ordering="priority").plan(snapshot([node("n", 1)], [old, task("hi", 1, priority=5)], now=1e6))
    assert order_of(no_aging) == ["hi"]


def test_fair_weights_in_one_pass() -> None:
    """9 GPUs, tenant a weight 2, b weight 1: a gets 6, b gets 3."""
    tasks = [task(f"{t}{i}", 1, tenant=t) for i in range(10) for t in "ab"]
    result = planner(ordering="fair", tenants={"a": {"weight": 2}, "b": {"weight": 1}}).plan(
        snapshot([node("n", 9)], tasks))
    got = [p.task_id[0] for p in result.placements]
    assert got.count("a") == 6 and got.count("b") == 3


def test_fair_converges_toward_weights_over_passes() -> None:
    """b starts with all 12 GPUs; as tasks end, freed GPUs go to a until a:b is 2:1."""
    rng = random.Random(7)
    config = {"ordering": "fair", "tenants": {"a": {"weight": 2}, "b": {"weight": 1}}}
    run = [running(f"b-run{i}", "n", (i,), tenant="b") for i in range(12)]
    counter = 0
    shares = []
    for now in range(40):
        pending = [task(f"{t}-new{now}-{i}", 1, tenant=t, at=float(now)) for t in "ab" for i in range(3)]
        done = rng.choice(run)
        run.remove(done)
        result = planner(**config).plan(snapshot([node("n", 12)], pending, run, now=float(now)))
        for p in result.placements:
            counter += 1
            run.append(running(p.task_id, "n", p.gpu_indices, tenant=p.task_id[0]))
        shares.append(sum(r.tenant == "a" for r in run))
    assert shares[-1] == 8 and all(s == 8 for s in shares[-10:])
    assert shares == sorted(shares)  # a's share only grows toward its weight


def test_fair_guarantee_first() -> None:
    """a is within its guarantee, so it goes first although its dominant share is larger."""
    run = [running("a-run", "n", (0, 1), tenant="a")]
    tasks = [task("b1", 1, tenant="b"), task("a1", 1, tenant="a")]
    result = planner(ordering="fair", tenants={"a": {"guarantee": {"gpus": 4}}}).plan(
        snapshot([node("n", 3)], tasks, run))
    assert order_of(result) == ["a1"]


def test_fair_priority_within_a_tenant() -> None:
    tasks = [task("a-low", 1, tenant="a"), task("a-high", 1, tenant="a", priority=5)]
    assert order_of(planner(ordering="fair").plan(snapshot([node("n", 1)], tasks))) == ["a-high"]


def test_fair_shortest_first_within_a_tenant() -> None:
    """within_tenant = "sjf": each tenant's shortest task goes first, and the tenants still
    take turns by dominant share (a's long task waits for its short ones, not for b)."""
    tasks = [task("a-long", 1, tenant="a", est=600), task("a-short", 1, tenant="a", est=5),
             task("a-mid", 1, tenant="a", est=60, priority=3), task("b-long", 1, tenant="b", est=900)]
    fair_sjf = planner(ordering="fair", within_tenant="sjf").plan(snapshot([node("n", 3)], tasks))
    assert order_of(fair_sjf) == ["a-short", "b-long", "a-mid"]
    by_priority = planner(ordering="fair").plan(snapshot([node("n", 3)], tasks))
    assert order_of(by_priority) == ["a-mid", "b-long", "a-long"]


QUOTA_TABLE = [
    pytest.param({"a": {"guarantee": {"gpus": 2}, "borrowing_limit": {"gpus": 0}}},
                 [running("r", "n", (0, 1), tenant="a")], [task("t", 1, tenant="a")],
                 "tenant a over quota (gpus 2 of 2 guaranteed, borrowing limit 0; needs 1 more)",
                 id="borrowing limit"),
    pytest.param({"a": {"guarantee": {"gpus": 2}, "borrowing_limit": {"gpus": 1}}},
                 [running("r", "n", (0, 1, 2), tenant="a")], [task("t", 1, tenant="a")],
                 "tenant a over quota (gpus 3 of 2 guaranteed, borrowing limit 1; needs 1 more)",
                 id="borrowing limit reached"),
    pytest.param({"b": {"guarantee": {"gpus": 6}, "lending_limit": {"gpus": 2}}}, [],
                 [task("t", 5, tenant="a")],
                 "tenant a over quota (gpus: 8 free, 4 kept for other tenants' guarantees; needs 5)",
                 id="capacity b does not lend"),
]


@pytest.mark.parametrize(("tenants", "run", "tasks", "reason"), QUOTA_TABLE)
def test_quota(tenants: dict[str, Any], run: list[RunningTask], tasks: list[TaskRequest], reason: str) -> None:
    result = planner(ordering="fair", tenants=tenants).plan(snapshot([node("n", 8)], tasks, run))
    assert result.placements == []
    assert result.waiting["t"].reason == reason


def test_a_full_pool_is_a_wait_for_capacity_not_quota() -> None:
    """No quotas: an 8-GPU task meeting 4 busy GPUs waits for them like any task that does not
    fit; under backfill it gets a hold, and 1-GPU tasks that would delay it do not start."""
    run = [running("r", "n", (0, 1, 2, 3), tenant="c", est=100)]
    tasks = [task("a8", 8, tenant="a", est=100)] + [task(f"b{i}", 1, tenant="b", est=1000) for i in range(4)]
    result = planner(ordering="fair", mode="backfill").plan(snapshot([node("n", 8)], tasks, run))
    assert order_of(result) == []
    assert result.waiting["a8"].reason == "needs 8 GPUs on one node; largest free block is 4"
    assert result.waiting["a8"].estimated_start == 100
    assert result.waiting["b0"].reason == "held for higher-ranked task a8 (backfill)"


def test_fair_response_ratio_within_a_tenant() -> None:
    """within_tenant = "hrrn": a's long task, waiting since 0, goes before its fresh short one."""
    tasks = [task("a-short", 1, tenant="a", est=60, at=1170), task("a-long", 1, tenant="a", est=600, at=0)]
    result = planner(ordering="fair", within_tenant="hrrn").plan(snapshot([node("n", 1)], tasks, now=1200))
    assert order_of(result) == ["a-long"]


def test_quota_lets_lendable_capacity_be_borrowed() -> None:
    tenants = {"b": {"guarantee": {"gpus": 6}, "lending_limit": {"gpus": 2}}}
    result = planner(ordering="fair", tenants=tenants).plan(snapshot([node("n", 8)], [task("t", 4, tenant="a")]))
    assert order_of(result) == ["t"]
