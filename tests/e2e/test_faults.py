"""Fault injection: real redis-server, dispatchers and workers that the tests kill and restart.

One test per scenario of docs/reliability.md, in its order:

1. a worker SIGKILLed mid-task            5. three racing dispatchers
2. the pool child SIGKILLed (OOM)         6. a long task; a message lost with the connection
3. dispatchers SIGKILLed 30+ times        7. a node restarted under the same id
4. Redis kill -9 and restart (AOF)        8. cancel of a pending, reserved and running task

"Exactly once" is read from the worker logs: Celery writes ``Task <name>[<id>] succeeded in``
once per execution, and ``workers.outcome.report`` writes ``task <id> <outcome> -> <STATE>`` only
when finish.lua accepted the outcome (the attempt still held the task). A consistent view of
several keys is read with the writers paused (SIGSTOP), since only the Lua scripts are atomic.
"""

from __future__ import annotations

import functools
import json
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import ClassVar, cast

import pytest
import redis
from kombu import Connection

from broker import Client, Resources, TaskState, TaskStatus
from broker.celery_conf import celery_settings
from broker.cycle import CycleReport
from broker.dispatcher import Dispatcher
from broker.errors import BrokerUnavailable, WaitTimeout
from broker.models import MILLI
from broker.settings import Settings
from broker.store.keys import PoolKeys
from broker.store.scripts import Scripts
from tests.invariants import assert_capacity_invariant, register_node
from tests.support import Processes, RedisServer, processes, wait_until

pytestmark = pytest.mark.e2e

TEST_TASKS = ("--tasks", "tests.tasks_for_tests")
FAST_LEASE = {"GPUBROKER_LEASE_S": "6", "GPUBROKER_HEARTBEAT_S": "0.5", "GPUBROKER_REAP_INTERVAL_S": "0.5"}
GPU_NODE = ("--gpus", "2", "--gpu-memory-mb", "16384", "--cpus", "4", "--memory-mb", "8192", "--slots", "2")
EXECUTED = re.compile(r"Task [\w.]+\[([0-9a-f-]{36})\] succeeded in")
FINISHED = re.compile(r"task ([0-9a-f-]{36}) (succeeded|failed|lost) -> ([A-Z]+)")
CONNECTION_LOST = "Connection to broker lost"
HEARTBEAT_FAILED = "heartbeat failed"
DISPATCHER_UP = "dispatcher on pool"
DROPPED = re.compile(r"dropping message (\S+) of task ([0-9a-f-]{36}): ([A-Z_]+)")


# ---- helpers ------------------------------------------------------------------------


def wait_nodes_up(client: Client, nodes: Iterable[str], timeout: float = 30) -> None:
    wanted = set(nodes)
    wait_until(lambda: wanted <= {n.id for n in client.nodes() if n.state == "up"}, timeout,
               what=f"nodes {sorted(wanted)} to be up")


def wait_state(client: Client, task_id: str, state: TaskState, timeout: float = 30) -> TaskStatus:
    status: TaskStatus = wait_until(lambda: (s := client.status(task_id)).state is state and s, timeout,
                                    what=f"task {task_id} to be {state}")
    return status


def wait_all(client: Client, task_ids: Iterable[str], timeout: float, procs: Processes,
             nodes: Iterable[str]) -> list[TaskStatus]:
    """Each task's final status; when one is not final in time, fail with what Redis and the
    processes say of it (a rare hang after a Redis restart needs this to be diagnosed)."""
    deadline = time.monotonic() + timeout
    ids = list(task_ids)
    try:
        return [client.wait(task_id, max(0.1, deadline - time.monotonic())) for task_id in ids]
    except WaitTimeout:
        keys = client.keys
        stuck = [t for t in ids if not client.status(t).state.is_final]
        lines = [f"not final after {timeout}s: {stuck}"]
        for task_id in stuck[:3]:
            record = {k.decode(): v.decode(errors="replace")[:200]
                      for k, v in cast(dict[bytes, bytes], client.redis.hgetall(keys.task(task_id))).items()}
            lines.append(f"{task_id}: record {record}; pending score {client.redis.zscore(keys.pending, task_id)}")
        lines.append(f"nodes: {[(n.id, n.state, n.free_cpus, n.free_slots, n.tasks) for n in client.nodes()]}")
        lines.append(f"queue: {[(e.id, e.reason) for e in client.queue()][:5]}")
        lines.append("dispatcher log tail:\n" + procs.log("dispatcher")[-3000:])
        for node in nodes:
            lines.append(f"worker-{node} log tail:\n" + procs.log(f"worker-{node}")[-3000:])
        raise AssertionError("\n".join(lines)) from None


