"""Poison records written straight into Redis, against a real dispatcher and worker.

An older producer, or someone with ``HSET``, can leave a pending task whose stored request the
dispatcher cannot read (not JSON, ``{}``, a count as a string, a label of the wrong type), a queue
entry with no task behind it, or a node hash with a field that is no number. Before, the first
of these made the dispatcher exit, and exit again on every restart: nothing was scheduled for
anyone. Now each bad task ends FAILED with a reason naming the field (or, with no task to end,
its queue entry is dead-lettered), the bad node is left out, every good task runs, the
dispatcher keeps its pid, the metric counts them, and ``gpubroker status`` shows the reason.
"""

from __future__ import annotations

import json
import urllib.request

import pytest
import redis
from typer.testing import CliRunner

from broker import Client, Resources, TaskState
from broker.message import build_message
from broker.settings import Settings
from broker.store.keys import PoolKeys
from tests.invariants import assert_capacity_invariant
from tests.support import Processes, free_port, wait_until
from workers.cli import app

pytestmark = pytest.mark.e2e

NODE = "n1"
PROBE = "workers.tasks.probe"
#: task id -> (its stored request, what its FAILED error must name)
POISON = {
    "poison-not-json": ('{"g":1,"m":', "field 'req': not JSON"),
    "poison-empty": ("{}", "field 'g': must be an integer from 0 to 1024 (got nothing)"),
    "poison-gpus-string": ('{"g":"1","m":0,"gm":0,"c":0,"r":0,"l":{},"p":5,"n":"workers.tasks.probe","t":"default"}',
                           "field 'g': must be an integer from 0 to 1024 (got a string)"),
    "poison-label-number": ('{"g":0,"m":0,"gm":0,"c":0,"r":0,"l":{"gpu":3},"p":5}',
                            "field 'l': label 'gpu' must be a string or a list of strings"),
}


def write_old_record(client: redis.Redis, keys: PoolKeys, task_id: str, request: str, priority: int = 5) -> None:
    """A pending task as submit.lua writes one, but with ``request`` as it is: HSET and ZADD."""
    seq = int(client.incr(keys.seq))
    score = -priority * 2**32 + seq
    client.hset(keys.task(task_id), mapping={
        "id": task_id, "name": PROBE, "tenant": "default", "priority": priority, "state": "PENDING", "seq": seq,
        "score": score, "req": request, "message": build_message(task_id, PROBE, [], {}, 1 << 20),
        "max_retries": 0, "retries": 0, "attempts": 0, "submitted_at": 1, "gpu_kind": "0,0", "result_ttl": 0})
    client.zadd(keys.pending, {task_id: score})
    client.hset(keys.requests, task_id, request)


def write_bad_node(client: redis.Redis, keys: PoolKeys, node_id: str) -> None:
    """A live-looking node whose GPU count is no number."""
    client.sadd(keys.nodes, node_id)
    client.hset(keys.node(node_id), mapping={"id": node_id, "state": "up", "incarnation": "x", "registered_at": 1,
                                             "cap_gpus": "lots", "gpu_mem": 1000, "cap_cpu_m": 8000,
                                             "cap_mem": 1000, "cap_slots": 4, "free_cpu_m": 8000, "free_mem": 1000,
                                             "free_slots": 4})
    client.zadd(keys.leases, {node_id: 2**52})


def quarantined(port: int, record: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    line = f'gpubroker_quarantined_total{{pool="test",record="{record}"}} '
    return next((float(x.removeprefix(line)) for x in text.splitlines() if x.startswith(line)), 0.0)


def test_poison_records_are_quarantined_and_every_good_task_still_runs(
        procs: Processes, settings: Settings, redis_client: redis.Redis) -> None:
    keys, port = PoolKeys(settings.pool), free_port()
    with Client(settings=settings) as client:
        dispatcher = procs.spawn("dispatcher", "dispatcher", "--log-level", "INFO", "--metrics-port", str(port))
        procs.worker(NODE, "--gpus", "2", "--gpu-memory-mb", "1000", "--cpus", "4", "--slots", "4")
        wait_until(lambda: [n.state for n in client.nodes()] == ["up"], 30, what="the node to register")

        write_bad_node(redis_client, keys, "n-bad")
        good = [client.submit(PROBE, resources=Resources(gpus=1)).id for _ in range(3)]
        for task_id, (request, _reason) in POISON.items():
            write_old_record(redis_client, keys, task_id, request)  # ahead of the good ones (priority 5)
        redis_client.zadd(keys.pending, {"poison-no-record": 0})  # a queue entry with no task behind it
        redis_client.hset(keys.requests, "poison-no-record", "{}")
        good += [client.submit(PROBE, resources=Resources(gpus=0.5), priority=9).id for _ in range(3)]

        for task_id in good:
            status = client.wait(task_id, 60)
            assert (status.state, status.node) == (TaskState.SUCCEEDED, NODE), status
        for task_id, (_request, reason) in POISON.items():
            status = client.wait(task_id, 30)
            assert status.state is TaskState.FAILED and reason in (status.error or ""), status
            shown = CliRunner().invoke(app, ["status", task_id, "--redis-url", settings.redis_url, "--pool",
                                             settings.pool])
            assert shown.exit_code == 0 and "unreadable request, quarantined" in shown.output, shown.output
            assert reason.split(":")[0] in shown.output.replace("\n", " ")
        letter = json.loads(redis_client.hget(keys.deadletter, "poison-no-record") or b"{}")
        assert letter.get("found") == "state missing" and "field 'g'" in letter["reason"]
        assert redis_client.zcard(keys.pending) == 0 and redis_client.hlen(keys.requests) == 0

        assert dispatcher.poll() is None, "the dispatcher exited"
        assert quarantined(port, "task") == len(POISON) + 1
        assert quarantined(port, "node") == 1
        log = procs.log("dispatcher")
        assert "Traceback" not in log, log
        assert log.count("node n-bad left out of scheduling: its hash cannot be read (field 'cap_gpus'") == 1
        nodes = {n.id: n.state for n in client.nodes()}
        assert nodes[NODE] == "up" and nodes["n-bad"].startswith("unreadable (field 'cap_gpus'")

        redis_client.delete(keys.node("n-bad"))  # the invariant check reads every node hash
        redis_client.srem(keys.nodes, "n-bad")
        redis_client.zrem(keys.leases, "n-bad")
        assert_capacity_invariant(redis_client, keys)
