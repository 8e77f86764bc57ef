"""Tasks sent past the broker: a Celery producer without the project's settings pushes onto a
Celery queue of this Redis (``celery`` unless its ``task_default_queue`` says otherwise), which
no worker reads. The dispatcher takes them in (``Settings.ingest_queues``), now and then, through
the same submit path, so they run as if sent through the broker, with the defaults their task
names registered. One that cannot be submitted (a task name no node runs, bad resources) gets a
FAILURE result naming why, which the producer's ``AsyncResult`` raises: never a silent no-op.

Each message is removed only once it has been submitted; two dispatchers may both submit it, which
submit.lua makes harmless (the task id is the message's own).
"""

from __future__ import annotations

import json
import logging
import time
from typing import cast

import redis

from broker.errors import GpuBrokerError
from broker.native.backend import record_failure
from broker.native.messages import BadMessage, task_message
from broker.native.submitter import Submitter
from broker.settings import Settings
from broker.store.scripts import Clock, wall_clock_ms

log = logging.getLogger(__name__)

BATCH = 100  # messages read per queue per turn
BUCKETS = ("", "\x06\x163", "\x06\x166", "\x06\x169")  # kombu's priority buckets of a Redis queue


class Ingest:
    def __init__(self, settings: Settings, client: redis.Redis, clock: Clock = wall_clock_ms) -> None:
        self.settings = settings
        self.redis = client
        self.submitter = Submitter(settings, client, clock)
        self._last = float("-inf")

    def maybe(self) -> int:
        """Take in what waits, at most every ``reap_interval_s``; how many tasks were submitted."""
        if not self.settings.ingest_queues or time.monotonic() - self._last < self.settings.reap_interval_s:
            return 0
        self._last = time.monotonic()
        return sum(self._take(queue + bucket) for queue in self.settings.ingest_queues for bucket in BUCKETS)

    def _take(self, key: str) -> int:
        raw = cast(list[bytes], self.redis.lrange(key, -BATCH, -1))
        taken = 0
        for item in reversed(raw):  # the oldest first (producers LPUSH)
            taken += self._one(key, item)
            self.redis.lrem(key, -1, item)  # type: ignore[arg-type]  # redis-py takes bytes as well
        return taken

    def _one(self, key: str, item: bytes) -> int:
        try:
            task = task_message(json.loads(item))
        except (ValueError, BadMessage) as exc:
            log.warning("dropped an item of Celery queue %s that is not a task message: %s", key, exc)
            return 0
        if task is None:
            log.warning("dropped an item of Celery queue %s that is not a task message", key)
            return 0
        try:
            self.submitter.submit_message(task)
        except GpuBrokerError as exc:
            log.warning("task %s (%s) sent to Celery queue %s past the broker cannot run: %s", task.id, task.name,
                        key, exc)
            record_failure(self.redis, self.submitter.keys, task.id, type(exc).__name__, str(exc),
                           self.settings.result_expires_s)
            return 0
        log.info("took in task %s (%s) from Celery queue %s: its producer does not use gpubroker's Celery "
                 "settings (broker.celery_conf)", task.id, task.name, key)
        return 1
