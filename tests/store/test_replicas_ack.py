"""min_replicas_ack: durable transitions wait (WAIT, on their own connection) for replicas, and a
shortfall is a clear, retryable error, never a silent success."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from broker import Client, ReplicasNotConfirmed
from broker.message import build_message
from broker.scheduling.model import Placement
from broker.settings import Settings
from broker.store import gangs
from broker.store.connection import NotReplicated, as_broker_error, connect, transient
from broker.store.keys import PoolKeys
from broker.store.scripts import GangReserveCode, ReserveCode, Scripts
from tests.invariants import PROBE, register_node, submit_task
from tests.sentinel_support import SentinelCluster
from tests.store.test_lua_gang import gang_request, members, submit_gang
from tests.support import RedisServer, wait_until


@pytest.fixture
def replicated(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    master = RedisServer(tmp_path / "master")
    master.start()
    replica = RedisServer(tmp_path / "replica", "--replicaof", "127.0.0.1", str(master.port))
    replica.start()
    wait_until(lambda: SentinelCluster.replicas_online(master) == 1, 20, what="the replica to sync")
    yield master, replica
    replica.stop()
    master.stop()


def test_with_a_replica_every_durable_transition_is_confirmed(replicated: tuple[RedisServer, RedisServer]) -> None:
    master, replica = replicated
    settings = Settings(redis_url=master.url, pool="acks", min_replicas_ack=1)
    scripts = Scripts(connect(settings), PoolKeys(settings.pool))
    register_node(scripts, "n1", gpus=1, gpu_mem=1000)
    task = submit_task(scripts)
    prepared = scripts.prepare_reserve([Placement(task, "n1")])
    prepared.send()
    assert prepared.codes() == [ReserveCode.OK]
    # Confirmed means on the replica by the time the call returned.
    assert redis.Redis(port=replica.port).hget(PoolKeys("acks").task(task), "state") == b"RESERVED"


def test_without_enough_replicas_the_write_fails_clearly(settings: Settings) -> None:
    lone = Settings(**{**settings.model_dump(), "min_replicas_ack": 1, "replicas_ack_timeout_s": 0.1})
    scripts = Scripts(connect(lone), PoolKeys(lone.pool))
    with pytest.raises(NotReplicated) as caught:
        submit_task(scripts)
    assert transient(caught.value), "retried like a failover in progress"
    error = as_broker_error(caught.value)
    assert isinstance(error, ReplicasNotConfirmed)
    assert "0 of 1 replicas confirmed" in str(error) and "GPUBROKER_MIN_REPLICAS_ACK=1" in str(error)
    with Client(settings=lone) as client, pytest.raises(ReplicasNotConfirmed, match="applied on the Redis master"):
        client.submit("workers.tasks.probe")


def test_a_batch_waits_for_its_replicas_behind_each_round_trip(replicated: tuple[RedisServer, RedisServer],
                                                                 settings: Settings) -> None:
    """submit_many sends a WAIT behind each chunk it keeps in flight: confirmed on the replica
    when it returns, and a shortfall is the same clear error as for one submit."""
    master, replica = replicated
    acked = Settings(redis_url=master.url, pool="acks", min_replicas_ack=1)
    with Client(settings=acked) as client:
        handles = client.submit_many([{"task_name": "workers.tasks.probe", "args": [i]} for i in range(1203)])
    on_replica = redis.Redis(port=replica.port)
    assert all(on_replica.hget(PoolKeys("acks").task(h.id), "state") == b"PENDING" for h in handles)
    lone = Settings(**{**settings.model_dump(), "min_replicas_ack": 1, "replicas_ack_timeout_s": 0.1})
    with Client(settings=lone) as client, pytest.raises(ReplicasNotConfirmed, match="applied on the Redis master"):
        client.submit_many([{"task_name": "workers.tasks.probe"}] * 3)


def test_a_gangs_transitions_are_confirmed_too(replicated: tuple[RedisServer, RedisServer]) -> None:
    """submit_gang, reserve_gang and settle_gang lose or duplicate a whole job if a failover drops
    them: each waits for the replica like a single task's transitions."""
    master, replica = replicated
    settings = Settings(redis_url=master.url, pool="acks", min_replicas_ack=1)
    keys = PoolKeys(settings.pool)
    scripts = Scripts(connect(settings), keys)
    for node in ("n1", "n2"):
        register_node(scripts, node, gpus=1, gpu_mem=1000)
    submit_gang(scripts, "g", 2, gpus=1)
    on_replica = redis.Redis(port=replica.port)
    assert on_replica.hget(keys.task("g"), "state") == b"PENDING"
    code, _rank = gangs.reserve_gang(scripts, members("g", ("n1", (0,)), ("n2", (0,))))
    assert code is GangReserveCode.OK
    assert [on_replica.hget(keys.task(f"g:m{r}"), "state") for r in (0, 1)] == [b"RESERVED", b"RESERVED"]
    scripts.cancel("g:m1", "n2")  # a member ends: settle_gang asks the other to stop
    gangs.settle(scripts, "g", 2, 5000)
    assert on_replica.hget(keys.task("g:m0"), "cancel_req") == b"cancel"


def test_without_enough_replicas_a_gang_submit_fails_clearly(settings: Settings) -> None:
    lone = Settings(**{**settings.model_dump(), "min_replicas_ack": 1, "replicas_ack_timeout_s": 0.1})
    scripts = Scripts(connect(lone), PoolKeys(lone.pool))
    with pytest.raises(NotReplicated):
        gangs.submit_gang(scripts, "g", gang_request(2, 1), build_message("g", PROBE, [], {}, 1 << 20))
