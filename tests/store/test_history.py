"""History and usage (broker/store/history.py, Client.tasks/usage) against a real Redis: a known
workload driven through the scripts with a controlled clock, so runtimes and waits are exact."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redis

from broker import Client
from broker.errors import InvalidRequest
from broker.models import Resources, TaskState
from broker.settings import Settings
from broker.store import history
from broker.store.keys import PoolKeys
from broker.store.scripts import Scripts
from tests.conftest import Clock
from tests.invariants import place, register_node, submit_raw, submit_task

T0 = 1_700_000_000_000
DAY_MS = 86_400_000


@dataclass
class Workload:
    ids: dict[str, str]
    finished_at: dict[str, int]  # ms


@pytest.fixture
def workload(scripts: Scripts, clock: Clock) -> Workload:
    """On two nodes and two tenants: a succeeds after 1 h on 1 GPU (n1), b fails after 30 min on 2
    GPUs (n2), c succeeds after 12 min on half a GPU (n1), d is cancelled while pending, e runs
    (n1), f waits. Waits before starting: a 10 s, b 20 s, c 30 s."""
    register_node(scripts, "n1", gpus=2, gpu_mem=40_000, cpus=8, slots=4, lease_ms=DAY_MS)
    register_node(scripts, "n2", gpus=2, gpu_mem=40_000, cpus=8, slots=4, lease_ms=DAY_MS)
    start = clock()
    ids = {
        "a": submit_task(scripts, resources=Resources(gpus=1, cpus=2), tenant="alpha", name="train"),
        "b": submit_task(scripts, resources=Resources(gpus=2, cpus=4), tenant="beta", name="train"),
        "c": submit_task(scripts, resources=Resources(gpus=0.5, cpus=1), tenant="alpha", name="infer"),
        "d": submit_task(scripts, resources=Resources(gpus=1), tenant="beta", name="infer"),
        "e": submit_task(scripts, resources=Resources(cpus=1), tenant="alpha", name="infer"),
        "f": submit_task(scripts, resources=Resources(gpus=1), tenant="beta", name="train"),
    }
    tags = {}
    for name, node, gpus, at in (("a", "n1", (0,), 10), ("b", "n2", (0, 1), 20), ("c", "n1", (1,), 30)):
        clock.now_ms = start + at * 1000
        tags[name] = place(scripts, ids[name], node, *gpus, start=True)
    scripts.cancel(ids["d"], None)
    finished = {"d": clock()}
    for name, node, at, outcome in (("c", "n1", 750, "succeeded"), ("b", "n2", 1820, "failed"),
                                    ("a", "n1", 3610, "succeeded")):
        clock.now_ms = start + at * 1000
        scripts.finish(ids[name], node, tags[name], outcome, "null" if outcome == "succeeded" else "boom")
        finished[name] = clock()
    place(scripts, ids["e"], "n1", start=True)
    return Workload(ids, finished)


@pytest.fixture
def client(settings: Settings, clock: Clock) -> Iterator[Client]:
    with Client(settings=settings, clock=clock) as c:
        yield c


def ids_of(w: Workload, rows: list[history.TaskRow]) -> list[str]:
    names = {v: k for k, v in w.ids.items()}
    return [names[r.id] for r in rows]


def test_conclude_indexes_every_final_task_by_finished_at(workload: Workload, redis_client: redis.Redis,
                                                          keys: PoolKeys) -> None:
    index = {m.decode(): int(s) for m, s in redis_client.zrange(keys.finished, 0, -1, withscores=True)}
    assert index == {workload.ids[n]: at for n, at in workload.finished_at.items()}


@pytest.mark.parametrize(("options", "expected"), [
    ({}, ["f", "e", "a", "b", "c", "d"]),  # pending, running, then final newest first
    ({"state": "pending"}, ["f"]),
    ({"state": "running"}, ["e"]),
    ({"state": "finished"}, ["a", "c"]),
    ({"state": "failed"}, ["b"]),
    ({"state": "cancelled"}, ["d"]),
    ({"state": ["failed", "cancelled"]}, ["b", "d"]),
    ({"tenant": "alpha"}, ["e", "a", "c"]),
    ({"tenant": "beta", "state": "failed"}, ["b"]),
    ({"node": "n1"}, ["e", "a", "c"]),
    ({"node": "n2"}, ["b"]),
    ({"since": "3000s"}, ["f", "e", "a", "b", "c"]),  # ended at 3610, 1820, 750 s; d at 30 s
    ({"since": "30m", "state": ["finished", "failed"]}, ["a", "b"]),
    ({"limit": 3}, ["f", "e", "a"]),
    ({"state": "finished", "limit": 1}, ["a"]),
])
def test_tasks_filters(workload: Workload, client: Client, options: dict[str, object], expected: list[str]) -> None:
    assert ids_of(workload, client.tasks(**options)) == expected  # type: ignore[arg-type]


def test_task_rows_carry_times_and_placement(workload: Workload, client: Client) -> None:
    rows = {r.id: r for r in client.tasks()}
    a, b, e = rows[workload.ids["a"]], rows[workload.ids["b"]], rows[workload.ids["e"]]
    assert (a.state, a.node, a.gpus, a.wait_s, a.run_s, a.finished_at) == (TaskState.SUCCEEDED, "n1", [0], 10, 3600,
                                                                           (T0 + 3_610_000) / 1000)
    assert (b.state, b.node, b.gpus, b.gpu_share, b.error) == (TaskState.FAILED, "n2", [0, 1], 2, "boom")
    assert (e.state, e.node, e.run_s, e.finished_at) == (TaskState.RUNNING, "n1", 0, None)


def test_usage_by_tenant_node_and_task(workload: Workload, client: Client) -> None:
    by_tenant = {u.key: u for u in client.usage(by="tenant")}
    alpha, beta = by_tenant["alpha"], by_tenant["beta"]
    assert (alpha.tasks, alpha.succeeded, alpha.failed, alpha.cancelled) == (2, 2, 0, 0)
    assert alpha.gpu_hours == pytest.approx(1 + 0.5 * 0.2)  # 1 GPU 1 h, half a GPU 12 min
    assert alpha.cpu_hours == pytest.approx(2 * 1 + 1 * 0.2)
    assert (alpha.wait_p50_s, alpha.wait_p95_s) == (10, 30)
    assert (beta.tasks, beta.succeeded, beta.failed, beta.cancelled) == (2, 0, 1, 1)
    assert beta.gpu_hours == pytest.approx(2 * 0.5) and beta.cpu_hours == pytest.approx(4 * 0.5)
    assert (beta.wait_p50_s, beta.wait_p95_s) == (20, 20)  # d never started: no wait
    by_node = {u.key: (u.tasks, round(u.gpu_hours, 6)) for u in client.usage(by="node")}
    assert by_node == {"n1": (2, 1.1), "n2": (1, 1.0), "-": (1, 0.0)}
    by_task = {u.key: (u.tasks, round(u.gpu_hours, 6)) for u in client.usage(by="task")}
    assert by_task == {"train": (2, 2.0), "infer": (2, 0.1)}
    recent = {u.key: u.tasks for u in client.usage(since="30m", by="tenant")}  # a and b ended in it
    assert recent == {"alpha": 1, "beta": 1}
    assert [u.key for u in client.usage(by="tenant")] == ["alpha", "beta"]  # most GPU-hours first


@pytest.mark.parametrize(("call", "field"), [
    (lambda c: c.tasks(state="done"), "state"),
    (lambda c: c.tasks(since="5x"), "since"),
    (lambda c: c.tasks(since=-1), "since"),
    (lambda c: c.tasks(limit=0), "limit"),
    (lambda c: c.usage(by="color"), "by"),
])
def test_bad_input_names_the_field(client: Client, call: object, field: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        call(client)  # type: ignore[operator]
    assert caught.value.fields == [field]


def test_index_entries_expire_with_the_records(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys,
                                               client: Client) -> None:
    register_node(scripts, "n1", gpus=1, gpu_mem=1000, cpus=8, slots=4)
    short, kept = (submit_raw(scripts, name, result_ttl_ms=ttl, tenant="t")[1]
                   for name, ttl in (("short-lived", 300), ("kept", 0)))
    for task_id in (short, kept):
        scripts.cancel(task_id, None)
    assert {r.id for r in client.tasks(state="cancelled")} == {short, kept}
    time.sleep(0.5)  # Redis expires the short record on its own clock
    assert not redis_client.exists(keys.task(short))
    assert [r.id for r in client.tasks(state="cancelled")] == [kept]  # skipped before the trim
    assert [u.tasks for u in client.usage()] == [1]
    assert history.trim_finished(redis_client, keys) == 1
    assert [m.decode() for m in redis_client.zrange(keys.finished, 0, -1)] == [kept]
    assert history.trim_finished(redis_client, keys) == 0


def test_parse_since() -> None:
    assert history.parse_since("90s", 1000) == 910
    assert history.parse_since("1.5h", 10_000) == 10_000 - 5400
    assert history.parse_since("2d", 200_000) == 200_000 - 172_800
    assert history.parse_since(60, 100) == 40
    assert history.parse_since(None, 100) is None
