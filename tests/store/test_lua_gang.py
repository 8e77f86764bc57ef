"""submit_gang.lua and reserve_gang.lua against a real Redis: a gang is stored as one queue
entry and reserved all members or none, in one call, never over-committing with racing callers."""

from __future__ import annotations

import json

import pytest
import redis

from broker.errors import InvalidRequest
from broker.message import build_message
from broker.models import Resources, SubmitRequest
from broker.scheduling.model import GangPlacement, Placement
from broker.store import gangs
from broker.store.keys import PoolKeys
from broker.store.scripts import GangReserveCode, ReserveCode, Scripts, SubmitCode
from tests.invariants import (
    PROBE,
    assert_capacity_invariant,
    assert_pool_invariants,
    free_of,
    node_task_ids,
    pending_ids,
    queued_envelopes,
    race,
    register_node,
    reserve_one,
    submit_task,
    task_hash,
)

NODE = {"gpus": 8, "gpu_mem": 80_000, "cpus": 32, "mem": 256_000, "slots": 8}


def gang_request(replicas: int, gpus: float = 4, **kw: object) -> SubmitRequest:
    return SubmitRequest(task_name=PROBE, resources=Resources(gpus=gpus, cpus=1, memory_mb=1000),
                         replicas=replicas, **kw)  # type: ignore[arg-type]


def submit_gang(scripts: Scripts, gang_id: str, replicas: int, gpus: float = 4, **kw: object) -> str:
    req = gang_request(replicas, gpus, **kw)
    code, known = gangs.submit_gang(scripts, gang_id, req, build_message(gang_id, PROBE, [], {}, 1 << 20))
    assert (code, known) == (SubmitCode.CREATED, gang_id)
    return gang_id


def members(gang_id: str, *where: tuple[str, tuple[int, ...]]) -> GangPlacement:
    return GangPlacement(gang_id, tuple(Placement(gang_id, node, gpus) for node, gpus in where))


@pytest.fixture
def two_nodes(scripts: Scripts) -> list[str]:
    for node_id in ("n1", "n2"):
        register_node(scripts, node_id, **NODE)  # type: ignore[arg-type]
    return ["n1", "n2"]


def test_a_gang_is_one_queue_entry_with_each_members_message(scripts: Scripts, redis_client: redis.Redis,
                                                              keys: PoolKeys) -> None:
    submit_gang(scripts, "g", 3)
    assert pending_ids(redis_client, keys) == ["g"]
    t = task_hash(redis_client, keys, "g")
    assert (t["state"], t["replicas"]) == ("PENDING", "3")
    assert json.loads(t["req"])["k"] == 3 and "k" not in json.loads(t["member_req"])
    for rank in range(3):
        envelope = json.loads(t[f"message:{rank}"])
        assert envelope["headers"]["id"] == envelope["properties"]["correlation_id"] == f"g:m{rank}"
        assert envelope["headers"]["root_id"] == "g"
    assert not redis_client.exists(keys.task("g:m0"))  # members exist once placed
    assert_pool_invariants(redis_client, keys)


def test_submit_lua_refuses_a_gang_request(scripts: Scripts) -> None:
    """A gang stored by submit.lua would have no member messages: only submit_gang.lua takes one."""
    req = gang_request(2)
    with pytest.raises(InvalidRequest, match=r"replicas.*submit_gang\.lua"):
        scripts.submit("g", req, build_message("g", PROBE, [], {}, 1 << 20))


def test_gang_idempotency_key_names_one_gang(scripts: Scripts) -> None:
    submit_gang(scripts, "g1", 2, idempotency_key="k")
    req = gang_request(2, idempotency_key="k")
    assert gangs.submit_gang(scripts, "g2", req, build_message("g2", PROBE, [], {}, 1 << 20)) == \
        (SubmitCode.DUPLICATE, "g1")


def test_reserve_takes_every_member_with_its_rendezvous(scripts: Scripts, redis_client: redis.Redis,
                                                        keys: PoolKeys, two_nodes: list[str]) -> None:
    submit_gang(scripts, "g", 3)
    placed = members("g", ("n1", (0, 1, 2, 3)), ("n1", (4, 5, 6, 7)), ("n2", (0, 1, 2, 3)))
    assert gangs.reserve_gang(scripts, placed) == (GangReserveCode.OK, 0)
    assert task_hash(redis_client, keys, "g")["state"] == "RESERVED"
    assert pending_ids(redis_client, keys) == []
    rendezvous = []
    for rank in range(3):
        m = task_hash(redis_client, keys, f"g:m{rank}")
        assert (m["state"], m["gang"], m["tag"]) == ("RESERVED", "g", f"g:m{rank}.1")
        rendezvous.append((m["node"], m["gpus"], m["rank"], m["world"], m["local_rank"], m["local_world"],
                           m["node_rank"], m["master_node"]))
        assert 29500 <= int(m["master_port"]) < 30500
    assert rendezvous == [("n1", "0,1,2,3", "0", "3", "0", "2", "0", "n1"),
                          ("n1", "4,5,6,7", "1", "3", "1", "2", "0", "n1"),
                          ("n2", "0,1,2,3", "2", "3", "0", "1", "1", "n1")]
    assert node_task_ids(redis_client, keys, "n1") == {"g:m0", "g:m1"}
    assert [e["headers"]["id"] for e in queued_envelopes(redis_client, keys, "n2")] == ["g:m2"]
    assert free_of(redis_client, keys, "n2")["g0_milli"] == 0 and free_of(redis_client, keys, "n2")["g4_milli"] == 1000
    assert_pool_invariants(redis_client, keys)


