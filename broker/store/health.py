"""Liveness read from Redis (``gpubroker health``): is a dispatcher cycling, is a node's worker
heartbeating? A process that is alive but stuck fails too, since only its work updates these."""

from __future__ import annotations

from typing import cast

import redis

from broker.store.keys import PoolKeys


def dispatcher_health(client: redis.Redis, keys: PoolKeys, now_ms: int, max_age_s: float) -> tuple[bool, str]:
    """(healthy, one line why) from the time of the last dispatcher cycle (``P cycle``)."""
    raw = cast(bytes | None, client.get(keys.cycle))
    if raw is None:
        return False, f"no dispatcher has cycled on pool {keys.pool}"
    age = (now_ms - int(raw)) / 1000
    if age > max_age_s:
        return False, f"last dispatcher cycle {age:.1f}s ago (more than {max_age_s:g}s)"
    return True, f"last dispatcher cycle {max(age, 0):.1f}s ago"


def worker_health(client: redis.Redis, keys: PoolKeys, node_id: str, now_ms: int,
                  max_age_s: float) -> tuple[bool, str]:
    """(healthy, one line why) from the node's last heartbeat and state (heartbeat.lua, reap.lua)."""
    state, beat = cast(list[bytes | None], client.hmget(keys.node(node_id), ["state", "heartbeat_at"]))
    if state is None:
        return False, f"node {node_id} is not registered in pool {keys.pool}"
    if state != b"up":
        return False, f"node {node_id} is {state.decode(errors='replace')}"
    if beat is None:
        return False, f"node {node_id} has not heartbeated yet"
    age = (now_ms - int(beat)) / 1000
    if age > max_age_s:
        return False, f"node {node_id}: last heartbeat {age:.1f}s ago (more than {max_age_s:g}s)"
    return True, f"node {node_id}: last heartbeat {max(age, 0):.1f}s ago"
