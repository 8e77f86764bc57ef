"""Surviving a lost Redis connection: the worker reconnects and nothing it held is stranded.

When the broker connection drops, Celery throws away the messages it had received but
not yet started (``Consumer.on_close``) and relies on kombu to put them back. kombu does
that in two ways, neither of which works here:

- when it closes the channel (``restore_unacked_once``): Redis is usually the thing that
  is down, and with Celery 5.7 / kombu 5.7 the transport is detached before the channel
  is closed, so the restore raises ``AttributeError`` and the whole worker exits
  ("Unrecoverable error") instead of reconnecting;
- after the visibility timeout, which is 30 days on purpose (long tasks must not be
  redelivered; the node lease is the recovery path).

Meanwhile the node stays alive and keeps its lease, so the reaper never frees those
reservations: the tasks would sit RESERVED forever. ``RedeliverUnacked`` closes the gap:
it turns kombu's restore-on-close off, and every time the consumer (re)connects, before
the event loop takes the first message, it puts every message in this node's own unacked
hash back on the node queue. Each of them belongs to a channel that is gone, and putting
them back is safe because start.lua fences every delivery: a task still running gets
ALREADY_RUNNING, a finished one STALE (both dropped unrun), and a reserved one runs.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps

log = logging.getLogger(__name__)


class RedeliverUnacked(bootsteps.StartStopStep):
    """Consumer bootstep; runs after the task consumer is set up and before the event loop."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        channel = c.connection.default_channel  # the channel the task consumer reads from
        channel.do_restore = False
        tags = channel.client.zrange(channel.unacked_index_key, 0, -1)
        for tag in tags:
            channel.qos.restore_by_tag(tag, client=channel.client)
        if tags:
            log.warning("put %d unacknowledged message(s) of a lost connection back on the node queue; "
                        "start.lua drops those whose task is running or done", len(tags))
