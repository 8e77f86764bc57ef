"""reserve.lua and reserve_gang.lua with elastic grants (issue 13) against a real Redis: a grant
between the minimum and the most is committed and re-checked as any placement, anything else
is refused with nothing changed, and racing callers with stale grants never over-commit."""

from __future__ import annotations

import json

import pytest
import redis

from broker.models import Resources
from broker.scheduling.model import Placement
from broker.store import gangs
from broker.store.keys import PoolKeys
from broker.store.scripts import GangReserveCode, ReserveCode, Scripts
from tests.invariants import (
    alloc_of,
    assert_capacity_invariant,
    assert_pool_invariants,
    free_of,
    pending_ids,
    queued_envelopes,
    race,
    register_node,
    reserve_one,
    submit_task,
    task_hash,
)
from tests.store.test_lua_gang import NODE, members, submit_gang
from tests.store.test_lua_settle_gang import GRACE_MS

ELASTIC = Resources(gpus=8, min_gpus=2, cpus=1, memory_mb=1000)


@pytest.fixture
def two_nodes(scripts: Scripts) -> list[str]:
    for node_id in ("n1", "n2"):
        register_node(scripts, node_id, **NODE)  # type: ignore[arg-type]
    return ["n1", "n2"]


def test_a_grant_between_min_and_max_is_committed_with_exactly_those_gpus(
        scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys, two_nodes: list[str]) -> None:
    task = submit_task(scripts, resources=ELASTIC)
    assert json.loads(task_hash(redis_client, keys, task)["req"])["mg"] == 2

    assert reserve_one(scripts, task, "n1", 1, 4, 6) is ReserveCode.OK

    t = task_hash(redis_client, keys, task)
    assert (t["state"], t["gpus"]) == ("RESERVED", "1,4,6")
    assert [g[0] for g in (alloc_of(redis_client, keys, task) or {})["g"]] == [1, 4, 6]
    assert [i for i in range(8) if free_of(redis_client, keys, "n1")[f"g{i}_milli"] == 0] == [1, 4, 6]
    assert free_of(redis_client, keys, "n1")["free_cpu_m"] == 31_000  # CPU and memory as asked, not scaled
    (envelope,) = queued_envelopes(redis_client, keys, "n1")
    assert envelope["properties"]["gpubroker"]["gpus"] == "1,4,6"
    assert_pool_invariants(redis_client, keys)


@pytest.mark.parametrize("gpus", [(0,), (0, 1, 2, 3, 4)], ids=["below min_gpus", "above gpus"])
def test_a_grant_outside_min_and_max_is_refused_and_changes_nothing(
        scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys, two_nodes: list[str],
        gpus: tuple[int, ...]) -> None:
    task = submit_task(scripts, resources=Resources(gpus=4, min_gpus=2))
    before = free_of(redis_client, keys, "n1")
    assert reserve_one(scripts, task, "n1", *gpus) is ReserveCode.BAD_PLACEMENT
    assert task_hash(redis_client, keys, task)["state"] == "PENDING" and pending_ids(redis_client, keys) == [task]
    assert free_of(redis_client, keys, "n1") == before


def test_racing_stale_grants_never_over_commit(redis_client: redis.Redis, keys: PoolKeys, clock: object,
                                               two_nodes: list[str]) -> None:
    """Six elastic tasks (2 to 8 GPUs), each granted by four racing callers from a stale view of
    the same free GPUs (as dispatchers reading one snapshot would): 5, 3, 2... on GPUs 0.. each.
    Every GPU is held at most once, and every commit is a grant the script re-checked."""
    first = Scripts(redis_client, keys, clock)  # type: ignore[arg-type]
    ids = [submit_task(first, resources=ELASTIC) for _ in range(6)]

    def reserve(mine: Scripts, task: str, i: int) -> ReserveCode:
        grant, start = (5, 3, 2)[i % 3], (0, 3, 6)[i % 3]
        (code,) = mine.reserve([Placement(task, ("n1", "n2")[i % 2], tuple(range(start, min(8, start + grant))))])
        return code

    results = race(redis_client, keys, clock, ids, 4, reserve)
    placed = [t for t, code in results if code is ReserveCode.OK]
    assert placed and len(placed) == len(set(placed))
    assert all(code in (ReserveCode.OK, ReserveCode.NO_CAPACITY, ReserveCode.NOT_PENDING, ReserveCode.BAD_PLACEMENT)
               for _, code in results)
    for node_id in two_nodes:  # no GPU held twice: free + held = capacity, checked per index
        held = [g[0] for t in placed if task_hash(redis_client, keys, t)["node"] == node_id
                for g in (alloc_of(redis_client, keys, t) or {})["g"]]
        assert len(held) == len(set(held))
    assert_capacity_invariant(redis_client, keys)
    assert_pool_invariants(redis_client, keys)


