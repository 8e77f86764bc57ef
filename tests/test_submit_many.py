"""Client.submit_many against a real Redis: the same records as submit, in order, validated
first (a refusal names the index and field and writes nothing), idempotency keys, timers."""

from __future__ import annotations

import gc
import json
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis

from broker import Client, InvalidRequest, Resources, Unsatisfiable
from broker.client import Submit
from broker.errors import NotRegistered
from broker.native.submitter import BATCH_CHUNK
from broker.settings import Settings
from broker.store.scripts import Scripts, wall_clock_ms
from tests.conftest import Clock
from tests.test_client import dump


@pytest.fixture
def client(settings: Settings) -> Iterator[Client]:
    with Client(settings=settings) as c:
        yield c


@pytest.fixture
def two_nodes(scripts: Scripts, clock: Clock) -> None:
    """As tests/test_client.py's: 4 A100s and 8 H100s, on wall time (the client's clock)."""
    clock.now_ms = wall_clock_ms()
    scripts.register("a100", "inc-a", 3_600_000, 4, 40 * 1024, 16_000, 128 * 1024, 8, {"gpu_model": "A100"})
    scripts.register("h100", "inc-h", 3_600_000, 8, 80 * 1024, 64_000, 512 * 1024, 8, {"gpu_model": "H100"})


VOLATILE = (b"id", b"submitted_at", b"seq", b"score", b"not_before", b"expires_at")


def record(redis_client: redis.Redis, client: Client, task_id: str) -> dict[bytes, Any]:
    """A task's record less what differs between two submits of the same request (its id, times,
    place in the queue); the message with its id and times blanked."""
    h = redis_client.hgetall(client.keys.task(task_id))
    message = json.loads(h.pop(b"message").decode().replace(task_id, "ID"))
    for key in ("eta", "expires"):
        message["headers"][key] = message["headers"][key] is not None
    return {k: v for k, v in h.items() if k not in VOLATILE} | {b"message": message}


REQUESTS: list[dict[str, Any]] = [
    {"task_name": "workers.tasks.probe"},
    {"task_name": "workers.tasks.probe", "args": [1, "two"], "kwargs": {"x": [3.5, None]}, "priority": 7,
     "tenant": "team-a", "resources": Resources(gpus=2, labels={"gpu_model": "H100"}), "estimated_runtime_s": 60,
     "max_retries": 1, "preemptible": True},
    {"task_name": "workers.tasks.probe", "resources": {"gpus": 0.5, "gpu_memory_mb": 1024}, "priority": -3},
    {"task_name": "workers.tasks.probe", "countdown": 30, "expires": 600},
    {"task_name": "workers.tasks.probe", "eta": datetime.now(UTC) + timedelta(minutes=5),
     "expires": datetime.now(UTC) + timedelta(hours=1)},
]


@pytest.mark.parametrize("request_", REQUESTS)
def test_a_batch_stores_each_task_exactly_as_submit_does(client: Client, redis_client: redis.Redis,
                                                         two_nodes: None, request_: dict[str, Any]) -> None:
    one = client.submit(**request_)
    [many] = client.submit_many([request_])
    assert many.created and many.id != one.id
    assert record(redis_client, client, many.id) == record(redis_client, client, one.id)
    for field in ("not_before", "expires_at"):
        a, b = (redis_client.hget(client.keys.task(h.id), field) for h in (one, many))
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            assert abs(int(a) - int(b)) < 2000  # ms: the two submits ran a moment apart


def test_handles_come_back_in_order_and_the_queue_keeps_it(client: Client, two_nodes: None) -> None:
    n = BATCH_CHUNK + 7  # more than one round trip
    handles = client.submit_many([Submit(task_name="workers.tasks.probe", args=[i]) for i in range(n)])
    assert len(handles) == n and all(h.created for h in handles)
    assert [e.id for e in client.queue()] == [h.id for h in handles]


def gang_record(redis_client: redis.Redis, client: Client, gang_id: str) -> dict[bytes, Any]:
    """``record`` of a gang: each member's message with the gang's id blanked too."""
    h = redis_client.hgetall(client.keys.task(gang_id))
    messages = {k: json.loads(v.decode().replace(gang_id, "ID")) for k, v in h.items() if k.startswith(b"message:")}
    return {k: v for k, v in h.items() if k not in VOLATILE and k not in messages} | messages


