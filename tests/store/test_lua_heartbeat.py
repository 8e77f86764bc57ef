"""heartbeat.lua against a real Redis: OK, NOT_REGISTERED, FENCED, REAPED."""

from __future__ import annotations

import redis

from broker.store.keys import PoolKeys
from broker.store.scripts import HeartbeatCode, RegisterCode, Scripts
from tests.invariants import LEASE_MS, ControlledClock, node_hash, register_node


def test_ok_renews_the_lease(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys,
                             clock: ControlledClock) -> None:
    register_node(scripts, "n1")
    clock.advance(4)
    assert scripts.heartbeat("n1", "inc-1", 30_000) is HeartbeatCode.OK
    assert redis_client.zscore(keys.leases, "n1") == clock() + 30_000
    assert node_hash(redis_client, keys, "n1")["heartbeat_at"] == str(clock())


def test_ok_even_after_expiry_until_reaped(scripts: Scripts, clock: ControlledClock) -> None:
    register_node(scripts, "n1")
    clock.advance(LEASE_MS / 1000 + 5)
    assert scripts.heartbeat("n1", "inc-1", LEASE_MS) is HeartbeatCode.OK
    assert scripts.reap() == []


def test_not_registered_writes_nothing(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys) -> None:
    assert scripts.heartbeat("ghost", "inc-1", LEASE_MS) is HeartbeatCode.NOT_REGISTERED
    assert redis_client.zscore(keys.leases, "ghost") is None
    assert not redis_client.exists(keys.node("ghost"))


def test_fenced_after_another_incarnation_registered(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys,
                                                     clock: ControlledClock) -> None:
    register_node(scripts, "n1", incarnation="old")
    assert register_node(scripts, "n1", incarnation="new")[0] is RegisterCode.REPLACED
    lease = redis_client.zscore(keys.leases, "n1")
    clock.advance(1)

    assert scripts.heartbeat("n1", "old", LEASE_MS) is HeartbeatCode.FENCED
    assert redis_client.zscore(keys.leases, "n1") == lease
    assert node_hash(redis_client, keys, "n1")["incarnation"] == "new"
    assert scripts.heartbeat("n1", "new", LEASE_MS) is HeartbeatCode.OK


def test_reaped_node_must_register_again(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys,
                                         clock: ControlledClock) -> None:
    register_node(scripts, "n1")
    clock.advance(LEASE_MS / 1000 + 1)
    assert scripts.reap() == ["n1"]

    assert scripts.heartbeat("n1", "inc-1", LEASE_MS) is HeartbeatCode.REAPED
    assert redis_client.zscore(keys.leases, "n1") is None
    assert node_hash(redis_client, keys, "n1")["state"] == "down"

    assert register_node(scripts, "n1")[0] is RegisterCode.REFRESHED
    assert scripts.heartbeat("n1", "inc-1", LEASE_MS) is HeartbeatCode.OK


def test_survives_script_flush(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys,
                               clock: ControlledClock) -> None:
    register_node(scripts, "n1")
    redis_client.script_flush()
    clock.advance(1)
    assert scripts.heartbeat("n1", "inc-1", LEASE_MS) is HeartbeatCode.OK
    assert redis_client.zscore(keys.leases, "n1") == clock() + LEASE_MS
