"""Pools on different Redis deployments (``pool_urls``): one set of settings, and one client or
CLI, addresses each pool on its own redis-server; a pool not in the map stays on ``redis_url``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner

from broker import Client, TaskState
from broker.errors import ConfigError
from broker.settings import Settings
from broker.store.keys import PoolKeys
from tests.support import RedisServer
from workers.cli import app


@pytest.fixture
def second_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis-b")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def sharded(settings: Settings, second_redis: RedisServer) -> Settings:
    return Settings(**{**settings.model_dump(), "pool": "pool-a", "pool_urls": {"pool-b": second_redis.url}})


def _holds(url: str, pool: str, task_id: str) -> bool:
    with redis.Redis.from_url(url) as r:
        return bool(r.exists(PoolKeys(pool).task(task_id)))


def test_one_client_addresses_pools_on_two_redis_servers(sharded: Settings, second_redis: RedisServer) -> None:
    with Client(settings=sharded) as a, a.for_pool("pool-b") as b:
        on_a = a.submit("workers.tasks.probe").id
        on_b = b.submit("workers.tasks.probe").id
        assert (a.settings.url, b.settings.url) == (sharded.redis_url, second_redis.url)
        assert _holds(sharded.redis_url, "pool-a", on_a) and not _holds(second_redis.url, "pool-a", on_a)
        assert _holds(second_redis.url, "pool-b", on_b) and not _holds(sharded.redis_url, "pool-b", on_b)
        assert [e.id for e in a.queue()] == [on_a]
        assert [e.id for e in b.queue()] == [on_b]
        assert b.status(on_b).state is TaskState.PENDING
        b.cancel(on_b)
        assert b.status(on_b).state is TaskState.CANCELLED


def test_the_cli_follows_the_map(sharded: Settings, second_redis: RedisServer) -> None:
    env = {"GPUBROKER_REDIS_URL": sharded.redis_url, "GPUBROKER_POOL_URLS": json.dumps(sharded.pool_urls)}
    runner = CliRunner()
    submitted = runner.invoke(app, ["submit", "workers.tasks.probe", "--pool", "pool-b", "--json"], env=env)
    assert submitted.exit_code == 0, submitted.output
    task_id = json.loads(submitted.output)["id"]
    assert _holds(second_redis.url, "pool-b", task_id)
    queue = runner.invoke(app, ["queue", "--pool", "pool-b", "--json"], env=env)
    assert [e["id"] for e in json.loads(queue.output)] == [task_id]
    elsewhere = runner.invoke(app, ["queue", "--pool", "pool-c", "--json"], env=env)
    assert json.loads(elsewhere.output) == []  # not in the map: on GPUBROKER_REDIS_URL, empty


@pytest.mark.parametrize(("value", "reason"), [
    ({"b": "http://host/0"}, "pool 'b': unknown scheme http://"),
    ({"b": "redis+sentinel://h:26379"}, "pool 'b': the Sentinel URL names no service"),
    ({"bad name": "redis://h/0"}, "pool name 'bad name'"),
])
def test_a_bad_map_is_refused_naming_the_setting(value: dict[str, str], reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings(pool_urls=value)
    assert "pool_urls (GPUBROKER_POOL_URLS)" in str(caught.value) and reason in str(caught.value)
