"""Submit throughput from one producer: plain Celery's ``apply_async`` beside ``Client.submit``
(one at a time) and ``Client.submit_many`` (batch), in one run on one private redis-server; and
Celery's own calls on a gpubroker app (``apply_async`` one at a time, and a ``group``, which goes
through the broker as one pipelined batch) beside plain Celery's ``group``.

No workers run: a submit is measured until its write is acknowledged. Plain Celery is an
ordinary Celery app with a Redis broker on the same redis-server (another database), sending
one no-op task per call (``task_send_sent_event`` off, Celery's default). The three are run in
interleaved repeats (A, B, C, A, B, C...), each on a flushed database, and the medians printed
with their ratios; issue 14's targets are single >= 1.0x apply_async and batch >= 10,000 tasks/s.

    python -m bench.submit [--single 1000] [--batch 10000] [--group 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis
from celery import Celery, group

from bench.dispatch import start_redis
from broker import Client
from broker.celery_conf import celery_settings
from broker.client import Submit
from broker.native.app import GpuCelery
from broker.settings import Settings
from broker.store.keys import PoolKeys
from broker.store.scripts import Scripts, wall_clock_ms

TASK = "bench.tasks.noop"


def noop(i: int) -> None:
    return None


def celery_calls(app: Celery) -> tuple[Callable[[int], float], Callable[[int], float]]:
    """Rates of ``n`` ``apply_async`` calls one at a time, and of a ``group`` of ``n``, on ``app``."""
    task = app.task(name=TASK)(noop)

    def single(n: int) -> float:
        t0 = time.perf_counter()
        for i in range(n):
            task.apply_async(args=[i])
        return n / (time.perf_counter() - t0)

    def grouped(n: int) -> float:
        signatures = [task.s(i) for i in range(n)]
        t0 = time.perf_counter()
        group(signatures).apply_async()
        return n / (time.perf_counter() - t0)

    task.apply_async(args=[-1])  # connect and declare before timing
    return single, grouped


def plain_celery(port: int) -> tuple[Callable[[int], float], Callable[[int], float]]:
    app = Celery("plain", broker=f"redis://127.0.0.1:{port}/1", set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"], broker_connection_retry_on_startup=False)
    return celery_calls(app)


def broker_app(settings: Settings) -> tuple[Callable[[int], float], Callable[[int], float]]:
    """A gpubroker Celery app (what ``workers.app`` configures): its calls go through the broker."""
    app = GpuCelery("bench", set_as_current=False)
    app.conf.update(celery_settings(settings))
    return celery_calls(app)


def broker_client(port: int) -> Client:
    settings = Settings(redis_url=f"redis://127.0.0.1:{port}/0", pool="bench")
    # One node that runs anything, so the submit-time fit check has a node to check against.
    Scripts(redis.Redis(port=port), PoolKeys(settings.pool), wall_clock_ms).register(
        "bench-node", "inc-1", 3_600_000, 8, 80 * 1024, 64_000, 512 * 1024, 8, {})
    client = Client(settings=settings)
    client.submit(TASK, args=[-1])  # connect, load the script, read the nodes before timing
    client.submit_many([Submit(task_name=TASK, args=[-1])])
    return client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--single", type=int, default=1000, help="tasks per one-at-a-time run")
    parser.add_argument("--batch", type=int, default=10_000, help="tasks per submit_many run")
    parser.add_argument("--group", type=int, default=1000, help="tasks per group")
    parser.add_argument("--repeats", type=int, default=3)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_redis(Path(tmp))
        try:
            (plain, plain_group), client = plain_celery(port), broker_client(port)
            ours, ours_group = broker_app(client.settings)
            flush = redis.Redis(port=port)
            runs: dict[str, Callable[[], float]] = {
                "celery apply_async": lambda: plain(opts.single),
                "celery group": lambda: plain_group(opts.group),
                "gpubroker apply_async": lambda: ours(opts.single),
                "gpubroker group": lambda: ours_group(opts.group),
                "Client.submit": lambda: opts.single / _timed(lambda: [client.submit(TASK, args=[i])
                                                                        for i in range(opts.single)]),
                "Client.submit_many": lambda: opts.batch / _timed(lambda: client.submit_many(
                    [Submit(task_name=TASK, args=[i]) for i in range(opts.batch)])),
            }
            rates: dict[str, list[float]] = {name: [] for name in runs}
            for _ in range(opts.repeats):
                for name, run in runs.items():
                    rates[name].append(run())
                    _forget_tasks(flush, client.keys)
            version = flush.info("server")["redis_version"]
            client.close()
        finally:
            proc.terminate()
            proc.wait()
    load = os.getloadavg()[0]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load {load:.1f} at the end, "
          f"redis-server {version}; {opts.repeats} interleaved repeats, medians (min-max)")
    medians = {name: statistics.median(r) for name, r in rates.items()}
    base = medians["celery apply_async"]
    for name, r in rates.items():
        print(f"  {name:<22} {medians[name]:>9,.0f} tasks/s ({min(r):,.0f}-{max(r):,.0f})  "
              f"{medians[name] / base:.2f}x apply_async")
    single, batch = medians["Client.submit"] / base, medians["Client.submit_many"]
    print(f"targets (issue 14): single >= 1.0x apply_async: {'met' if single >= 1.0 else 'NOT met'} ({single:.2f}x); "
          f"batch >= 10,000 tasks/s: {'met' if batch >= 10_000 else 'NOT met'} ({batch:,.0f}/s)")


def _forget_tasks(server: redis.Redis, keys: PoolKeys) -> None:
    """Empty both sides between runs (the node stays registered), so no run pays for a bigger Redis."""
    server.delete(*server.scan_iter(keys.task("*"), count=10_000), keys.pending, keys.requests, keys.mix)
    plain_db = redis.Redis(port=server.connection_pool.connection_kwargs["port"], db=1)
    plain_db.flushdb()
    plain_db.close()


def _timed(work: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    work()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