def test_room_for_one_member_of_two_reserves_nothing(scripts: Scripts, redis_client: redis.Redis,
                                                     keys: PoolKeys, two_nodes: list[str]) -> None:
    blocker = submit_task(scripts, resources=Resources(gpus=6, cpus=1, memory_mb=100))
    assert reserve_one(scripts, blocker, "n2", 0, 1, 2, 3, 4, 5) is ReserveCode.OK
    submit_gang(scripts, "g", 2)
    before = {n: free_of(redis_client, keys, n) for n in two_nodes}
    code = gangs.reserve_gang(scripts, members("g", ("n1", (0, 1, 2, 3)), ("n2", (4, 5, 6, 7))))
    assert code == (GangReserveCode.NO_CAPACITY, 1)
    assert {n: free_of(redis_client, keys, n) for n in two_nodes} == before
    assert task_hash(redis_client, keys, "g")["state"] == "PENDING" and pending_ids(redis_client, keys)[-1] == "g"
    assert not redis_client.exists(keys.task("g:m0")) and queued_envelopes(redis_client, keys, "n1") == []
    assert_pool_invariants(redis_client, keys)


@pytest.mark.parametrize(("where", "code"), [
    ((("n1", (0, 1, 2, 3)), ("n1", (2, 3, 4, 5))), (GangReserveCode.NO_CAPACITY, 1)),  # members overlap
    ((("n1", (0, 1, 2, 3)), ("n3", (0, 1, 2, 3))), (GangReserveCode.NODE_DOWN, 1)),
    ((("n1", (0, 1, 2)), ("n2", (0, 1, 2, 3))), (GangReserveCode.BAD_PLACEMENT, 0)),
    ((("n1", (0, 1, 2, 3)),), (GangReserveCode.NOT_PENDING, -1)),  # one member short
])
def test_any_refused_member_refuses_the_gang(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys,
                                             two_nodes: list[str], where: tuple[tuple[str, tuple[int, ...]], ...],
                                             code: tuple[GangReserveCode, int]) -> None:
    submit_gang(scripts, "g", 2)
    before = {n: free_of(redis_client, keys, n) for n in two_nodes}
    assert gangs.reserve_gang(scripts, members("g", *where)) == code
    assert {n: free_of(redis_client, keys, n) for n in two_nodes} == before
    assert pending_ids(redis_client, keys) == ["g"]
    assert_pool_invariants(redis_client, keys)


def test_a_reserved_gang_is_not_reserved_again(scripts: Scripts, two_nodes: list[str]) -> None:
    submit_gang(scripts, "g", 2)
    placed = members("g", ("n1", (0, 1, 2, 3)), ("n2", (0, 1, 2, 3)))
    assert gangs.reserve_gang(scripts, placed)[0] is GangReserveCode.OK
    assert gangs.reserve_gang(scripts, members("g", ("n1", (4, 5, 6, 7)), ("n2", (4, 5, 6, 7)))) == \
        (GangReserveCode.NOT_PENDING, -1)


def test_reserve_lua_places_a_gang_nowhere(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys,
                                           two_nodes: list[str]) -> None:
    """A gang as a single placement (a policy bug) is refused: it would run one member."""
    submit_gang(scripts, "g", 2)
    assert reserve_one(scripts, "g", "n1", 0, 1, 2, 3) is ReserveCode.BAD_PLACEMENT
    assert_pool_invariants(redis_client, keys)


def test_racing_dispatchers_never_over_commit(redis_client: redis.Redis, keys: PoolKeys, clock: object,
                                              two_nodes: list[str]) -> None:
    """Eight gangs of 2 x 4 GPUs, each proposed by four racing callers onto the same GPUs (as
    dispatchers with stale snapshots would): two nodes of 8 GPUs hold exactly two gangs."""
    ids = [f"g{i}" for i in range(8)]
    first = Scripts(redis_client, keys, clock)  # type: ignore[arg-type]
    for gang_id in ids:
        submit_gang(first, gang_id, 2)

    def reserve(mine: Scripts, gang_id: str, i: int) -> GangReserveCode:
        half = (0, 1, 2, 3) if i % 2 == 0 else (4, 5, 6, 7)
        return gangs.reserve_gang(mine, members(gang_id, ("n1", half), ("n2", half)))[0]

    results = race(redis_client, keys, clock, ids, 4, reserve)
    placed = [g for g, code in results if code is GangReserveCode.OK]
    assert len(placed) == len(set(placed)) == 2
    assert all(code in (GangReserveCode.OK, GangReserveCode.NO_CAPACITY, GangReserveCode.NOT_PENDING)
               for _, code in results)
    for node_id in two_nodes:
        assert all(v == 0 for f, v in free_of(redis_client, keys, node_id).items() if f.endswith("_milli"))
    assert_capacity_invariant(redis_client, keys)
    assert_pool_invariants(redis_client, keys)
