"""settle_gang.lua against a real Redis: one fate for a gang's members. A member that ends
badly stops the others; once all are final the gang is requeued whole (one retry) or FAILED;
capacity comes back exactly; no member is ever requeued alone."""

from __future__ import annotations

import redis

from broker.models import TaskState
from broker.scheduling.model import GangPlacement, Placement
from broker.store import gangs
from broker.store.keys import PoolKeys
from broker.store.scripts import FinishCode, GangReserveCode, PreemptCode, Scripts, SettleCode, StartCode
from tests.invariants import (
    LEASE_MS,
    ControlledClock,
    assert_pool_invariants,
    free_of,
    pending_ids,
    register_node,
    task_hash,
)
from tests.store.test_lua_gang import NODE, submit_gang

GRACE_MS = 5000


def reserved_gang(scripts: Scripts, gang_id: str = "g", max_retries: int = 3) -> None:
    for node_id in ("n1", "n2"):
        register_node(scripts, node_id, **NODE)  # type: ignore[arg-type]
    submit_gang(scripts, gang_id, 2, max_retries=max_retries)
    placed = GangPlacement(gang_id, (Placement(gang_id, "n1", (0, 1, 2, 3)), Placement(gang_id, "n2", (0, 1, 2, 3))))
    assert gangs.reserve_gang(scripts, placed)[0] is GangReserveCode.OK


def start(scripts: Scripts, member: str, node_id: str) -> str:
    tag = task_hash(scripts.redis, scripts.keys, member)["tag"]
    assert scripts.start(member, node_id, tag)[0] is StartCode.OK
    return tag


def settle(scripts: Scripts, gang_id: str = "g") -> SettleCode:
    return gangs.settle_all(scripts, GRACE_MS)[gang_id]


def all_free(client: redis.Redis, keys: PoolKeys) -> bool:
    return all(free_of(client, keys, n)["free_slots"] == NODE["slots"] and free_of(client, keys, n)["g0_milli"] == 1000
               for n in ("n1", "n2"))


def test_a_failed_member_stops_the_others_then_the_gang_goes_back_whole(
        scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys) -> None:
    reserved_gang(scripts)
    tag0 = start(scripts, "g:m0", "n1")
    assert settle(scripts) is SettleCode.RUNNING  # m0 running, m1 reserved: nothing to do
    assert scripts.finish("g:m0", "n1", tag0, "failed", "RuntimeError: boom")[0] is FinishCode.OK
    assert settle(scripts) is SettleCode.STOPPING
    m1 = task_hash(redis_client, keys, "g:m1")
    assert (m1["state"], m1["cancel_req"], m1["cancel_grace"]) == ("RESERVED", "cancel", str(GRACE_MS))
    assert scripts.expire() == ["g:m1"]  # the dispatcher's next cycle releases the reserved member
    assert settle(scripts) is SettleCode.REQUEUED
    g = task_hash(redis_client, keys, "g")
    assert (g["state"], g["retries"]) == ("PENDING", "1") and "member 0 FAILED" in g["last_error"]
    assert pending_ids(redis_client, keys) == ["g"] and all_free(redis_client, keys)
    assert not redis_client.sismember(keys.gangs, "g")
    assert_pool_invariants(redis_client, keys)
    # While it waits, status shows this attempt's members waiting, not the last attempt's fates.
    waiting = gangs.gang_status(redis_client, keys, "g", redis_client.hgetall(keys.task("g")), None)
    assert waiting.state is TaskState.PENDING and waiting.members is not None
    assert [(m.rank, m.state, m.node, m.gpus, m.error) for m in waiting.members] == [
        (0, TaskState.PENDING, None, [], None), (1, TaskState.PENDING, None, [], None)]
    assert "member 0 FAILED" in (waiting.retry_reason or "")
    # The next attempt starts afresh: new member records, attempt 2.
    placed = GangPlacement("g", (Placement("g", "n2", (4, 5, 6, 7)), Placement("g", "n1", (4, 5, 6, 7))))
    assert gangs.reserve_gang(scripts, placed)[0] is GangReserveCode.OK
    m0 = task_hash(redis_client, keys, "g:m0")
    assert (m0["state"], m0["tag"], m0["node"]) == ("RESERVED", "g:m0.2", "n2") and "error" not in m0
    assert_pool_invariants(redis_client, keys)


def test_a_running_member_is_marked_to_stop_and_past_the_retries_the_gang_fails(
        scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys) -> None:
    reserved_gang(scripts, max_retries=0)
    tag0, tag1 = start(scripts, "g:m0", "n1"), start(scripts, "g:m1", "n2")
    scripts.finish("g:m1", "n2", tag1, "failed", "RuntimeError: rank 1")
    assert settle(scripts) is SettleCode.STOPPING
    m0 = task_hash(redis_client, keys, "g:m0")
    assert m0["state"] == "RUNNING" and m0["cancel_grace"] == str(GRACE_MS) and "cancel_at" in m0
    assert settle(scripts) is SettleCode.STOPPING  # still stopping: marked once, no change
    assert scripts.finish("g:m0", "n1", tag0, "failed", "Preempted")[1] == "CANCELLED"  # its worker stopped it
    assert settle(scripts) is SettleCode.FAILED
    g = task_hash(redis_client, keys, "g")
    assert g["state"] == "FAILED" and "member 1 FAILED" in g["error"] and "retry limit" in g["error"]
    assert all_free(redis_client, keys) and pending_ids(redis_client, keys) == []
    assert settle_all_empty(scripts)
    assert_pool_invariants(redis_client, keys)