def test_an_elastic_gang_commits_the_members_granted_and_they_see_that_world(
        scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys, two_nodes: list[str]) -> None:
    submit_gang(scripts, "g", 8, 4, min_replicas=2)
    assert json.loads(task_hash(redis_client, keys, "g")["req"])["mk"] == 2

    placed = members("g", ("n1", (0, 1, 2, 3)), ("n1", (4, 5, 6, 7)), ("n2", (0, 1, 2, 3)))
    assert gangs.reserve_gang(scripts, placed) == (GangReserveCode.OK, 0)

    g = task_hash(redis_client, keys, "g")
    assert (g["state"], g["granted"], g["replicas"]) == ("RESERVED", "3", "8")
    assert [task_hash(redis_client, keys, f"g:m{r}")["world"] for r in range(3)] == ["3", "3", "3"]
    assert not redis_client.exists(keys.task("g:m3"))
    assert len(gangs.members_of(redis_client, keys, "g", gangs.attempt_members(redis_client.hgetall(keys.task("g")))))\
        == 3
    assert_pool_invariants(redis_client, keys)


@pytest.mark.parametrize("count", [1, 9], ids=["below min_replicas", "above replicas"])
def test_an_elastic_gang_outside_its_bounds_is_refused_and_nothing_is_written(
        scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys, two_nodes: list[str], count: int) -> None:
    submit_gang(scripts, "g", 8, 1, min_replicas=2)
    before = {n: free_of(redis_client, keys, n) for n in two_nodes}
    placed = members("g", *[("n1", (r,)) for r in range(min(count, 8))], *[("n2", (0,))] * (count - 8))
    assert gangs.reserve_gang(scripts, placed) == (GangReserveCode.NOT_PENDING, -1)
    assert task_hash(redis_client, keys, "g")["state"] == "PENDING" and pending_ids(redis_client, keys) == ["g"]
    assert {n: free_of(redis_client, keys, n) for n in two_nodes} == before
    assert not redis_client.exists(keys.task("g:m0"))


def test_a_requeued_elastic_gang_is_granted_afresh(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys,
                                                   two_nodes: list[str]) -> None:
    """One fate over the members granted: a failed member of 3 stops the 3 (not 8), the gang goes
    back with no grant, and its next attempt may be granted another count."""
    submit_gang(scripts, "g", 8, 4, min_replicas=2)
    assert gangs.reserve_gang(scripts, members("g", ("n1", (0, 1, 2, 3)), ("n1", (4, 5, 6, 7)),
                                               ("n2", (0, 1, 2, 3))))[0] is GangReserveCode.OK
    for rank in range(3):
        member = f"g:m{rank}"
        node_id = task_hash(redis_client, keys, member)["node"]
        scripts.start(member, node_id, task_hash(redis_client, keys, member)["tag"])
        scripts.finish(member, node_id, task_hash(redis_client, keys, member)["tag"], "failed" if rank == 1 else
                       "succeeded", "null")
    assert gangs.settle_all(scripts, GRACE_MS)["g"].name == "REQUEUED"
    g = task_hash(redis_client, keys, "g")
    assert g["state"] == "PENDING" and "granted" not in g
    assert gangs.reserve_gang(scripts, members("g", ("n2", (0, 1, 2, 3)), ("n2", (4, 5, 6, 7))))[0] \
        is GangReserveCode.OK
    assert task_hash(redis_client, keys, "g")["granted"] == "2"
    assert task_hash(redis_client, keys, "g:m0")["world"] == "2"
    assert_capacity_invariant(redis_client, keys)
