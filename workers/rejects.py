"""Poison messages on a node queue: dropped unread, logged, counted; the worker keeps serving.

A node queue should hold only the messages reserve.lua pushed. Anything else that
lands there (bytes that are not JSON, JSON that is not a kombu envelope, a
pickle-typed body, a message Celery cannot take apart) is dropped without being
deserialised, logged, and counted in ``P rejected`` (field = node id).

Stock kombu and Celery get several of these wrong, which is why this module exists:

- a list item that is not JSON, or JSON that is not an envelope, raises out of
  kombu's ``_brpop_read`` and Celery stops the worker ("Unrecoverable error:
  JSONDecodeError"): one bad LPUSH takes the node down;
- a protocol-2 envelope without an ``id`` header raises KeyError in Celery's
  Request, which kombu's Redis transport counts as a connection error: the
  consumer reconnects, restores the message from ``unacked``, reads it again, forever.

``GuardedTransport`` catches the first kind before a message exists (kombu holds
nothing yet); ``GuardedConsumer`` rejects the second kind and ends its task FAILED (so
``workers.redeliver`` does not queue it again). What Celery already refuses by itself is counted through its
hooks: ``on_decode_error`` here, ``task_rejected`` / ``task_unknown`` in
``workers.task``. A forged message never changes the task it names: only the
fenced scripts do that, for the attempt that holds the reservation.
"""

from __future__ import annotations

import logging
from queue import Empty
from typing import Any

import redis
from celery.worker.consumer import Consumer
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from vine import promise

from broker.native import transport as native
from broker.store.scripts import FinishCode
from workers import context

log = logging.getLogger(__name__)

# Errors of the connection itself, not of the message: let kombu and Celery reconnect.
IO_ERRORS = (OSError, redis.ConnectionError, redis.TimeoutError)


def count(reason: str, tag: Any = None) -> None:
    """Count one refused message for this node (callers log the detail); never stops the worker.
    With the message's delivery tag (``<task id>.<attempt>``), the task it reserved ends FAILED
    with the reason, rather than holding its capacity for ever: finish.lua fences on the tag, so
    a stale or forged copy under another tag changes nothing."""
    log.warning("rejected a message on node %s without running it: %s", context.node_id(), reason)
    scripts = context.scripts()
    try:
        scripts.redis.hincrby(scripts.keys.rejected, context.node_id(), 1)
        if isinstance(tag, str) and "." in tag:
            task_id = tag.rpartition(".")[0]
            code, state = scripts.finish(task_id, context.node_id(), tag, "failed",
                                         f"its message could not be read on node {context.node_id()}: {reason}",
                                         incarnation=context.incarnation())
            if code is FinishCode.OK:
                log.error("task %s: its message %s could not be read -> %s", task_id, tag, state)
    except redis.RedisError:
        log.warning("could not count a rejected message", exc_info=True)


def envelope_problem(payload: Any) -> str | None:
    """Why ``payload`` is not an envelope kombu can file under ``unacked``; None when it is."""
    if not isinstance(payload, dict):
        return f"a JSON {type(payload).__name__}, not a message envelope"
    properties = payload.get("properties")
    if not isinstance(properties, dict):
        return "the envelope has no properties object"
    if not isinstance(properties.get("delivery_tag"), str):
        return "the envelope has no delivery tag"
    if not isinstance(properties.get("delivery_info"), dict):
        return "the envelope has no delivery_info object"
    return None


class NodeQoS(kombu_redis.QoS):
    """kombu's bookkeeping of the messages a worker holds, kept in the worker's memory only.

    kombu's Redis transport copies every message it takes into an unacked hash (a round trip
    before the task reaches a pool process) and removes it at the ack (another, after): it puts
    those copies back on the queue when a consumer's visibility timeout passes or its channel
    closes. Neither is how a node's messages are recovered here. A message is the reservation of
    a RESERVED task on this node (the task's record keeps it); a running task's node lease is its
    recovery path (the reaper). A reserved task whose message is neither on the node queue nor
    held is queued again from its record by ``workers.redeliver`` (at every (re)connect: what the
    lost connection held; and periodically: what a failover lost), and start.lua lets exactly one
    delivery of an attempt run. So a copy would only cost two round trips per task on the path
    from one task to the next. A message handed back (``Reject(requeue=True)``) is pushed back on
    the node queue from memory, first in line, marked redelivered as kombu marks it."""

    def append(self, message: Any, delivery_tag: str) -> None:
        virtual.QoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        message = self._delivered.get(delivery_tag)
        if requeue and message is not None:
            delivery = message.delivery_info
            with self.channel.conn_or_acquire() as client:
                pipe = client.pipeline()
                self.channel._do_restore_message(message._raw, delivery["exchange"], delivery["routing_key"],
                                                  pipe, leftmost=True)
                pipe.execute()
        virtual.QoS.ack(self, delivery_tag)

    def restore_unacked(self, client: Any = None) -> None:
        """A closing channel's messages: queued again from their tasks' records at the next connect."""
        self._delivered.clear()

    def restore_visible(self, *args: Any, **kwargs: Any) -> None:
        """No copies, so nothing whose visibility timeout passed (long tasks are never redelivered)."""


class GuardedChannel(native.Channel):
    QoS = NodeQoS

    def _brpop_read(self, **options: Any) -> bool:
        try:
            return bool(super()._brpop_read(**options))
        except (Empty, *IO_ERRORS, redis.RedisError):  # Empty: BRPOP timed out, the normal idle path
            raise
        except Exception as exc:  # the popped item could not become a message: it is gone, count it
            log.exception("dropped an unreadable item from a node queue")
            count(f"unreadable queue item ({type(exc).__name__}: {str(exc)[:200]})")
            return True


class GuardedSentinelChannel(GuardedChannel, native.SentinelChannel):
    """GuardedChannel on kombu's Sentinel transport (a ``redis+sentinel://`` URL)."""


class GuardedTransport(native.Transport):
    """The broker's transport (``broker.native.transport``), minus the ways one bad queue item
    stops the worker."""

    Channel = GuardedChannel

    def _deliver(self, message: Any, queue: str) -> None:
        problem = envelope_problem(message)
        if problem is not None:
            log.error("dropped a queue item from %s: %s", queue, problem)
            properties = message.get("properties") if isinstance(message, dict) else None
            count(problem, properties.get("delivery_tag") if isinstance(properties, dict) else None)
            return
        if (message.get("headers") or {}).get("redelivered"):  # requeued by Reject: as kombu's restore says
            message["properties"]["delivery_info"]["redelivered"] = True
        super()._deliver(message, queue)


class GuardedConsumer(Consumer):
    """Celery's consumer; a message Celery cannot take apart is rejected, not retried forever."""

    def create_task_handler(self, promise: Any = promise) -> Any:
        handle = super().create_task_handler(promise)

        def on_task_received(message: Any) -> Any:
            try:
                return handle(message)
            except IO_ERRORS:
                raise
            except Exception as exc:
                log.exception("message %s is not a task message this worker can read", message.delivery_tag)
                message.reject_log_error(log, self.connection_errors)
                count(f"{type(exc).__name__}: {str(exc)[:200]}", message.delivery_tag)
                return None

        return on_task_received

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        super().on_decode_error(message, exc)  # logs it and acks it
        count(f"undecodable body ({type(exc).__name__}: {str(exc)[:200]})", message.delivery_tag)


class GuardedSentinelTransport(GuardedTransport, native.SentinelTransport):
    Channel = GuardedSentinelChannel
