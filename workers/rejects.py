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

``GuardedTransport`` catches the first kind before a message exists (nothing is in
``unacked`` yet); ``GuardedConsumer`` rejects the second kind (which removes it
from ``unacked``). What Celery already refuses by itself is counted through its
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


class RecordedQoS(kombu_redis.QoS):
    """kombu's bookkeeping of the messages a worker holds, where acking a message whose attempt
    finish.lua recorded costs no round trip: finish.lua removed its unacked entry already
    (``delivered`` in lua/_lib.lua), in the same script that recorded the outcome. The worker's
    main process names such a message (``recorded``) before it acks it; every other ack (an
    attempt that failed, a message dropped unrun) removes the entry as kombu does."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recorded: set[str] = set()

    def ack(self, delivery_tag: str) -> None:
        if delivery_tag in self.recorded:
            self.recorded.discard(delivery_tag)
            virtual.QoS.ack(self, delivery_tag)  # kombu's own accounting only (prefetch credit)
        else:
            super().ack(delivery_tag)


class GuardedChannel(native.Channel):
    QoS = RecordedQoS

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