def test_a_gang_in_a_batch_is_stored_as_submit_stores_it_in_its_place(client: Client, redis_client: redis.Redis,
                                                                      two_nodes: None) -> None:
    gang = {"task_name": "workers.tasks.probe", "resources": Resources(gpus=4), "replicas": 3, "tenant": "team-a"}
    one = client.submit(**gang)
    single = Submit(task_name="workers.tasks.probe")
    first, many, last = client.submit_many([single, Submit(**gang, spread=False), single])
    assert gang_record(redis_client, client, many.id) == gang_record(redis_client, client, one.id)
    assert redis_client.hget(client.keys.task(many.id), "replicas") == b"3"
    assert [e.id for e in client.queue()] == [one.id, first.id, many.id, last.id]
    status = client.status(many.id)
    assert status.members is not None and len(status.members) == 3


def test_an_elastic_gang_in_a_batch_keeps_its_minimum(client: Client, redis_client: redis.Redis,
                                                     two_nodes: None) -> None:
    (gang,) = client.submit_many([Submit(task_name="workers.tasks.probe", resources=Resources(gpus=4), replicas=8,
                                         min_replicas=2)])
    assert json.loads(redis_client.hget(client.keys.task(gang.id), "req") or b"")["mk"] == 2


@pytest.mark.parametrize(
    ("bad", "field", "error"),
    [
        ({"task_name": "workers.tasks.probe", "priority": 10**9}, "requests[2].priority", InvalidRequest),
        ({"task_name": "workers.tasks.probe", "resources": Resources(gpus=16)}, "requests[2].resources.gpus",
         Unsatisfiable),
        ({"task_name": "workers.tasks.probe", "resources": {"gpus": -1}}, "requests[2].resources.gpus",
         InvalidRequest),
        ({"task_name": "workers.tasks.probe", "args": "not a list"}, "requests[2].args", InvalidRequest),
        ({"task_name": "workers.tasks.probe", "args": [object()]}, "requests[2].args", InvalidRequest),
        ({"task_name": "workers.tasks.probe", "colour": "red"}, "requests[2].colour", InvalidRequest),
        ({"args": [1]}, "requests[2].task_name", InvalidRequest),
        ({"task_name": "no such name"}, "requests[2].task_name", InvalidRequest),
        ({"task_name": "workers.tasks.probe", "kwargs": {"blob": "x" * (2 << 20)}}, "requests[2].kwargs",
         InvalidRequest),
        ({"task_name": "workers.tasks.probe", "countdown": "soon"}, "requests[2].countdown", InvalidRequest),
        ({"task_name": "workers.tasks.probe", "resources": Resources(gpus=4), "replicas": 4},
         "requests[2].replicas", Unsatisfiable),
        ({"task_name": "workers.tasks.probe", "resources": Resources(gpus=4), "replicas": 8, "min_replicas": 5},
         "requests[2].min_replicas", Unsatisfiable),
        ({"task_name": "workers.tasks.probe", "replicas": 2, "min_replicas": 3}, "requests[2].min_replicas",
         InvalidRequest),
    ],
)
def test_one_bad_request_refuses_the_batch_naming_it_and_nothing_is_written(
        client: Client, redis_client: redis.Redis, two_nodes: None, bad: dict[str, Any], field: str,
        error: type[InvalidRequest]) -> None:
    good = {"task_name": "workers.tasks.probe", "idempotency_key": "k"}
    before = dump(redis_client)
    with pytest.raises(error) as caught:
        client.submit_many([good, dict(good, idempotency_key="k2"), bad, good])
    assert field in caught.value.problems, caught.value.problems
    assert dump(redis_client) == before


def test_idempotency_keys_within_and_across_batches(client: Client, two_nodes: None) -> None:
    first = client.submit("workers.tasks.probe", idempotency_key="run-1")
    handles = client.submit_many([{"task_name": "workers.tasks.probe", "idempotency_key": "run-1"},
                                  {"task_name": "workers.tasks.probe", "idempotency_key": "run-2"},
                                  {"task_name": "workers.tasks.probe", "idempotency_key": "run-2"},
                                  {"task_name": "workers.tasks.probe"}])
    assert [h.created for h in handles] == [False, True, False, True]
    assert handles[0].id == first.id and handles[2].id == handles[1].id
    again = client.submit_many([Submit(task_name="workers.tasks.probe", idempotency_key="run-2")])
    assert again[0].id == handles[1].id and not again[0].created
    assert client.submit("workers.tasks.probe", idempotency_key="run-2").id == handles[1].id
    assert len(client.queue()) == 3


