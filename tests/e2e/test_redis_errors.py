"""Redis errors other than a lost connection: a full Redis, a replica, refused credentials, bad settings.

Real redis-server, dispatcher and worker processes. A full Redis is the session's own server
with ``maxmemory`` lowered below what a filler key takes (policy ``noeviction``, as shipped):
every write is refused with ``OOM`` until the filler is deleted. Its settings are restored
afterwards, since the tests after these share the server.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from broker import Client, GpuBrokerError, Resources, TaskState
from broker.dispatcher import Dispatcher
from broker.errors import BrokerUnavailable, RedisOutOfMemory, TaskNotFound
from broker.settings import Settings
from broker.store.connection import TRANSIENT_REPLIES
from broker.store.keys import PoolKeys
from broker.store.scripts import Scripts
from tests.e2e.test_faults import assert_node_free, executions, finishes, wait_nodes_up, wait_state
from tests.invariants import assert_capacity_invariant, register_node
from tests.support import GPUBROKER, ROOT, Processes, RedisServer, free_port, processes, wait_until

pytestmark = pytest.mark.e2e

FILLER = "filler-of-test-redis-errors"
FULL = "Redis is out of memory (maxmemory reached): nothing was written; retry later or raise maxmemory"
REFUSED = "Redis refused the credentials in the Redis URL"
ONE_GPU = ("--gpus", "1", "--gpu-memory-mb", "16384", "--cpus", "4", "--memory-mb", "8192", "--slots", "2")
# Heartbeats run while Redis is full (heartbeat.lua is allow-oom); the lease is still 10 s here so
# that a slow machine's report retries cannot outlast it.
LEASE = {"GPUBROKER_LEASE_S": "10", "GPUBROKER_HEARTBEAT_S": "0.5", "GPUBROKER_REAP_INTERVAL_S": "0.5"}


@contextmanager
def redis_full(r: redis.Redis) -> Iterator[Callable[[], None]]:
    """Redis refuses every write (OOM) until the ``free`` it yields is called; its maxmemory
    settings are put back on the way out."""
    saved = r.config_get("maxmemory", "maxmemory-policy")
    r.config_set("maxmemory-policy", "noeviction")
    before = int(r.info("memory")["used_memory"])
    r.setrange(FILLER, (32 << 20) - 1, b"\0")  # 32 MiB made by Redis (a 32 MiB SET would also grow our query buffer)
    # Half the filler's size of margin either way: full with it, room to work without it.
    r.config_set("maxmemory", before + (16 << 20))

    def free() -> None:
        r.delete(FILLER)

    try:
        yield free
    finally:
        r.delete(FILLER)
        r.config_set("maxmemory", saved["maxmemory"])
        r.config_set("maxmemory-policy", saved["maxmemory-policy"])


def everything(r: redis.Redis) -> dict[bytes, bytes | None]:
    """Every key with its value (DUMP): what a write would change."""
    return {key: r.dump(key) for key in r.scan_iter() if key != FILLER.encode()}  # type: ignore[misc]


def gpubroker(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GPUBROKER, *args], check=False, capture_output=True, text=True, cwd=ROOT,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def test_a_submit_to_a_full_redis_raises_out_of_memory_and_writes_nothing(redis_client: redis.Redis,
                                                                           settings: Settings) -> None:
    register_node(Scripts(redis_client, PoolKeys(settings.pool)), "n", cpus=8)
    with Client(settings=settings) as client:
        client.submit("workers.tasks.probe", resources=Resources(cpus=1))
        before = everything(redis_client)
        with redis_full(redis_client) as free:
            with pytest.raises(RedisOutOfMemory, match=re.escape(FULL)) as refused:
                client.submit("workers.tasks.probe", resources=Resources(cpus=1))
            assert isinstance(refused.value, GpuBrokerError) and isinstance(refused.value, BrokerUnavailable)
            assert everything(redis_client) == before, "a refused submit wrote nothing"
            free()
            again = client.submit("workers.tasks.probe", resources=Resources(cpus=1))
        assert client.status(again.id).state is TaskState.PENDING


def test_cli_submit_to_a_full_redis_prints_one_line(redis_client: redis.Redis, settings: Settings) -> None:
    register_node(Scripts(redis_client, PoolKeys(settings.pool)), "n", cpus=8)
    with redis_full(redis_client):
        done = gpubroker("submit", "workers.tasks.probe", "--cpus", "1", "--redis-url", settings.redis_url,
                         "--pool", settings.pool)
    assert done.returncode != 0
    assert done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"error: {FULL} (OOM "), done.stderr
    assert redis_client.zcard(PoolKeys(settings.pool).pending) == 0


def test_a_task_that_finishes_while_redis_is_full_is_recorded_once_memory_is_freed(
        tmp_path: Path, settings: Settings, redis_client: redis.Redis) -> None:
    """The worker retries the outcome report and the dispatcher its cycle; neither exits."""
    with processes(tmp_path, settings.redis_url, settings.pool, LEASE) as procs, Client(settings=settings) as client:
        dispatcher = procs.dispatcher()
        worker = procs.worker("node-a", *ONE_GPU)
        wait_nodes_up(client, ["node-a"])
        first = client.submit("workers.tasks.probe", kwargs={"seconds": 1.5}, resources=Resources(gpus=1)).id
        wait_state(client, first, TaskState.RUNNING)
        # Waits for the GPU: the dispatcher writes why (a full pass) every cycle meanwhile.
        second = client.submit("workers.tasks.probe", resources=Resources(gpus=1)).id
        with redis_full(redis_client) as free:
            wait_until(lambda: f"reporting task {first} succeeded: Redis unavailable ({FULL}" in
                       procs.log("worker-node-a") and f"Redis unavailable ({FULL}" in procs.log("dispatcher"),
                       20, what="the worker's report and the dispatcher's cycle to meet the full Redis")
            assert client.status(first).state is TaskState.RUNNING, "nothing could be recorded meanwhile"
            free()
            done = [client.wait(task_id, 30) for task_id in (first, second)]
            third = client.wait(client.submit("workers.tasks.probe", resources=Resources(gpus=1)).id, 30)
        assert [s.state for s in (*done, third)] == [TaskState.SUCCEEDED] * 3
        assert [s.attempts for s in (*done, third)] == [1, 1, 1]
        assert dispatcher.poll() is None and worker.poll() is None, "nobody exited or was restarted"
        ran, recorded = executions(procs, ["node-a"]), finishes(procs, ["node-a"])
        assert [(ran[t], recorded[t]) for t in (first, second, third.id)] == [(1, 1)] * 3
        with Processes.paused(dispatcher, worker):
            assert_capacity_invariant(redis_client, PoolKeys(settings.pool))
        assert_node_free(client, "node-a")


def test_a_full_redis_does_not_look_like_a_lost_node(tmp_path: Path, settings: Settings,
                                                     redis_client: redis.Redis) -> None:
    # Lease 4 s, margin 1 s: without renewals the attempt would stop itself after 3 s. Redis stays
    # full for 6 s while the task runs: heartbeat.lua runs anyway (allow-oom), so the lease
    # holds, the attempt runs on, and its outcome is recorded once memory is freed.
    short = {"GPUBROKER_LEASE_S": "4", "GPUBROKER_HEARTBEAT_S": "0.5", "GPUBROKER_REAP_INTERVAL_S": "0.5"}
    with processes(tmp_path, settings.redis_url, settings.pool, short) as procs, Client(settings=settings) as client:
        procs.dispatcher()
        procs.worker("node-a", *ONE_GPU)
        wait_nodes_up(client, ["node-a"])
        task_id = client.submit("workers.tasks.probe", kwargs={"seconds": 4}, resources=Resources(gpus=1)).id
        wait_state(client, task_id, TaskState.RUNNING)
        with redis_full(redis_client) as free:
            with pytest.raises(RedisOutOfMemory):
                client.submit("workers.tasks.probe", resources=Resources(cpus=1))
            time.sleep(6)
            assert [n.state for n in client.nodes()] == ["up"], "the node kept its lease"
            free()
        done = client.wait(task_id, 30)
        assert (done.state, done.attempts) == (TaskState.SUCCEEDED, 1), (done.state, done.error)
        log = procs.log("worker-node-a")
        assert "heartbeat failed" not in log and "lease was not renewed in time" not in log
        assert executions(procs, ["node-a"])[task_id] == 1


@pytest.mark.parametrize("credentials", [":wrong-guess", "ghost:wrong-guess"], ids=["password", "user"])
def test_bad_credentials_make_the_dispatcher_and_the_worker_exit_with_one_line(tmp_path: Path,
                                                                                credentials: str) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        redis.Redis(port=server.port).config_set("requirepass", "sekret")
        url = f"redis://{credentials}@127.0.0.1:{server.port}/0"
        with processes(tmp_path, url, "default") as procs:
            started = {"dispatcher": procs.dispatcher(), "worker-node-a": procs.worker("node-a")}
            for proc in started.values():
                proc.wait(60)
            for name, proc in started.items():
                log = procs.log(name)
                assert proc.returncode != 0, log
                assert f"error: {REFUSED}" in log and "Traceback" not in log, log
                assert "wrong-guess" not in log, "the password is never printed"
    finally:
        server.stop()


@pytest.mark.parametrize("command", [("dispatcher",), ("worker", "--node", "node-a")], ids=["dispatcher", "worker"])
def test_a_bad_setting_makes_the_process_exit_naming_it(command: tuple[str, ...]) -> None:
    done = gpubroker(*command, env={"GPUBROKER_HEARTBEAT_S": "often"})
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: invalid configuration: heartbeat_s (GPUBROKER_HEARTBEAT_S): Input should "
                                   "be a valid number, unable to parse string as a number"), done.stderr


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of its own: these tests change its role and limits."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def test_a_replica_after_a_failover_is_waited_out_by_the_dispatcher_and_named_to_the_client(
        own_redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(redis_url=own_redis.url, pool="replica", reap_interval_s=0.2)
    r = redis.Redis(port=own_redis.port)
    register_node(Scripts(r, PoolKeys(settings.pool)), "n", cpus=1, slots=1, lease_ms=3_600_000)
    stop = threading.Event()
    thread = threading.Thread(target=Dispatcher(settings).run_forever, args=(stop,), daemon=True)
    with Client(settings=settings) as client:
        waiting = client.submit("workers.tasks.probe", resources=Resources(cpus=1)).id
        r.replicaof("127.0.0.1", str(free_port()))  # demoted, its master unreachable: writes get READONLY
        try:
            thread.start()
            with pytest.raises(BrokerUnavailable, match=re.escape(TRANSIENT_REPLIES["READONLY"])):
                client.submit("workers.tasks.probe", resources=Resources(cpus=1))
            wait_until(lambda: f"Redis unavailable ({TRANSIENT_REPLIES['READONLY']}" in caplog.text, 10,
                       what="the dispatcher to meet the read-only replica")
            assert thread.is_alive() and client.status(waiting).state is TaskState.PENDING
            r.replicaof("NO", "ONE")  # promoted: the dispatcher carries on by itself
            wait_state(client, waiting, TaskState.RESERVED, 10)
        finally:
            stop.set()
            thread.join(10)


def test_a_redis_busy_with_a_script_is_named_to_the_client(own_redis: RedisServer) -> None:
    r = redis.Redis(port=own_redis.port)
    r.config_set("busy-reply-threshold", "50")  # ms a script runs before others are answered BUSY
    spin = "local t0 = redis.call('time') repeat local t = redis.call('time') until t[1] - t0[1] >= 2 return 1"
    busy = threading.Thread(target=r.eval, args=(spin, 0))
    with Client(own_redis.url, pool="busy") as client:
        busy.start()
        try:
            with pytest.raises(BrokerUnavailable, match=re.escape(TRANSIENT_REPLIES["BUSY"])):
                for _ in range(500):  # answered until the script has run past the threshold
                    with contextlib.suppress(TaskNotFound):
                        client.status("no-such-task")
                    time.sleep(0.01)
        finally:
            busy.join(10)
