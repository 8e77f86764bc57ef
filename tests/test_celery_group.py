"""A Celery ``group`` goes through the broker as one batch (issue 14: "``group`` through the
broker, pipelined"): its members are checked as each is sent and written together when the
producer is released (``GpuCelery.producer_or_acquire``, ``transport.SubmitBatch``). Against a
real Redis, with Celery's own canvas; no worker runs, so every member stays PENDING. Round trips
are counted from Redis's own ``total_reads_processed``, not timed."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import group
from kombu.exceptions import OperationalError

from broker.celery_conf import celery_settings
from broker.errors import InvalidRequest
from broker.native.app import GpuCelery
from broker.settings import Settings
from broker.store.keys import PoolKeys
from tests.invariants import pending_ids, task_hash
from tests.support import RedisServer
from tests.test_client import two_nodes  # noqa: F401  (fixture)


def add(x: int, y: int) -> int:
    return x + y


@pytest.fixture
def app(settings: Settings) -> Iterator[GpuCelery]:
    app = GpuCelery("grouped", set_as_current=False)
    app.conf.update(celery_settings(settings))
    app.task(name="tests.grouped.add")(add)
    yield app
    app.close()


def reads(client: redis.Redis) -> int:
    return int(client.info("stats")["total_reads_processed"])


def test_a_groups_members_are_written_in_order_in_a_few_round_trips(
        app: GpuCelery, redis_client: redis.Redis, keys: PoolKeys, two_nodes: None) -> None:  # noqa: F811
    task: Any = app.tasks["tests.grouped.add"]
    task.delay(0, 0)  # scripts loaded, the task catalogue and nodes read: what any first call costs
    before = reads(redis_client)
    result = group(task.s(i, i) for i in range(40)).apply_async()
    spent = reads(redis_client) - before
    ids = [r.id for r in result.results]
    assert pending_ids(redis_client, keys)[1:] == ids  # every member queued, in the group's order
    assert all(task_hash(redis_client, keys, i)["name"] == "tests.grouped.add" for i in ids)
    # One at a time, 40 submits and their 40 task-sent events were 80 reads at least.
    assert spent <= 8, f"{spent} reads of Redis for a group of 40"

    single = task.delay(1, 2)  # outside a group: written before delay returns, as always
    assert task_hash(redis_client, keys, single.id)["state"] == "PENDING"


def test_a_group_with_a_member_refused_writes_none_of_it(
        app: GpuCelery, redis_client: redis.Redis, keys: PoolKeys, two_nodes: None) -> None:  # noqa: F811
    task: Any = app.tasks["tests.grouped.add"]
    members = [task.s(1, 1), task.s(2, 2).set(resources={"gpus": 64}), task.s(3, 3)]  # no node has 64 GPUs
    with pytest.raises(InvalidRequest) as refused:
        group(members).apply_async()
    assert "gpus" in str(refused.value)
    assert pending_ids(redis_client, keys) == []
    assert not redis_client.keys(keys.task("*"))


def test_a_member_with_an_idempotency_key_taken_adds_no_task_and_the_others_keep_their_order(
        app: GpuCelery, redis_client: redis.Redis, keys: PoolKeys, two_nodes: None) -> None:  # noqa: F811
    """Such a member is written on its own, at once, between the members before and after it.
    (Celery's GroupResult holds the id each member was sent with, not the task the key stands for.)"""
    task: Any = app.tasks["tests.grouped.add"]
    first = task.apply_async((1, 1), idempotency_key="nightly-1")
    result = group([task.s(2, 2), task.s(1, 1).set(idempotency_key="nightly-1"), task.s(3, 3)]).apply_async()
    ids = [r.id for r in result.results]
    assert pending_ids(redis_client, keys) == [first.id, ids[0], ids[2]]


def test_a_lost_redis_raises_kombus_operational_error_as_celery_documents(
        app: GpuCelery, redis_server: RedisServer, two_nodes: None) -> None:  # noqa: F811
    """The write now happens when the producer is released, outside Celery's own error wrapping:
    a lost Redis must still be kombu's OperationalError, not redis-py's ConnectionError."""
    app.conf.broker_connection_retry = app.conf.task_publish_retry = False
    task: Any = app.tasks["tests.grouped.add"]
    task.delay(1, 1)
    redis_server.kill()
    try:
        with pytest.raises(OperationalError):
            task.delay(2, 2)
        with pytest.raises(OperationalError):
            group(task.s(i, i) for i in range(3)).apply_async()
    finally:
        redis_server.start()


def test_a_redis_restart_within_the_publish_retry_policy_loses_no_delay(
        app: GpuCelery, redis_server: RedisServer, redis_client: redis.Redis, keys: PoolKeys,
        two_nodes: None) -> None:  # noqa: F811
    """As Celery retries a publish (task_publish_retry_policy: 3 retries, 0.2 s apart), the batch
    retries its write: a Redis back within that does not fail the call, and the task is written once."""
    task: Any = app.tasks["tests.grouped.add"]
    task.delay(0, 0)
    redis_server.kill()
    restart = threading.Timer(0.3, redis_server.start)
    restart.start()
    try:
        result = task.delay(1, 1)
    finally:
        restart.join()
    assert task_hash(redis_client, keys, result.id)["state"] == "PENDING"
    assert pending_ids(redis_client, keys)[-1] == result.id