def test_countdown_waits_and_expires_is_kept(client: Client, redis_client: redis.Redis, two_nodes: None) -> None:
    later, soon = client.submit_many([Submit(task_name="workers.tasks.probe", countdown=60),
                                      Submit(task_name="workers.tasks.probe", expires=30)])
    assert redis_client.zscore(client.keys.delayed, later.id) is not None
    assert [e.id for e in client.queue()] == [soon.id]
    assert redis_client.zscore(client.keys.expiring, soon.id) is not None


def test_not_registered_keeps_its_class_and_names_the_index(client: Client, scripts: Scripts, clock: Clock) -> None:
    clock.now_ms = wall_clock_ms()
    scripts.register("cpu", "inc-c", 3_600_000, 0, 0, 4000, 1024, 4, {}, tasks={"workers.tasks.other": "{}"})
    with pytest.raises(NotRegistered) as caught:
        client.submit_many([{"task_name": "workers.tasks.other"}, {"task_name": "workers.tasks.probe"}])
    assert list(caught.value.problems) == ["requests[1].task_name"]
    assert caught.value.task_name == "workers.tasks.probe"


def test_an_empty_batch_writes_nothing(client: Client, redis_client: redis.Redis) -> None:
    before = dump(redis_client)
    assert client.submit_many([]) == []
    assert dump(redis_client) == before


def test_a_batch_after_redis_forgot_its_scripts_is_written_once(client: Client, redis_client: redis.Redis,
                                                                 two_nodes: None) -> None:
    client.submit_many([{"task_name": "workers.tasks.probe"}])
    redis_client.script_flush()  # as after a Redis restart
    handles = client.submit_many([{"task_name": "workers.tasks.probe", "args": [i]} for i in range(3)])
    assert [e.id for e in client.queue()][1:] == [h.id for h in handles]


def test_the_fast_task_repr_is_celerys_saferepr() -> None:
    """argsrepr/kwargsrepr take a fast path (repr) for plain, shallow, short values: on random
    values, at the nesting and size limits and past them, it must print what saferepr prints."""
    from celery.utils.saferepr import saferepr

    from broker.native.envelope import task_repr

    rng = random.Random(22)

    def value(depth: int) -> Any:
        kind = rng.randrange(9 if depth < 6 else 5)
        if kind < 5:
            return rng.choice([0, -7, 2**70, 3.5, -0.0, 1e300, True, None, "", "é'\"\\x", "it's", 'q"', "a\nb",
                               "\u2028", "é", "y" * rng.randrange(600)])
        size = rng.randrange(4)
        if kind == 5:
            return [value(depth + 1) for _ in range(size)]
        if kind == 6:
            return tuple(value(depth + 1) for _ in range(size))
        if kind == 7:
            return {f"k{i}": value(depth + 1) for i in range(size)}
        return {i: value(depth + 1) for i in range(size)}  # non-str keys: saferepr's own path

    shared = [1]
    cyclic: list[Any] = [1]
    cyclic.append(cyclic)
    specials = [[[[1]]], [[[[1]]]], {"a": {"b": {"c": {}}}}, [shared, [[shared]]], cyclic, "x" * 2000, ()]
    for item in specials + [value(0) for _ in range(3000)]:
        for maxsize, levels in ((1024, 3), (64, 1), (4096, 5)):
            assert task_repr(item, maxsize, levels) == saferepr(item, maxsize, maxlevels=levels), (item, maxsize)


def test_batch_encoding_is_the_redis_protocol_of_each_argument() -> None:
    """A batch encodes each submit.lua call with the arguments it repeats encoded once: every call
    must still be byte for byte what encoding each argument would give (1, True and 1.0 included)."""
    from broker.native.submitter import _evalsha
    from broker.store.connection import bulk, encode_command

    head = b"*6\r\n" + bulk(b"EVALSHA") + bulk(b"abc") + bulk(b"1")
    encoded: dict[Any, bytes] = {}
    for arguments in ((1, "1", "key"), (True, 1.0, "key"), ("x" * 300, -1, "")):
        expected = encode_command(b"EVALSHA", b"abc", b"1", *(str(a).encode() for a in arguments))
        assert _evalsha(head, encoded, arguments) == expected


