"""A gang member's side (issue 13): its rendezvous environment, and the barrier before its code.

reserve_gang.lua wrote each member's record with its place in the gang; here, in the pool
child, after start.lua's fence and before the task's code, the member exports what a
PyTorch/NCCL job reads (``torch.distributed.init_process_group`` with ``env://``, as
``torchrun`` would set it): WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE, NODE_RANK,
MASTER_ADDR (the address rank 0's node registered, ``gpubroker worker --address``) and
MASTER_PORT (the port reserve_gang.lua gave the gang there). Then it waits until every member
has passed its own fence: a rank that started alone would only block in the rendezvous while
holding its GPUs, so no member's code runs before all have started (``gang_barrier_timeout_s``;
past it, the member fails and the gang with it).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import cast

import redis

from broker.store.gangs import MEMBER, member_id
from broker.store.keys import PoolKeys
from workers import context, warm

log = logging.getLogger(__name__)

_FIELDS = ("gang", "rank", "world", "local_rank", "local_world", "node_rank", "master_node", "master_port")
ADDRESS_FIELD = "address"  # in the node hash: where the node's members reach each other
BARRIER_POLL_S = 0.02


class GangAborted(Exception):
    """The gang cannot run this attempt: a member ended or never started in time."""


def default_address() -> str:
    """This host's address as other hosts would reach it (the loopback one when nothing better)."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def publish_address(client: redis.Redis, keys: PoolKeys, node_id: str, address: str) -> None:
    """Record where ``node_id`` is reached (after each register: a re-registered node is new)."""
    client.hset(keys.node(node_id), ADDRESS_FIELD, address)


def rendezvous(client: redis.Redis, keys: PoolKeys, task_id: str) -> dict[str, str] | None:
    """The environment of member ``task_id`` (None when it is not a gang member)."""
    if MEMBER not in task_id:
        return None
    raw = cast(list[bytes | None], client.hmget(keys.task(task_id), *_FIELDS))
    if raw[0] is None:
        return None
    f = {name: (value or b"").decode() for name, value in zip(_FIELDS, raw, strict=True)}
    address = cast(bytes | None, client.hget(keys.node(f["master_node"]), ADDRESS_FIELD))
    return {"WORLD_SIZE": f["world"], "RANK": f["rank"], "LOCAL_RANK": f["local_rank"],
            "LOCAL_WORLD_SIZE": f["local_world"], "NODE_RANK": f["node_rank"], "GROUP_RANK": f["node_rank"],
            "MASTER_ADDR": address.decode() if address else "127.0.0.1", "MASTER_PORT": f["master_port"],
            "GPUBROKER_GANG_ID": f["gang"]}


def wait_for_members(client: redis.Redis, keys: PoolKeys, gang_id: str, world: int, timeout_s: float) -> None:
    """Return once every member of the gang has started (RUNNING, or done already); raise
    GangAborted when one ended otherwise, or after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        pipe = client.pipeline(transaction=False)
        for rank in range(world):
            pipe.hget(keys.task(member_id(gang_id, rank)), "state")
        states = [s.decode() if s else "" for s in cast(list[bytes | None], pipe.execute())]
        if all(s in ("RUNNING", "SUCCEEDED") for s in states):
            return
        ended = [rank for rank, s in enumerate(states) if s in ("FAILED", "CANCELLED")]
        if ended:
            raise GangAborted(f"gang {gang_id}: member {ended[0]} is {states[ended[0]]}; this member does not run")
        if time.monotonic() >= deadline:
            waiting = [rank for rank, s in enumerate(states) if s != "RUNNING"]
            raise GangAborted(f"gang {gang_id}: members {waiting} had not started after {timeout_s:g}s")
        time.sleep(BARRIER_POLL_S)


def enter(task_id: str) -> None:
    """For a gang member: export its rendezvous environment and wait at the barrier. Nothing for
    any other task."""
    scripts = context.scripts()
    env = rendezvous(scripts.redis, scripts.keys, task_id)
    if env is None:
        return
    os.environ.update(env)
    warm.ThisProcess.retire()  # its env (and any process group) is this member's: no later task may inherit it
    wait_for_members(scripts.redis, scripts.keys, env["GPUBROKER_GANG_ID"], int(env["WORLD_SIZE"]),
                     context.settings().gang_barrier_timeout_s)