def worker_logs(procs: Processes, nodes: Iterable[str]) -> str:
    return "".join(procs.log(f"worker-{node}") for node in nodes)


def executions(procs: Processes, nodes: Iterable[str]) -> Counter[str]:
    """How many times each task's code ran to completion, per Celery's own log line."""
    return Counter(EXECUTED.findall(worker_logs(procs, nodes)))


def finishes(procs: Processes, nodes: Iterable[str]) -> Counter[str]:
    """How many outcomes finish.lua accepted per task (a stale attempt's report changes nothing)."""
    return Counter(task_id for task_id, _, _ in FINISHED.findall(worker_logs(procs, nodes)))


def node_keys_left(r: redis.Redis, keys: PoolKeys, node: str) -> list[str]:
    """The node's kombu queue (every priority bucket) and unacked bookkeeping that still exist."""
    names = [keys.queue(node) + suffix for suffix in ("", "\x06\x163", "\x06\x166", "\x06\x169")]
    names += [keys.unacked(node), keys.unacked_index(node), keys.node_tasks(node)]
    return [name for name in names if r.exists(name)]


def has_started(procs: Processes, dispatcher: str) -> bool:
    return DISPATCHER_UP in procs.log(dispatcher)


def assert_node_free(client: Client, node_id: str) -> None:
    (node,) = [n for n in client.nodes() if n.id == node_id]
    assert node.tasks == 0, node
    assert (node.free_cpus, node.free_memory_mb, node.free_slots) == (node.cpus, node.memory_mb, node.slots)
    assert all(g.free_milli == MILLI and g.free_memory_mb == g.memory_mb for g in node.gpus), node.gpus


def queued_messages(r: redis.Redis, keys: PoolKeys, nodes: Iterable[str]) -> list[tuple[str, str, str, str]]:
    """(node, where, task id, delivery tag) of every message on a node queue or in its unacked hash,
    read in one MULTI so the view is consistent."""
    nodes = list(nodes)
    pipe = r.pipeline(transaction=True)
    for node in nodes:
        pipe.lrange(keys.queue(node), 0, -1)
        pipe.hvals(keys.unacked(node))
    replies = pipe.execute()
    out = []
    for i, node in enumerate(nodes):
        for raw in replies[2 * i]:
            message = json.loads(raw)
            out.append((node, "queue", message["headers"]["id"], message["properties"]["delivery_tag"]))
        for raw in replies[2 * i + 1]:
            message = json.loads(raw)[0]  # kombu stores [message, exchange, routing key]
            out.append((node, "unacked", message["headers"]["id"], message["properties"]["delivery_tag"]))
    return out


def assert_no_duplicate_messages(r: redis.Redis, keys: PoolKeys, nodes: Iterable[str]) -> int:
    """No task has two messages anywhere on the node queues, and a queued message is its task's
    current reservation (a message never exists without one). Returns how many were seen."""
    messages = queued_messages(r, keys, nodes)
    per_task = Counter(task_id for _, _, task_id, _ in messages)
    assert not [t for t, n in per_task.items() if n > 1], [m for m in messages if per_task[m[2]] > 1]
    for node, where, task_id, tag in messages:
        task = {k.decode(): v.decode() for k, v in r.hgetall(keys.task(task_id)).items()}
        assert (task.get("node"), task.get("tag")) == (node, tag), (where, tag, task.get("state"))
        if where == "queue":
            assert task["state"] == "RESERVED", (node, tag, task["state"])
    return len(messages)


