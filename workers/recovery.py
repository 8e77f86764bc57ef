"""Surviving a lost Redis connection: the worker reconnects and nothing it held is stranded.

When the broker connection drops, Celery throws away the messages it had received but not
yet started (``Consumer.on_close``) and relies on kombu to put them back, from the copies its
Redis transport keeps in an unacked hash: when it closes the channel (with Celery 5.7 / kombu
5.7 the transport is detached first, so that restore raised ``AttributeError`` and the whole
worker exited, "Unrecoverable error", instead of reconnecting), or after the visibility
timeout (30 days on purpose: long tasks must not be redelivered).

A worker here keeps no such copies (``workers.rejects.NodeQoS``): what the lost connection held
are RESERVED tasks of this node whose message is nowhere, and ``workers.redeliver`` queues
them again from their records when the consumer (re)connects. ``RedeliverUnacked`` runs just
before it: it turns kombu's restore-on-close off, and puts back what is in this node's unacked
hash, which only a worker of an earlier version (one that kept copies) or a consumer set up
by hand writes, so that an upgrade strands nothing either. Every copy put back is safe because
start.lua fences every delivery: a task still running gets ALREADY_RUNNING, a finished one
STALE (both dropped unrun), and a reserved one runs.
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