def test_the_envelope_template_prints_what_json_prints() -> None:
    """A batch fills a template of the stored envelope per task name instead of encoding the
    whole document; with a before_task_publish receiver (which may change anything) the document
    is encoded. On random tasks the two must be byte for byte equal."""
    from celery import Celery, signals

    from broker.native.envelope import Envelopes

    rng = random.Random(14)
    values = [0, -7, 2**70, 3.5, True, None, "", "é'\"\\x", "a\nb", "\u2028", "{x}", "}{", "\x00", [1, {"k": [2]}]]
    when = datetime(2026, 12, 3, 14, 0, tzinfo=UTC)
    cases = [(f"t-{i}", rng.choice(["workers.tasks.probe", "a.b_c.D9", "x"]),
              [rng.choice(values) for _ in range(rng.randrange(4))],
              {f"k{j}": rng.choice(values) for j in range(rng.randrange(3))},
              rng.choice([None, 0, 5, -1_000_000]), None, rng.choice([None, when]),
              rng.choice([None, when + timedelta(hours=1)]), rng.choice([None, True, False])) for i in range(400)]
    envelopes = Envelopes(Celery("t", set_as_current=False))
    filled = [envelopes.build(*case).stored for case in cases]

    def receiver(**_: Any) -> None:
        return None

    signals.before_task_publish.connect(receiver)
    try:
        encoded = [envelopes.build(*case).stored for case in cases]
    finally:
        signals.before_task_publish.disconnect(receiver)
    assert any(envelopes._templates.values())  # the first pass did take the template
    for case, fast, slow in zip(cases, filled, encoded, strict=True):
        assert fast == slow, case


def test_a_batch_of_many_round_trips_after_redis_forgot_its_scripts(client: Client, redis_client: redis.Redis,
                                                                     two_nodes: None) -> None:
    """Each round trip is sent before the next is encoded: the first answers NOSCRIPT while it is
    in flight, is sent again once the script is loaded, and the next follow in order."""
    client.submit_many([{"task_name": "workers.tasks.probe"}])
    redis_client.script_flush()
    many = [Submit(task_name="workers.tasks.probe", args=[i]) for i in range(2 * BATCH_CHUNK + 3)]
    handles = client.submit_many(many)
    assert all(h.created for h in handles)
    assert [e.id for e in client.queue()][1:] == [h.id for h in handles]


def test_a_batch_stores_requests_of_one_shape_alike() -> None:
    """A batch encodes the stored request once per shape of request (submitter._SHAPED fields and
    the resources): every SubmitRequest field is classed as shaping it or not, and those that do
    not, do not change it."""
    from broker.models import SubmitRequest
    from broker.native import submitter
    from broker.store.records import StoredRequest

    assert set(SubmitRequest.model_fields) == {*submitter._SHAPED, *submitter._UNSHAPED, "resources"}
    assert set(Resources.model_fields) == {*submitter._RESOURCES_SCALARS, "labels"}  # all in _resources_key
    plain = SubmitRequest(task_name="workers.tasks.probe")
    unshaped = SubmitRequest(task_name="workers.tasks.probe", args=[1], kwargs={"x": [2]}, idempotency_key="k",
                             max_retries=0, not_before=5.0, expires_at=9.0)
    assert StoredRequest.of(plain) == StoredRequest.of(unshaped)


def test_the_garbage_collector_is_paused_for_a_batch_and_back_after_it_even_on_a_refusal(
        client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []
    admit = client._admit
    monkeypatch.setattr(client, "_admit", lambda request: seen.append(gc.isenabled()) or admit(request))
    assert gc.isenabled()
    client.submit_many([Submit(task_name="workers.tasks.probe")])
    assert seen == [False] and gc.isenabled()
    with pytest.raises(InvalidRequest):
        client.submit_many([Submit(task_name="workers.tasks.probe"),
                            {"task_name": "workers.tasks.probe", "priority": "high"}])
    assert gc.isenabled()
    gc.disable()  # a caller that runs without it keeps it off
    try:
        client.submit_many([Submit(task_name="workers.tasks.probe")])
        assert not gc.isenabled()
    finally:
        gc.enable()
