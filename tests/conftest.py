"""Fixtures: a real redis-server per session (clean database per test), a controllable clock."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from broker.settings import Settings
from broker.store.keys import PoolKeys
from broker.store.scripts import Scripts
from tests.support import Processes, RedisServer


class Clock:
    """Time is an argument: scripts get ``now`` from this, and tests move it."""

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self.now_ms = start_ms

    def __call__(self) -> int:
        return self.now_ms

    def advance(self, seconds: float) -> None:
        self.now_ms += int(seconds * 1000)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()  # a test killed it
    client = redis.Redis(port=redis_server.port)
    client.flushall()
    client.script_flush()
    yield client
    client.close()


@pytest.fixture
def keys() -> PoolKeys:
    return PoolKeys("test")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def scripts(redis_client: redis.Redis, keys: PoolKeys, clock: Clock) -> Scripts:
    return Scripts(redis_client, keys, clock)


@pytest.fixture
def settings(redis_server: RedisServer, redis_client: redis.Redis) -> Settings:
    return Settings(redis_url=redis_server.url, pool="test", lease_s=4, heartbeat_s=0.5, reap_interval_s=0.5)


@pytest.fixture
def procs(tmp_path: Path, settings: Settings) -> Iterator[Processes]:
    p = Processes(tmp_path, settings.redis_url, settings.pool,
                  env={"GPUBROKER_LEASE_S": str(settings.lease_s), "GPUBROKER_HEARTBEAT_S": str(settings.heartbeat_s),
                       "GPUBROKER_REAP_INTERVAL_S": str(settings.reap_interval_s)})
    yield p
    p.stop_all()


@pytest.fixture
def wakes(redis_client: redis.Redis, keys: PoolKeys) -> Iterator[redis.client.PubSub]:
    """A subscription to the pool's wake-ups, as a dispatcher holds one (read with invariants.woken)."""
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.wake)
    pubsub.get_message(timeout=1)  # the subscription's confirmation
    yield pubsub
    pubsub.close()
