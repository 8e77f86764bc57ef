"""The load and the ledger of ``bench.compose_check``, run INSIDE a container of the stack
(``docker compose exec -T dispatcher python - MODE ...`` with this file on stdin), so it talks to
Redis over the compose network with the stack's own URL and image.

    submit N RATE   submit up to N probe tasks at RATE a second (until the file STOP_FILE exists),
                    each with an idempotency key, retrying a submit that meets Redis down with the
                    same key; prints one JSON line a task
    verify TIMEOUT  read task ids (one a line) from stdin, wait until each is final, and print one
                    JSON object: states, attempts, nodes, the finished index, node capacity

Standard library and gpubroker only: the image has nothing else.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections import Counter

from broker import Client
from broker.errors import BrokerUnavailable
from broker.models import Resources

TASK = "workers.tasks.probe"
STOP_FILE = "/tmp/compose-check-stop"


def submit(n: int, rate: float) -> None:
    rng = random.Random(15)
    client = Client()
    start = time.time()
    for i in range(n):
        time.sleep(max(0.0, start + i / rate - time.time()))
        if os.path.exists(STOP_FILE):
            break
        key = f"compose-check-{start:.0f}-{i}"
        gpus = rng.choice((1, 1, 2))
        seconds = round(rng.uniform(2, 6), 1)
        tries = 0
        while True:
            tries += 1
            try:
                handle = client.submit(TASK, kwargs={"seconds": seconds}, resources=Resources(gpus=gpus),
                                       idempotency_key=key)
                break
            except BrokerUnavailable as exc:  # Redis restarting: the same key again, never a second task
                if tries > 120:
                    raise
                print(json.dumps({"retry": key, "error": str(exc)[:120]}), flush=True)
                time.sleep(0.5)
        print(json.dumps({"id": handle.id, "key": key, "created": handle.created, "tries": tries,
                          "at": time.time()}), flush=True)


def verify(timeout: float) -> None:
    ids = [line.strip() for line in sys.stdin if line.strip()]
    client = Client()
    deadline = time.time() + timeout
    while True:
        statuses = [client.status(task_id) for task_id in ids]
        if all(s.state.is_final for s in statuses) or time.time() > deadline:
            break
        time.sleep(2)
    finished = [row.id for row in client.tasks(state=["finished", "failed", "cancelled"], limit=100_000)]
    wanted = set(ids)
    nodes = []
    for node in client.nodes():
        nodes.append({"id": node.id, "state": node.state, "draining": node.draining, "tasks": node.tasks,
                      "gpus": len(node.gpus), "free_gpus": node.free_gpus,
                      "slots": node.slots, "free_slots": node.free_slots,
                      "cpus": node.cpus, "free_cpus": node.free_cpus,
                      "memory_mb": node.memory_mb, "free_memory_mb": node.free_memory_mb})
    print(json.dumps({
        "tasks": len(ids),
        "distinct": len(wanted),
        "states": dict(Counter(str(s.state) for s in statuses)),
        "attempts": dict(Counter(str(s.attempts) for s in statuses)),
        "ran_on": dict(Counter(str(s.node) for s in statuses)),
        "result_node_matches": sum(1 for s in statuses
                                   if isinstance(s.result, dict) and s.result.get("node") == s.node),
        "finished_index": {"entries": sum(1 for i in finished if i in wanted),
                           "distinct": len(wanted & set(finished))},
        "runs": [{"id": s.id, "node": s.node, "started_at": s.started_at, "finished_at": s.finished_at}
                 for s in statuses],
        "nodes": nodes,
    }), flush=True)


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "submit":
        submit(int(args[0]), float(args[1]))
    elif mode == "verify":
        verify(float(args[0]))
    else:
        sys.exit(f"unknown mode {mode!r}")
