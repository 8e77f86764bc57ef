"""submit.lua against a real Redis: CREATED, DUPLICATE, ID_TAKEN, BAD_REQUEST, and the pending order."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis

from broker.errors import InvalidRequest
from broker.models import MAX_PRIORITY, Resources
from broker.store import records
from broker.store.keys import SEQ_BITS, PoolKeys
from broker.store.records import StoredRequest
from broker.store.scripts import Scripts, SubmitCode
from tests.invariants import (
    PROBE,
    pending_ids,
    pending_score,
    request_of,
    submission,
    submit_raw,
    submit_task,
    task_hash,
)


def test_created_writes_the_whole_task(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys) -> None:
    resources = Resources(gpus=0.5, gpu_memory_mb=8000, cpus=2, memory_mb=4096, labels={"zone": "eu"})
    _, stored, message = submission("t1", resources=resources, priority=7, tenant="lab", max_retries=2)
    wire = stored.text

    assert submit_raw(scripts, "t1", resources=resources, priority=7, tenant="lab",
                      max_retries=2) == (SubmitCode.CREATED, "t1")

    score = -7 * 2**SEQ_BITS + 1
    assert task_hash(redis_client, keys, "t1") == {
        "id": "t1", "name": PROBE, "tenant": "lab", "priority": "7", "state": "PENDING", "seq": "1",
        "score": str(score), "submitted_at": str(scripts.clock()), "req": wire, "message": message,
        "max_retries": "2", "retries": "0", "attempts": "0", "gpu_kind": "0,500", "result_ttl": "0"}
    assert redis_client.hgetall(keys.mix) == {b"0,500": b"1"}  # the request mix frag_aware learns from
    wire_fields = json.loads(wire)  # what reserve.lua reads from the stored request
    assert {k: wire_fields[k] for k in ("g", "m", "gm", "c", "r", "l")} == {
        "g": 0, "m": 500, "gm": 8000, "c": 2000, "r": 4096, "l": {"zone": "eu"}}
    assert pending_score(redis_client, keys, "t1") == score
    assert request_of(redis_client, keys, "t1") == wire
    assert redis_client.get(keys.seq) == b"1"
    assert redis_client.keys(keys.idempotency("*")) == []
    assert redis_client.zcard(keys.delayed) == redis_client.zcard(keys.expiring) == 0


def test_a_start_time_to_come_waits_in_delayed_and_an_expiry_is_timed(
        scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys) -> None:
    """countdown/ETA: the task holds nothing and is not in the queue the dispatcher reads."""
    now_s = scripts.clock() / 1000
    assert submit_raw(scripts, "later", not_before=now_s + 30, expires_at=now_s + 60) == (SubmitCode.CREATED, "later")
    assert submit_raw(scripts, "due", not_before=now_s - 1) == (SubmitCode.CREATED, "due")  # already due: queued

    assert pending_ids(redis_client, keys) == ["due"] and request_of(redis_client, keys, "later") is None
    assert redis_client.zscore(keys.delayed, "later") == (now_s + 30) * 1000
    assert redis_client.zscore(keys.expiring, "later") == (now_s + 60) * 1000
    t = task_hash(redis_client, keys, "later")
    assert (t["state"], t["not_before"], t["expires_at"]) == ("PENDING", str(int((now_s + 30) * 1000)),
                                                               str(int((now_s + 60) * 1000)))


def test_publishes_a_wake_up(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys) -> None:
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.wake)
    pubsub.get_message(timeout=1)  # the subscribe confirmation
    task_id = submit_task(scripts)
    message = pubsub.get_message(timeout=1)
    pubsub.close()
    # The task and its request, for the dispatcher's express placement (broker.express).
    assert message is not None
    assert message["data"] == f"submit\n{request_of(redis_client, keys, task_id)}\n{task_id}".encode()


def test_pending_order_is_priority_then_submit_order(scripts: Scripts, redis_client: redis.Redis,
                                                     keys: PoolKeys) -> None:
    priorities = {"low": -3, "mid-a": 0, "top-a": MAX_PRIORITY, "mid-b": 0, "top-b": MAX_PRIORITY,
                  "bottom": -MAX_PRIORITY}
    for task_id, priority in priorities.items():
        submit_task(scripts, task_id=task_id, priority=priority)

    assert pending_ids(redis_client, keys) == ["top-a", "top-b", "mid-a", "mid-b", "low", "bottom"]
    for seq, (task_id, priority) in enumerate(priorities.items(), start=1):
        # Scores reach 2**52: they must come back exact, not rounded by Lua's %.14g.
        assert pending_score(redis_client, keys, task_id) == -priority * 2**SEQ_BITS + seq
        assert task_hash(redis_client, keys, task_id)["score"] == str(-priority * 2**SEQ_BITS + seq)


def test_duplicate_idempotency_key_returns_the_first_task(scripts: Scripts, redis_client: redis.Redis,
                                                          keys: PoolKeys) -> None:
    first = submit_task(scripts, task_id="first", idempotency_key="job-42")
    assert redis_client.get(keys.idempotency("job-42")) == b"first"
    assert task_hash(redis_client, keys, "first")["idempotency_key"] == "job-42"

    assert submit_raw(scripts, "second", idempotency_key="job-42", priority=9) == (SubmitCode.DUPLICATE, first)

    assert not redis_client.exists(keys.task("second"))
    assert pending_ids(redis_client, keys) == ["first"]
    assert request_of(redis_client, keys, "second") is None
    assert redis_client.get(keys.seq) == b"1"


@pytest.mark.parametrize("idempotency_key", [None, "fresh-key"])
def test_id_taken_writes_nothing(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys,
                                 idempotency_key: str | None) -> None:
    submit_task(scripts, task_id="t1")
    before = task_hash(redis_client, keys, "t1")

    code = submit_raw(scripts, "t1", idempotency_key=idempotency_key, priority=5, tenant="other")

    assert code == (SubmitCode.ID_TAKEN, "t1")
    assert task_hash(redis_client, keys, "t1") == before
    assert pending_ids(redis_client, keys) == ["t1"]
    assert pending_score(redis_client, keys, "t1") == 1
    assert redis_client.get(keys.seq) == b"1"
    assert redis_client.keys(keys.idempotency("*")) == []  # the key stays free for a real submit


def test_survives_script_flush(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys) -> None:
    submit_task(scripts, task_id="t1")
    redis_client.script_flush()
    assert submit_raw(scripts, "t2") == (SubmitCode.CREATED, "t2")
    assert pending_ids(redis_client, keys) == ["t1", "t2"]


GOOD_WIRE = {"g": 0, "m": 0, "gm": 0, "c": 1000, "r": 0, "l": {}, "p": 0, "n": PROBE, "t": "default", "e": None,
             "x": None}


def wire_with(**changes: Any) -> str:
    return json.dumps({k: v for k, v in {**GOOD_WIRE, **changes}.items() if v != "<missing>"})


# What a producer could hand submit.lua itself (EVALSHA with its own ARGV), the submit field
# InvalidRequest names, and what the reason says.
MALFORMED = {
    "not JSON": ('{"g":1,', "request", "'req' not JSON"),
    "a JSON string": ('"g"', "request", "must be a JSON object"),
    "an empty object": ("{}", "resources.gpus", "'g' must be an integer from 0 to 1024 (got nothing)"),
    "gpus as a string": (wire_with(g="1"), "resources.gpus", "'g' must be an integer from 0 to 1024 (got a string)"),
    "fractional gpus": (wire_with(g=1.5), "resources.gpus", "'g' must be an integer"),
    "too many gpus": (wire_with(g=5000), "resources.gpus", "from 0 to 1024 (got 5000)"),
    "a share above one GPU": (wire_with(m=1001), "resources.gpus", "'m' must be an integer from 0 to 1000"),
    "whole GPUs and a share": (wire_with(g=1, m=500), "resources.gpus", "a share of one GPU goes with 0 whole"),
    "negative CPU": (wire_with(c=-1), "resources.cpus", "'c' must be an integer from 0"),
    "RAM missing": (wire_with(r="<missing>"), "resources.memory_mb", "'r' must be an integer"),
    "GPU memory as null": (wire_with(gm=None), "resources.gpu_memory_mb", "'gm' must be an integer"),
    "labels as a list": (wire_with(l=["gpu"]), "resources.labels", "must be an object of label -> value"),
    "a label value as a number": (wire_with(l={"gpu": 3}), "resources.labels", "label gpu must be a string"),
    "priority out of range": (wire_with(p=10**7), "priority", "'p' must be an integer from -1000000 to 1000000"),
    "task name as a number": (wire_with(n=7), "task_name", "'n' must be a string"),
    "no task name": (wire_with(n="<missing>"), "task_name", "'n' must be a string (got nothing)"),
    "tenant as an object": (wire_with(t={}), "tenant", "'t' must be a string"),
    "negative estimate": (wire_with(e=-5), "estimated_runtime_s", "'e' must be null or a number of seconds >= 0"),
    "preemptible as a string": (wire_with(x="yes"), "preemptible", "'x' must be true, false or null"),
    "min_gpus above gpus": (wire_with(g=4, mg=5), "resources.min_gpus", "'mg' must be an integer from 1 to g"),
    "min_gpus on a CPU task": (wire_with(mg=1), "resources.min_gpus", "'mg' must be an integer from 1 to g"),
}


@pytest.mark.parametrize(("text", "field", "reason"), MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_request_is_refused_naming_the_field_and_nothing_is_written(
        scripts: Scripts, redis_client: redis.Redis, text: str, field: str, reason: str) -> None:
    req, _stored, message = submission("t1")
    before = sorted(redis_client.keys("*"))

    with pytest.raises(InvalidRequest) as refused:
        scripts.submit("t1", req, message, StoredRequest(text, "0,0"))

    assert refused.value.fields == [field]
    assert reason in refused.value.problems[field] and "nothing was written" in refused.value.problems[field]
    assert sorted(redis_client.keys("*")) == before == []


def test_every_request_submit_lua_stores_is_one_the_dispatcher_reads(scripts: Scripts, redis_client: redis.Redis,
                                                                     keys: PoolKeys) -> None:
    """The Lua checks and records.decode_request agree on what they accept, in both directions."""
    accepted = [wire_with(), wire_with(l=[]), wire_with(g=8, gm=80_000, l={"gpu": ["H100", "A100"]}, p=-1_000_000),
                wire_with(m=250, e=12.5, x=True, t="<missing>"), wire_with(g=8, mg=2)]
    for i, text in enumerate(accepted):
        req, _stored, message = submission(f"t{i}")
        assert scripts.submit(f"t{i}", req, message, StoredRequest(text, "0,0"))[0] is SubmitCode.CREATED
        assert records.decode_request(request_of(redis_client, keys, f"t{i}") or "")
    for text, _field, _reason in MALFORMED.values():
        with pytest.raises(records.UnreadableRecord):
            records.decode_request(text)


BAD_MESSAGES = {
    "not JSON": ("{oops", "not a JSON object"),
    "an array": ("[1,2]", "headers and properties objects"),
    "no headers": ('{"body":"","properties":{"a":1}}', "headers and properties objects"),
    "another task's id": ('{"headers":{"id":"t2"},"properties":{"a":1}}', "another task id"),
    "properties not last": ('{"headers":{"id":"t1"},"properties":{"a":1},"body":"x"}', "close the document"),
    "empty properties": ('{"headers":{"id":"t1"},"properties":{}}', "close the document"),
    # A good message takes one decode, of its queued ending: these would pass that one alone.
    "trailing junk": ('{"headers":{"id":"t1"},"properties":{"a":1}}xy', "not a JSON object"),
    "another id, headers last": ('{"properties":{"a":1},"headers":{"id":"t2"}}', "another task id"),
    "properties not an object": ('{"properties":1,"headers":{"id":"t1"}}', "headers and properties objects"),
}


@pytest.mark.parametrize(("message", "reason"), BAD_MESSAGES.values(), ids=BAD_MESSAGES.keys())
def test_a_message_no_worker_could_read_is_refused_and_nothing_is_written(
        scripts: Scripts, redis_client: redis.Redis, message: str, reason: str) -> None:
    # reserve.lua would append the delivery tag to it and a worker would drop what it cannot
    # read, while the task held its reservation: such a message is never stored.
    req, stored, good = submission("t1")
    with pytest.raises(InvalidRequest) as refused:
        scripts.submit("t1", req, message, stored)
    assert refused.value.fields == ["message"]
    assert reason in refused.value.problems["message"] and "nothing was written" in refused.value.problems["message"]
    assert redis_client.keys("*") == []
    assert scripts.submit("t1", req, good, stored)[0] is SubmitCode.CREATED  # Celery's own message is fine
