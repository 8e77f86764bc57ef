"""Celery's task-sent event, built without publishing it (issue 14, single submit).

``send_task`` publishes the task, then its task-sent event through kombu's fanout: two round
trips per submit, the second through a Redis client kombu builds per publish. ``Client.submit``
builds the event here and submit.lua publishes it once the task is created, in the same call:
one round trip, and no event for a submit that created nothing (an idempotency key already
taken). The event is what Celery's ``EventDispatcher`` sends for a producer, byte for byte in
structure (kombu's fanout envelope on ``/<db>.<event_exchange>/task.sent``, a base64 JSON body
with the producer's hostname, pid, Lamport clock and the task's repr fields), so Flower and any
``app.events.Receiver`` read it as Celery's own; ``tests/test_client.py`` checks that with one.
"""

from __future__ import annotations

import base64
import os
import time
import uuid
from typing import Any

from celery import Celery
from celery.utils.nodenames import anon_nodename
from celery.utils.time import utcoffset
from kombu.utils.json import dumps

ROUTING_KEY = "task.sent"


class SentEvents:
    """One app's task-sent events: on when the app sends them (``task_send_sent_event``)."""

    def __init__(self, app: Celery, db: int) -> None:
        self.enabled = bool(app.conf.task_send_sent_event)
        self.exchange = app.conf.event_exchange
        self.channel = f"/{db}.{self.exchange}/{ROUTING_KEY}"  # kombu's fanout topic on Redis
        self.hostname = anon_nodename()  # what a producer's EventDispatcher calls itself
        self.clock = app.clock
        self.queue = app.amqp.default_queue.name if app.amqp.default_queue else "celery"

    def build(self, headers: dict[str, Any]) -> tuple[str, str] | None:
        """(channel, payload) of the task-sent event for a task with these Celery headers; None
        when the app sends none."""
        if not self.enabled:
            return None
        fields = {"hostname": self.hostname, "utcoffset": utcoffset(), "pid": os.getpid(),
                  "clock": self.clock.forward(), "uuid": headers["id"], "root_id": headers["root_id"],
                  "parent_id": headers["parent_id"], "name": headers["task"], "args": headers["argsrepr"],
                  "kwargs": headers["kwargsrepr"], "retries": headers["retries"], "eta": headers["eta"],
                  "expires": headers["expires"], "queue": self.queue, "exchange": "", "routing_key": self.queue,
                  "timestamp": time.time(), "type": "task-sent"}
        envelope = {
            "body": base64.b64encode(dumps(fields).encode()).decode(), "content-encoding": "utf-8",
            "content-type": "application/json", "headers": {"hostname": self.hostname},
            "properties": {"delivery_mode": 1, "delivery_info": {"exchange": self.exchange, "routing_key": ROUTING_KEY},
                           "priority": 0, "body_encoding": "base64", "delivery_tag": str(uuid.uuid4())},
        }
        return self.channel, dumps(envelope)