class Feeder(threading.Thread):
    """Submits probes from its own client until stopped (or ``count`` of them), and records
    which submits were acknowledged and which were refused (with how long the refusal took).
    With ``backlog``, it waits while that many tasks are pending: the run lasts as long as the
    test needs, whatever the machine's speed, without piling up work."""

    started: ClassVar[list[Feeder]] = []  # halted after each test (_halt_feeders), passed or not

    def __init__(self, settings: Settings, shapes: list[Resources], kwargs: dict[str, float] | None = None,
                 count: int | None = None, interval_s: float = 0.0, backlog: int | None = None) -> None:
        super().__init__(name="feeder", daemon=True)
        self.settings, self.shapes, self.kwargs = settings, shapes, kwargs or {}
        self.count, self.interval_s, self.backlog = count, interval_s, backlog
        self.halt = threading.Event()
        self.acknowledged: list[str] = []
        self.refused: list[tuple[float, str]] = []
        Feeder.started.append(self)

    def run(self) -> None:
        with Client(settings=self.settings) as client:
            i = 0
            while (self.count is None or i < self.count) and not self.halt.wait(self.interval_s):
                if self.backlog is not None and client.redis.zcard(client.keys.pending) >= self.backlog:
                    self.halt.wait(0.05)
                    continue
                t0 = time.monotonic()
                try:
                    self.acknowledged.append(client.submit("workers.tasks.probe", kwargs=self.kwargs,
                                                           resources=self.shapes[i % len(self.shapes)]).id)
                    i += 1
                except BrokerUnavailable as exc:
                    self.refused.append((time.monotonic() - t0, str(exc)))

    def stop(self) -> None:
        self.halt.set()
        self.join(30)


@pytest.fixture(autouse=True)
def _halt_feeders() -> Iterator[None]:
    """A test that fails leaves no Feeder submitting into the pool the next tests use."""
    yield
    while Feeder.started:
        Feeder.started.pop().halt.set()


# ---- 1. worker killed ---------------------------------------------------------------


def test_worker_killed_mid_task_requeues_after_the_lease_and_finishes_elsewhere(
        procs: Processes, settings: Settings, redis_client: redis.Redis) -> None:
    keys = PoolKeys(settings.pool)
    with Client(settings=settings) as client:
        procs.dispatcher()
        victim = procs.worker("node-a", *GPU_NODE, *TEST_TASKS)
        wait_nodes_up(client, ["node-a"])
        long_first = {"upto": 1, "seconds": 120}
        retried = client.submit("tests.slow_on_attempts", kwargs=long_first, resources=Resources(gpus=1),
                                max_retries=1).id
        doomed = client.submit("tests.slow_on_attempts", kwargs=long_first, resources=Resources(gpus=1),
                               max_retries=0).id
        for task_id in (retried, doomed):
            assert wait_state(client, task_id, TaskState.RUNNING).node == "node-a"
        procs.worker("node-b", *GPU_NODE, *TEST_TASKS)
        wait_nodes_up(client, ["node-b"])
        assert not redis_client.hlen(keys.unacked("node-a")), "the worker holds both messages, copies none"

        procs.kill(victim)  # the worker and its pool children, mid-task
        killed_at = time.time()

        moved = client.wait(retried, 30)
        assert moved.state is TaskState.SUCCEEDED, moved
        assert (moved.node, moved.attempts, moved.result["attempt"]) == ("node-b", 2, 2)
        assert moved.reserved_at and moved.reserved_at >= killed_at + settings.lease_s - 1, "only after the lease"
        failed = client.wait(doomed, 10)
        assert failed.state is TaskState.FAILED
        assert failed.error == "node node-a lease expired (retry limit reached)"
        assert failed.result is None

        (node_a,) = [n for n in client.nodes() if n.id == "node-a"]
        assert node_a.state == "down"
        assert node_keys_left(redis_client, keys, "node-a") == [], "its stale queue and unacked messages are gone"
        assert_capacity_invariant(redis_client, keys)
        assert_node_free(client, "node-a")
        assert_node_free(client, "node-b")
        assert executions(procs, ["node-a", "node-b"]) == Counter({retried: 1})


# ---- 2. pool child killed -----------------------------------------------------------


