"""Reserved tasks whose message is nowhere are queued again: lost with a connection, or in a failover.

reserve.lua pushes a reserved task's message onto the node queue in the same script that
reserves it; the worker's BRPOP then takes it, and holds it in memory until the task ends
(``workers.rejects.NodeQoS``: no copy in Redis). When the worker's connection is lost, Celery
drops what it held and not yet started; when the master is lost, the promoted replica (or a
restarted Redis that lost the tail of its AOF) may not have the message either. Either way
the task is RESERVED, holding capacity on a live node, with its message nowhere, and nothing
else would ever notice: the node keeps its lease, so the reaper never requeues it.

``RedeliverReserved`` runs redeliver.lua for this node when the consumer (re)connects (after
``workers.recovery.RedeliverUnacked``), queuing the stored message of each RESERVED task of
the node whose delivery tag is neither on the queue nor in the node's unacked hash (only an
older worker writes there): whatever the lost connection held. And then every ``INTERVAL_S``
from the consumer's own event loop, for what a failover lost while connected. A message this
worker holds (received, or handed to a pool process) is in neither place either until
start.lua marks the task RUNNING, so a periodic look queues only what the previous look also
found missing with the same tag (a held message does not wait ``INTERVAL_S`` to start). A
duplicate can only be dropped: start.lua lets exactly one delivery of an attempt's tag run
(the next one gets ALREADY_RUNNING, or STALE once the attempt ended, and is acknowledged unrun).
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import bootsteps

from broker.store.connection import as_broker_error
from workers import context

log = logging.getLogger(__name__)

#: Seconds between two looks while connected: one script call per node, reading its reserved tasks.
INTERVAL_S = 10.0


_suspects: list[str] = []  # "id:tag" of the reserved tasks the last periodic look found with no message


def redeliver_lost(confirm: list[str] | None = None) -> list[str]:
    """Queue again what this node holds RESERVED with no message anywhere (only the ``confirm``
    pairs still missing, when given); the task ids."""
    global _suspects
    ids, _suspects = context.scripts().redeliver(context.node_id(), confirm)
    if ids:
        log.warning("queued again the message of %d reserved task(s) found in no queue (a Redis failover or "
                    "restart lost it): %s", len(ids), ", ".join(ids[:10]))
    return ids


def _look(confirm: bool = True) -> None:
    try:
        redeliver_lost(list(_suspects) if confirm else None)
    except redis.RedisError as exc:  # Redis away: the consumer reconnects, and this runs again then
        log.warning("could not look for reserved tasks with a lost message: %s", as_broker_error(exc))


class RedeliverReserved(bootsteps.StartStopStep):
    """Consumer bootstep: after ``RedeliverUnacked``, before the event loop, and then periodically."""

    requires = ("workers.recovery:RedeliverUnacked",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.timer_ref: Any = None

    def start(self, c: Any) -> None:
        _look(confirm=False)  # (re)connected: whatever is missing now was lost
        self.timer_ref = c.timer.call_repeatedly(INTERVAL_S, _look)

    def stop(self, c: Any) -> None:
        if self.timer_ref is not None:
            self.timer_ref.cancel()
            self.timer_ref = None

    shutdown = stop
