"""Poison messages pushed straight onto a node queue, against a real dispatcher and worker.

Garbage bytes, truncated JSON, JSON that is no envelope, pickle-typed bodies (which would
run a command if unpickled), envelopes Celery cannot take apart, and well-formed messages
for a task the pool never had: each is dropped without being deserialised, logged and
counted in ``P rejected``; the worker keeps serving and no capacity leaks.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import redis

from broker import Client, Resources, TaskState
from broker.message import build_message
from broker.settings import Settings
from broker.store.keys import PoolKeys
from tests.invariants import assert_capacity_invariant
from tests.support import Processes, wait_until

pytestmark = pytest.mark.e2e

NODE = "n1"
PROBE = "workers.tasks.probe"


class RunsACommand:
    """Unpickling this runs ``touch <marker>``: the proof that a body was deserialised."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def envelope(queue: str, content_type: str, body: bytes, headers: dict[str, Any] | None, tag: str) -> bytes:
    """A kombu Redis-transport envelope, as any client could LPUSH it."""
    return json.dumps({
        "body": base64.b64encode(body).decode(), "content-encoding": "binary", "content-type": content_type,
        "headers": headers, "properties": {"delivery_tag": tag, "body_encoding": "base64", "delivery_mode": 2,
                                           "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0},
    }).encode()


def routed(message: str, queue: str, tag: str) -> bytes:
    """What reserve.lua pushes: Celery's message with routing and tag appended."""
    return (f'{message[:-2]},"delivery_info":{{"exchange":"","routing_key":{json.dumps(queue)}}},'
            f'"delivery_tag":{json.dumps(tag)}}}}}').encode()


def poison(queue: str, marker: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (what is pushed, what the worker's log must say about it)."""
    pickled = pickle.dumps(RunsACommand(marker))
    task_headers = {"lang": "py", "task": PROBE, "id": "evil-1", "argsrepr": "()", "kwargsrepr": "{}"}
    real = routed(build_message("ghost-1", PROBE, [], {}, 1 << 20), queue, "ghost-1.1")
    return {
        "garbage bytes": (b"\xff\xfe\x00\x9cgarbage\x00{", "unreadable queue item (JSONDecodeError"),
        "truncated JSON": (real[: len(real) // 2], "unreadable queue item (JSONDecodeError"),
        "JSON that is no envelope": (b"[1, 2, 3]", "a JSON list, not a message envelope"),
        "JSON nested past the parser's limit": (b"[" * 100_000, "unreadable queue item (RecursionError"),
        "envelope without a delivery tag": (b'{"body": "", "properties": {}}', "the envelope has no delivery tag"),
        "pickle task message": (envelope(queue, "application/x-python-serialize", pickled, task_headers, "evil-1.1"),
                                "ContentDisallowed: Refusing to deserialize untrusted content of type pickle"),
        "pickle without task headers": (envelope(queue, "application/x-python-serialize", pickled, {}, "evil-2.1"),
                                        "undecodable body (ContentDisallowed"),
        "JSON task message with a garbage body": (
            envelope(queue, "application/json", b"{{{", {**task_headers, "id": "bad-1"}, "bad-1.1"),
            "undecodable body (DecodeError"),
        "task message without an id": (
            envelope(queue, "application/json", b"[[], {}, {}]", {"lang": "py", "task": PROBE}, "noid.1"),
            "KeyError: 'id'"),
        "message that is not a task": (envelope(queue, "application/json", b"[[], {}, {}]", None, "nohdr.1"),
                                       "not a task message"),
        "unregistered task name": (
            envelope(queue, "application/json", b"[[], {}, {}]", {**task_headers, "task": "no.such.task",
                                                                   "id": "unk-1"}, "unk-1.1"),
            "task 'no.such.task' is not registered here"),
        "well-formed message for an unknown task id": (real, "message ghost-1.1 names unknown task ghost-1"),
    }


def rejected(client: redis.Redis, keys: PoolKeys) -> int:
    return int(client.hget(keys.rejected, NODE) or 0)


def test_poison_messages_are_dropped_unread_logged_counted_and_the_worker_keeps_serving(
        procs: Processes, settings: Settings, redis_client: redis.Redis, tmp_path: Path) -> None:
    keys, marker = PoolKeys(settings.pool), tmp_path / "unpickled"
    with Client(settings=settings) as client:
        procs.dispatcher()
        worker = procs.worker(NODE, "--gpus", "2", "--gpu-memory-mb", "1000", "--cpus", "2", "--slots", "2")
        wait_until(lambda: [n.state for n in client.nodes()] == ["up"], 30, what="the node to register")
        assert client.wait(client.submit(PROBE).id, 60).state is TaskState.SUCCEEDED  # it is consuming

        messages = poison(keys.queue(NODE), marker)
        for raw, _ in messages.values():
            redis_client.lpush(keys.queue(NODE), raw)
        wait_until(lambda: rejected(redis_client, keys) >= len(messages), 60, what="every poison message counted")

        assert worker.poll() is None, "the worker stopped"
        after = client.wait(client.submit(PROBE, kwargs={"seconds": 0.1}).id, 60)
        assert (after.state, after.node) == (TaskState.SUCCEEDED, NODE), after
        assert rejected(redis_client, keys) == len(messages), "each poison message is counted once"
        assert not marker.exists(), "a pickle body was deserialised"

        log = procs.log(f"worker-{NODE}")
        counted = [line for line in log.splitlines() if "rejected a message on node n1 without running it" in line]
        for name, (_, reason) in messages.items():
            assert any(reason in line for line in counted), f"{name}: no log line says {reason!r}"
        for task_id in ("evil-1", "evil-2", "bad-1", "noid", "nohdr", "unk-1", "ghost-1"):
            assert not redis_client.exists(keys.task(task_id)), f"a poison message created task {task_id}"

        # Nothing held, nothing left queued or unacknowledged.
        wait_until(lambda: not redis_client.hlen(keys.unacked(NODE)), 10, what="the unacked bookkeeping to drain")
        assert redis_client.llen(keys.queue(NODE)) == 0
        assert_capacity_invariant(redis_client, keys)
        (node,) = client.nodes()
        assert (node.tasks, node.free_slots, node.free_cpus) == (0, node.slots, node.cpus), node
        assert all(g.free_milli == 1000 and g.free_memory_mb == g.memory_mb for g in node.gpus), node.gpus


def test_a_task_whose_stored_message_no_worker_can_read_fails_and_frees_its_reservation(
        procs: Processes, settings: Settings, redis_client: redis.Redis) -> None:
    # submit.lua refuses such a message; one written into the record by hand (HSET) after the
    # submit still reaches the node. The worker drops it unread, and the task it reserved ends
    # FAILED with the reason instead of staying RESERVED with its GPU held.
    keys = PoolKeys(settings.pool)
    with Client(settings=settings) as client:
        procs.dispatcher()
        procs.worker(NODE, "--gpus", "2", "--gpu-memory-mb", "1000", "--cpus", "2", "--slots", "2")
        wait_until(lambda: [n.state for n in client.nodes()] == ["up"], 30, what="the node to register")
        task_id = client.submit(PROBE, resources=Resources(gpus=1), countdown=2).id
        headers = {"lang": "py", "task": PROBE, "id": task_id, "argsrepr": "()", "kwargsrepr": "{}"}
        spoiled = json.dumps({"body": base64.b64encode(b"{{{").decode(), "content-encoding": "utf-8",
                              "content-type": "application/json", "headers": headers,
                              "properties": {"body_encoding": "base64", "delivery_mode": 2, "priority": 0}})
        redis_client.hset(keys.task(task_id), "message", spoiled)

        done = client.wait(task_id, 60)
        assert done.state is TaskState.FAILED and done.started_at is None
        assert "its message could not be read on node n1: undecodable body" in (done.error or ""), done.error
        assert rejected(redis_client, keys) == 1
        (node,) = client.nodes()
        assert node.tasks == 0 and all(g.free_milli == 1000 for g in node.gpus), node
        assert client.wait(client.submit(PROBE, resources=Resources(gpus=2)).id, 60).state is TaskState.SUCCEEDED
        assert_capacity_invariant(redis_client, keys)