def test_pool_child_killed_is_retried_or_failed_and_the_worker_keeps_serving(
        procs: Processes, settings: Settings, redis_client: redis.Redis) -> None:
    keys = PoolKeys(settings.pool)
    with Client(settings=settings) as client:
        procs.dispatcher()
        worker = procs.worker("node-a", *GPU_NODE, *TEST_TASKS)
        wait_nodes_up(client, ["node-a"])
        incarnation = redis_client.hget(keys.node("node-a"), "incarnation")

        once = client.submit("tests.killed_on_attempts", kwargs={"upto": 1}, resources=Resources(gpus=1),
                             max_retries=2).id
        always = client.submit("tests.killed_on_attempts", kwargs={"upto": 99}, resources=Resources(gpus=1),
                               max_retries=1).id

        recovered = client.wait(once, 30)
        assert recovered.state is TaskState.SUCCEEDED, recovered
        assert (recovered.attempts, recovered.result["attempt"], recovered.node) == (2, 2, "node-a")
        failed = client.wait(always, 30)
        assert failed.state is TaskState.FAILED and failed.attempts == 2
        assert failed.error and failed.error.startswith("WorkerLostError: "), failed.error
        assert failed.error.endswith("(retry limit reached)"), failed.error

        assert worker.poll() is None, "the worker itself survived"
        assert redis_client.hget(keys.node("node-a"), "incarnation") == incarnation, "and never re-registered"
        after = client.wait(client.submit("workers.tasks.probe", resources=Resources(gpus=2)).id, 30)
        assert (after.state, after.node) == (TaskState.SUCCEEDED, "node-a")
        assert_capacity_invariant(redis_client, keys)
        assert_node_free(client, "node-a")


# ---- 3. dispatchers killed ----------------------------------------------------------

CHURN_NODES = {f"churn-{i}": ("--gpus", "1", "--gpu-memory-mb", "4096", "--cpus", "4", "--memory-mb", "4096",
                              "--slots", "4") for i in range(3)}
CHURN_TASKS = 2000  # at least; more if the 30 kills take longer than these on a fast machine
CHURN_KILLS = 30
CHURN_BACKLOG = 100


def test_dispatchers_killed_at_random_moments_lose_and_duplicate_nothing(
        procs: Processes, settings: Settings, redis_client: redis.Redis) -> None:
    keys = PoolKeys(settings.pool)
    rng = random.Random(3)
    feeder = Feeder(settings, [Resources(cpus=1, memory_mb=512), Resources(gpus=0.25)], backlog=CHURN_BACKLOG)
    with Client(settings=settings) as client:
        workers = [procs.worker(node, *args) for node, args in CHURN_NODES.items()]
        wait_nodes_up(client, CHURN_NODES)
        feeder.start()
        # Two dispatchers in turn: once the younger one is up, the older one is SIGKILLed at a
        # random moment of its cycles, the state is checked, and a replacement is started.
        dispatchers = [procs.dispatcher(f"dispatcher-{n}") for n in range(2)]
        kills, checked_messages, started = 0, 0, len(dispatchers)
        while kills < CHURN_KILLS or len(feeder.acknowledged) < CHURN_TASKS:
            wait_until(functools.partial(has_started, procs, f"dispatcher-{started - 1}"), 30,
                       what="the younger dispatcher to start")
            time.sleep(rng.uniform(0.0, 0.8))
            procs.kill(dispatchers.pop(0))
            kills += 1
            with procs.paused(*workers, *dispatchers):
                assert_capacity_invariant(redis_client, keys)
                checked_messages += assert_no_duplicate_messages(redis_client, keys, CHURN_NODES)
            dispatchers.append(procs.dispatcher(f"dispatcher-{started}"))
            started += 1
        feeder.stop()
        submitted = feeder.acknowledged

        def all_final() -> bool:
            return not redis_client.zcard(keys.pending) and not any(
                redis_client.scard(keys.node_tasks(node)) for node in CHURN_NODES)

        wait_until(all_final, 300, interval=0.5, what="every task to end")
        assert kills >= CHURN_KILLS and checked_messages > 0 and len(submitted) >= CHURN_TASKS
        pipe = redis_client.pipeline(transaction=False)
        for task_id in submitted:
            pipe.hmget(keys.task(task_id), "state", "attempts")
        states = Counter((s.decode(), int(a)) for s, a in pipe.execute())
        assert states == Counter({("SUCCEEDED", 1): len(submitted)}), states
        ran, ended = executions(procs, CHURN_NODES), finishes(procs, CHURN_NODES)
        assert set(ran) == set(submitted) and set(ran.values()) == {1}, "every task ran exactly once"
        assert set(ended) == set(submitted) and set(ended.values()) == {1}, "and ended exactly once"
        assert not DROPPED.findall(worker_logs(procs, CHURN_NODES)), "no duplicate message was ever delivered"
        assert_capacity_invariant(redis_client, keys)
        for node in CHURN_NODES:
            assert_node_free(client, node)


# ---- 4. Redis killed and restarted --------------------------------------------------


