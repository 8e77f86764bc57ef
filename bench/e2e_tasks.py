"""The no-op tasks ``bench.e2e`` runs: the same body on a gpubroker node and on a plain Celery worker.

Each returns the wall-clock time its body started, so the producer can measure submit -> start.
The plain Celery app reads its broker from ``BENCH_PLAIN_URL`` (results on the same database),
with Celery's defaults otherwise: no task events unless a monitor asks, processes reused unless
``--max-tasks-per-child`` says otherwise.
"""

from __future__ import annotations

import os
import time

from celery import Celery

from workers.app import app

plain = Celery("plain", broker=os.environ.get("BENCH_PLAIN_URL", "redis://127.0.0.1:6379/1"),
               backend=os.environ.get("BENCH_PLAIN_URL", "redis://127.0.0.1:6379/1"), set_as_current=False)
plain.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                  broker_connection_retry_on_startup=True, task_acks_late=True, worker_prefetch_multiplier=1)


@app.task(name="bench.e2e.noop")
def noop(i: int = 0) -> float:
    return time.time()


@plain.task(name="bench.e2e.noop")
def plain_noop(i: int = 0) -> float:
    return time.time()
