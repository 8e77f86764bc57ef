"""Redis memory per pending task: how many pending tasks one Redis holds.

Submits ``--tasks`` probe tasks (a Celery-built message, no args) into a private redis-server
and prints the growth of ``used_memory`` per task, with ``MEMORY USAGE`` of one task hash and
the per-task share of the pool's pending zset and requests hash (docs/scaling.md).

    python -m bench.pending_memory [--tasks 20000]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import redis

from bench.dispatch import start_redis, submit_all
from broker.store.keys import PoolKeys
from broker.store.scripts import Scripts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=20_000)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        proc, port = start_redis(Path(workdir))
        try:
            client = redis.Redis(port=port)
            keys = PoolKeys("bench")
            before = int(client.info("memory")["used_memory"])
            submit_all(Scripts(client, keys), opts.tasks)
            after = int(client.info("memory")["used_memory"])
            one = client.zrange(keys.pending, 0, 0)[0].decode()
            task = int(client.memory_usage(keys.task(one), samples=0) or 0)
            pending = int(client.memory_usage(keys.pending, samples=0) or 0) / opts.tasks
            requests = int(client.memory_usage(keys.requests, samples=0) or 0) / opts.tasks
            print(f"{opts.tasks} pending tasks: used_memory grew {(after - before) / opts.tasks:.0f} bytes per task")
            print(f"MEMORY USAGE: task hash {task} B; pending zset {pending:.0f} B/task; requests hash "
                  f"{requests:.0f} B/task")
            per_task = (after - before) / opts.tasks
            print(f"=> about {2**30 / per_task / 1e6:.2f} million pending tasks per GiB of Redis memory")
        finally:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