@pytest.fixture
def aof_redis(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of its own with the append-only file on, ``appendfsync`` as parametrized."""
    server = RedisServer(tmp_path / "redis", "--appendonly", "yes", "--appendfsync", request.param)
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize("aof_redis", ["always", "everysec"], indirect=True)
def test_redis_kill_9_and_restart_keeps_every_acknowledged_submit(
        aof_redis: RedisServer, tmp_path: Path, settings: Settings) -> None:
    own = Settings(**{**settings.model_dump(), "redis_url": aof_redis.url})
    feeder = Feeder(own, [Resources(cpus=1)], kwargs={"seconds": 0.1}, interval_s=0.15)
    with processes(tmp_path, own.redis_url, own.pool, FAST_LEASE) as procs, Client(settings=own) as client:
        dispatcher = procs.dispatcher()
        worker = procs.worker("node-a", "--cpus", "8", "--slots", "4")
        wait_nodes_up(client, ["node-a"])
        feeder.start()
        wait_until(lambda: len(executions(procs, ["node-a"])) >= 3, 30, what="the worker to run tasks")
        across = client.submit("workers.tasks.probe", kwargs={"seconds": 1.0}, resources=Resources(cpus=1),
                               priority=10).id
        wait_state(client, across, TaskState.RUNNING)
        aof_redis.kill()
        before_kill = len(feeder.acknowledged)

        t0 = time.monotonic()
        with pytest.raises(BrokerUnavailable, match="Redis is unreachable"):
            client.status(across)
        assert time.monotonic() - t0 < 3.0, "a call during the outage fails fast instead of hanging"
        # The outage lasts until every process noticed it, the running task's pool child included.
        noticed = (CONNECTION_LOST, HEARTBEAT_FAILED, f"reporting task {across} succeeded: Redis unavailable")
        wait_until(lambda: feeder.refused and "Redis unavailable" in procs.log("dispatcher")
                   and all(line in procs.log("worker-node-a") for line in noticed), 20,
                   what="every process to notice the outage")

        aof_redis.start()  # same port and directory: it replays its append-only file
        wait_until(lambda: len(feeder.acknowledged) > before_kill + 5, 30, what="submits to be accepted again")
        feeder.stop()

        assert all(seconds < 3.0 for seconds, _ in feeder.refused), feeder.refused
        assert dispatcher.poll() is None and worker.poll() is None, "nobody was restarted"
        done = wait_all(client, feeder.acknowledged, 120, procs, ["node-a"])
        assert Counter(s.state for s in done) == Counter({TaskState.SUCCEEDED: len(done)}), \
            [(s.id, s.state, s.error, (s.exception or {}).get("traceback")) for s in done
             if s.state is not TaskState.SUCCEEDED]
        assert client.wait(across, 10).attempts == 1, "its outcome was recorded once Redis was back"
        assert executions(procs, ["node-a"])[across] == 1
        wait_nodes_up(client, ["node-a"], 10)
        with redis.Redis.from_url(own.redis_url) as r:
            assert_capacity_invariant(r, PoolKeys(own.pool))
        assert_node_free(client, "node-a")


def test_after_a_redis_restart_the_dispatcher_reads_every_node_again(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A restarted Redis that lost its last writes can take new ones that bring a node's change
    sequence back to where the dispatcher's cache stood, with the node now free. Only the
    outage tells the dispatcher its cache may be wrong; trusting it, it would wait for ever
    for a change it believes it has already read."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    settings = Settings(redis_url=server.url, pool="restart", reap_interval_s=0.2)
    keys = PoolKeys(settings.pool)
    stop, gate = threading.Event(), threading.Event()
    dispatcher = Dispatcher(settings)
    real_cycle = dispatcher.run_cycle

    def gated_cycle() -> CycleReport:  # lets the test set Redis up while the dispatcher waits
        gate.wait()
        return real_cycle()

    dispatcher.run_cycle = gated_cycle  # type: ignore[method-assign]
    thread = threading.Thread(target=dispatcher.run_forever, args=(stop,), daemon=True)
    try:
        register_node(Scripts(redis.Redis.from_url(server.url), keys), "n", cpus=1, slots=1, lease_ms=3_600_000)
        gate.set()
        thread.start()
        with Client(settings=settings) as client:
            first = client.submit("workers.tasks.probe", resources=Resources(cpus=1)).id
            wait_state(client, first, TaskState.RESERVED, 10)  # the node is full, and the cache says so
            seen = int(cast(float, redis.Redis.from_url(server.url).zscore(keys.changes, "n")))
            wait_until(lambda: dispatcher._view.seen >= seen, 10, what="a cycle to read the full node")
            gate.clear()
            server.kill()
            wait_until(lambda: "Redis unavailable" in caplog.text, 20, what="the dispatcher to meet the outage")
            server.start()  # no persistence: everything was lost
            fresh = redis.Redis.from_url(server.url)
            fresh.zadd(keys.changes, {"other": seen - 1})  # new writes since the restart got this far
            register_node(Scripts(fresh, keys), "n", cpus=1, slots=1, lease_ms=3_600_000)  # n is free again
            assert int(cast(float, fresh.zscore(keys.changes, "n"))) == seen  # and scored as the cache saw it
            second = client.submit("workers.tasks.probe", resources=Resources(cpus=1)).id
            gate.set()
            wait_state(client, second, TaskState.RESERVED, 10)
    finally:
        gate.set()
        stop.set()
        if thread.is_alive():
            thread.join(10)
        server.stop()


# ---- 5. racing dispatchers ----------------------------------------------------------

RACE_NODES = {
    "race-a": ("--gpus", "4", "--gpu-memory-mb", "40960", "--cpus", "16", "--memory-mb", "65536", "--slots", "6"),
    "race-b": ("--gpus", "2", "--gpu-memory-mb", "81920", "--cpus", "8", "--memory-mb", "32768", "--slots", "4"),
}
RACE_SHAPES = [Resources(gpus=1), Resources(gpus=2), Resources(gpus=0.5), Resources(gpus=0.25, gpu_memory_mb=20000),
               Resources(gpus=4), Resources(cpus=2, memory_mb=4096)]


def test_three_racing_dispatchers_never_over_commit_a_node_or_a_gpu(
        procs: Processes, settings: Settings, redis_client: redis.Redis) -> None:
    keys = PoolKeys(settings.pool)
    rng = random.Random(5)
    with Client(settings=settings) as client:
        workers = [procs.worker(node, *args) for node, args in RACE_NODES.items()]
        wait_nodes_up(client, RACE_NODES)
        ids = [client.submit("workers.tasks.probe", kwargs={"seconds": rng.uniform(0.05, 0.3)},
                             resources=RACE_SHAPES[i % len(RACE_SHAPES)]).id for i in range(150)]
        dispatchers = [procs.dispatcher(f"dispatcher-{n}") for n in range(3)]

        def pending() -> int:
            return int(redis_client.zcard(keys.pending))

        while pending() or any(redis_client.scard(keys.node_tasks(n)) for n in RACE_NODES):
            for node in RACE_NODES:  # one HGETALL is atomic: nothing free is ever negative
                free = {k: int(v) for k, v in redis_client.hgetall(keys.node(node)).items()
                        if k.startswith((b"free_", b"g"))}
                assert min(free.values()) >= 0, (node, free)
            with procs.paused(*workers, *dispatchers):
                assert_capacity_invariant(redis_client, keys)
            time.sleep(0.2)

        done = [client.wait(task_id, 60) for task_id in ids]
        assert [s.state for s in done] == [TaskState.SUCCEEDED] * len(ids), [(s.state, s.error) for s in done]
        by_gpu: dict[tuple[str, int], list[TaskStatus]] = {}
        for s in done:
            assert s.result["cuda_visible_devices"] == ",".join(map(str, s.gpus))
            for g in s.gpus:
                by_gpu.setdefault((s.node or "", g), []).append(s)
        for (node, gpu), holders in by_gpu.items():
            for s in holders:  # at every reservation instant, what the GPU's holders take fits in it
                held = [o for o in holders if o.reserved_at <= s.reserved_at < (o.finished_at or 0)]
                share = sum(o.resources.gpu_milli or MILLI for o in held)
                assert share <= MILLI, (node, gpu, [(o.id, o.resources.gpus) for o in held])
        for node in RACE_NODES:
            assert_node_free(client, node)
        logs = "".join(procs.log(f"dispatcher-{n}") for n in range(3))
        placed = sum(int(n) for n in re.findall(r"placed (\d+)", logs))
        passed = int(redis_client.hget(keys.outcomes, "handoff|default") or 0)  # finish.lua's (handoff auto)
        assert placed + passed == len(ids), "each task was reserved exactly once, whichever dispatcher won"
        assert "NOT_PENDING" in logs, "the dispatchers did race for the same tasks"
        assert executions(procs, RACE_NODES) == Counter(set(ids))


# ---- 6. longer than the visibility timeout; a message lost with the connection -------


def test_a_long_task_is_never_redelivered_and_a_message_lost_with_the_connection_is_queued_again(
        procs: Processes, settings: Settings, redis_client: redis.Redis) -> None:
    keys = PoolKeys(settings.pool)
    visibility_s = 1
    with Client(settings=settings) as client:
        procs.dispatcher()
        worker = procs.spawn("worker-node-a", "worker", "--node", "node-a", *GPU_NODE, "--slots", "3",
                             env={"GPUBROKER_VISIBILITY_TIMEOUT_S": str(visibility_s)})
        wait_nodes_up(client, ["node-a"])

        long = client.submit("workers.tasks.probe", kwargs={"seconds": 4}, resources=Resources(gpus=1)).id
        running = wait_state(client, long, TaskState.RUNNING)
        time.sleep(visibility_s + 0.5)  # the task outlives the timeout: that is the point
        # kombu's own redelivery sweeps copies of taken messages whose visibility timeout passed
        # (at start-up, periodically, and any consumer with a shorter timeout): the worker keeps
        # none (workers.rejects.NodeQoS), so there is nothing to put back.
        options = {**celery_settings(settings)["broker_transport_options"], "visibility_timeout": visibility_s,
                   "unacked_key": keys.unacked("node-a"), "unacked_index_key": keys.unacked_index("node-a"),
                   "unacked_mutex_key": keys.unacked_mutex("node-a")}
        with Connection(settings.redis_url, transport_options=options) as conn:
            conn.default_channel.qos.restore_visible(num=100)
        assert node_keys_left(redis_client, keys, "node-a") == [keys.node_tasks("node-a")], "no copy, none queued"

        # A message taken by a connection that is then lost: the worker, stopped, has a BRPOP
        # outstanding that takes it (or, had that just timed out, the test pops it), and Redis
        # drops every client before the worker reads the reply. It is in no queue and the
        # worker does not hold it; its task is RESERVED on a live node. At reconnect the worker
        # queues it again from the task's record (workers.redeliver).
        with procs.paused(worker):
            lost = client.submit("workers.tasks.probe", kwargs={"seconds": 0.1}, resources=Resources(gpus=1)).id
            wait_state(client, lost, TaskState.RESERVED)
            time.sleep(0.3)
            redis_client.rpop(keys.queue("node-a"))  # None when the stopped worker's BRPOP took it
            assert not redis_client.llen(keys.queue("node-a")) and not redis_client.hlen(keys.unacked("node-a"))
            redis_client.client_kill_filter(_type="normal", skipme=True)
        done = client.wait(lost, 30)
        assert (done.state, done.attempts) == (TaskState.SUCCEEDED, 1)
        assert "queued again the message of 1 reserved task" in procs.log("worker-node-a")

        finished = client.wait(long, 30)
        assert finished.state is TaskState.SUCCEEDED and finished.attempts == 1
        assert finished.started_at == running.started_at
        assert not DROPPED.findall(procs.log("worker-node-a")), "no message was delivered twice"
        assert executions(procs, ["node-a"]) == Counter([long, lost]), "each one's code ran once"
        assert finishes(procs, ["node-a"]) == Counter([long, lost])
        assert_capacity_invariant(redis_client, keys)
        assert_node_free(client, "node-a")


# ---- 7. node restarted under the same id --------------------------------------------


def test_node_restarted_under_the_same_id_reclaims_its_previous_incarnation(
        procs: Processes, settings: Settings, redis_client: redis.Redis) -> None:
    keys = PoolKeys(settings.pool)
    with Client(settings=settings) as client:
        procs.dispatcher()
        first = procs.worker("node-a", *GPU_NODE, *TEST_TASKS)
        wait_nodes_up(client, ["node-a"])
        old = redis_client.hget(keys.node("node-a"), "incarnation")
        task_id = client.submit("tests.slow_on_attempts", kwargs={"upto": 1, "seconds": 120},
                                resources=Resources(gpus=2)).id
        wait_state(client, task_id, TaskState.RUNNING)

        procs.kill(first)
        procs.worker("node-a", *GPU_NODE, *TEST_TASKS)  # well inside the old lease
        wait_until(lambda: redis_client.hget(keys.node("node-a"), "incarnation") != old, 30,
                   what="the new incarnation to register")
        done = client.wait(task_id, 30)
        assert (done.state, done.node, done.attempts, done.result["attempt"]) == (TaskState.SUCCEEDED, "node-a", 2, 2)
        assert "reclaimed 1 tasks of its previous incarnation" in procs.log("worker-node-a")
        assert [n.id for n in client.nodes()] == ["node-a"]
        (node,) = client.nodes()
        assert (len(node.gpus), node.slots, node.cpus) == (2, 2, 4), "capacity counted once"
        assert_capacity_invariant(redis_client, keys)
        assert_node_free(client, "node-a")

        # A previous incarnation that is still alive (hung, then back) is fenced off: it stops
        # its task at once and exits, and its late report changes nothing.
        zombie_id = client.submit("tests.slow_on_attempts", kwargs={"upto": 1, "seconds": 120},
                                  resources=Resources(gpus=2)).id
        wait_state(client, zombie_id, TaskState.RUNNING)
        zombie = procs.procs[-1]
        with procs.paused(zombie):
            procs.worker("node-a", *GPU_NODE, *TEST_TASKS)
            wait_until(lambda: client.status(zombie_id).attempts == 2, 30, what="the task to be reclaimed")
        zombie.wait(15)
        done = client.wait(zombie_id, 30)
        assert (done.state, done.attempts, done.result["attempt"]) == (TaskState.SUCCEEDED, 2, 2)
        assert executions(procs, ["node-a"])[zombie_id] == 1, "the fenced attempt never completed"
        assert_capacity_invariant(redis_client, keys)
        assert_node_free(client, "node-a")


# ---- 8. cancel ----------------------------------------------------------------------


def test_cancel_of_pending_reserved_and_running_tasks(
        procs: Processes, settings: Settings, redis_client: redis.Redis) -> None:
    keys = PoolKeys(settings.pool)
    with Client(settings=settings) as client:
        procs.dispatcher()
        worker = procs.worker("node-a", *GPU_NODE)
        wait_nodes_up(client, ["node-a"])

        running = client.submit("workers.tasks.probe", kwargs={"seconds": 120}, resources=Resources(gpus=1)).id
        wait_state(client, running, TaskState.RUNNING)
        pending = client.submit("workers.tasks.probe", resources=Resources(gpus=2)).id  # waits for both GPUs
        time.sleep(0.3)
        assert client.status(pending).state is TaskState.PENDING
        assert client.cancel(pending).state is TaskState.CANCELLED

        with procs.paused(worker):  # the message waits on the queue: the task stays RESERVED
            reserved = client.submit("workers.tasks.probe", resources=Resources(gpus=1)).id
            wait_state(client, reserved, TaskState.RESERVED, 3)
            assert client.cancel(reserved).state is TaskState.CANCELLED

        # A running task keeps its GPU until its process is gone, then ends CANCELLED.
        assert client.cancel(running).state is TaskState.RUNNING
        cancelled = client.wait(running, 15)
        assert (cancelled.state, cancelled.result) == (TaskState.CANCELLED, None)
        assert f"task {running} cancelled: SIGTERM" in procs.log("worker-node-a"), "its worker stopped its process"
        assert_node_free(client, "node-a")

        finished = client.wait(client.submit("workers.tasks.probe", resources=Resources(gpus=2)).id, 30)
        assert finished.state is TaskState.SUCCEEDED, "the freed GPUs are usable at once"
        again = client.cancel(running)
        assert again.state is TaskState.CANCELLED and again.finished_at == cancelled.finished_at
        after = client.cancel(finished.id)
        assert (after.state, after.result) == (TaskState.SUCCEEDED, finished.result)
        assert {task_id: client.status(task_id).state for task_id in (pending, reserved, running)} == \
            dict.fromkeys((pending, reserved, running), TaskState.CANCELLED)
        assert executions(procs, ["node-a"]) == Counter({finished.id: 1}), "no cancelled task ran to the end"
        assert worker.poll() is None
        assert_capacity_invariant(redis_client, keys)
        assert_node_free(client, "node-a")