def settle_all_empty(scripts: Scripts) -> bool:
    return gangs.settle_all(scripts, GRACE_MS) == {}


def test_a_member_whose_node_is_lost_is_never_requeued_alone(
        scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys, clock: ControlledClock) -> None:
    reserved_gang(scripts)
    start(scripts, "g:m0", "n1")
    clock.advance(LEASE_MS / 1000 / 2)
    scripts.heartbeat("n1", "inc-1", LEASE_MS)
    clock.advance(LEASE_MS / 1000 / 2 + 1)  # n2 (member 1, reserved) lost its lease; n1 lives
    assert scripts.reap() == ["n2"]
    m1 = task_hash(redis_client, keys, "g:m1")
    assert m1["state"] == "FAILED" and "gang member" in m1["error"]
    assert pending_ids(redis_client, keys) == []  # not requeued alone
    assert settle(scripts) is SettleCode.STOPPING
    assert "cancel_at" in task_hash(redis_client, keys, "g:m0")
    assert_pool_invariants(redis_client, keys)


def test_all_members_succeeded_the_gang_succeeded_with_rank_0s_result(
        scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys) -> None:
    reserved_gang(scripts)
    tags = [start(scripts, "g:m0", "n1"), start(scripts, "g:m1", "n2")]
    scripts.finish("g:m1", "n2", tags[1], "succeeded", '"rank 1"')
    assert settle(scripts) is SettleCode.RUNNING
    scripts.finish("g:m0", "n1", tags[0], "succeeded", '"rank 0"')
    assert settle(scripts) is SettleCode.SUCCEEDED
    g = task_hash(redis_client, keys, "g")
    assert (g["state"], g["result"]) == ("SUCCEEDED", '"rank 0"')
    assert all_free(redis_client, keys)
    assert_pool_invariants(redis_client, keys)


def test_a_cancelled_gang_leaves_the_set(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys) -> None:
    reserved_gang(scripts)
    assert scripts.cancel("g", "n1")[0].name == "CANCELLED"  # the gang's record (its members: Client.cancel)
    for member, node_id in (("g:m0", "n1"), ("g:m1", "n2")):
        scripts.cancel(member, node_id)
    assert settle(scripts) is SettleCode.NOT_LIVE
    assert all_free(redis_client, keys) and not redis_client.smembers(keys.gangs)
    assert_pool_invariants(redis_client, keys)


def test_a_preempted_gang_goes_back_whole_uncharged_and_its_next_members_know_the_count(
        scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys) -> None:
    """As a preempted task: requeued at its place, no retry charged (even at max_retries 0),
    `preemptions` counted; one member running, one only reserved, both stopped for "t"."""
    reserved_gang(scripts, max_retries=0)
    tag0 = start(scripts, "g:m0", "n1")
    assert scripts.preempt("g:m0", "n1", "t", GRACE_MS) is PreemptCode.STOPPING
    assert scripts.preempt("g:m1", "n2", "t", GRACE_MS) is PreemptCode.REQUEUED  # reserved: released, ended
    m1 = task_hash(redis_client, keys, "g:m1")
    assert m1["state"] == "CANCELLED" and m1["preempt_by"] == "t" and pending_ids(redis_client, keys) == []
    assert settle(scripts) is SettleCode.STOPPING  # m0 still running: told to stop (already is)
    assert scripts.finish("g:m0", "n1", tag0, "failed", "Preempted")[1] == "CANCELLED"
    assert settle(scripts) is SettleCode.REQUEUED
    g = task_hash(redis_client, keys, "g")
    assert (g["state"], g.get("retries", "0"), g["preemptions"], g["last_error"]) == ("PENDING", "0", "1", "preempted")
    assert pending_ids(redis_client, keys) == ["g"] and all_free(redis_client, keys)
    assert_pool_invariants(redis_client, keys)
    placed = GangPlacement("g", (Placement("g", "n1", (0, 1, 2, 3)), Placement("g", "n2", (0, 1, 2, 3))))
    assert gangs.reserve_gang(scripts, placed)[0] is GangReserveCode.OK
    assert task_hash(redis_client, keys, "g:m0")["preemptions"] == "1"  # max_preemptions counts the gang's


def test_a_member_that_failed_while_its_gang_was_preempted_charges_a_retry(
        scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys) -> None:
    reserved_gang(scripts, max_retries=1)
    tag0, tag1 = start(scripts, "g:m0", "n1"), start(scripts, "g:m1", "n2")
    assert scripts.preempt("g:m0", "n1", "t", GRACE_MS) is PreemptCode.STOPPING
    scripts.finish("g:m1", "n2", tag1, "failed", "RuntimeError: rank 1")  # its own failure, before any stop
    scripts.finish("g:m0", "n1", tag0, "failed", "Preempted")
    assert settle(scripts) is SettleCode.REQUEUED
    assert task_hash(redis_client, keys, "g")["retries"] == "1"
