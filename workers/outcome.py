"""Recording an attempt's outcome: the result as Celery's serializer writes it, and finish.lua
called through Redis outages (workers.task's pool children and the worker's main process)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from kombu.utils import json as kombu_json

from broker.store.connection import as_broker_error, transient
from broker.store.scripts import FinishCode
from workers import context

log = logging.getLogger("workers.task")
T = TypeVar("T")

# How long the worker's main process retries a transition script while Redis is unreachable
# before it gives up on recording an outcome (it blocks the event loop meanwhile). A pool
# child has nothing else to do and waits for as long as it takes (patience None): the outcome
# of work that ran is not thrown away because Redis restarted.
PARENT_PATIENCE_S = 30.0
RETRY_CAP_S = 2.0


def encode_result(result: Any, backend: Any = None, ignored: bool = False) -> str:
    """The result as Celery's JSON serializer writes it: an AsyncResult or GroupResult as its
    tuple, datetimes, UUIDs and Decimals tagged so that AsyncResult.get gives them back. With
    ``ignore_result`` (the task's or the call's) none is kept: the record says SUCCEEDED, and
    ``get`` gives None, as Celery's does."""
    if ignored:
        return "null"
    try:
        value = backend.prepare_value(result) if backend is not None else result
        return str(kombu_json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"task result must be JSON-serialisable: {exc}") from None


def through_outages(call: Callable[[], T], what: str, patience_s: float | None) -> T:
    """``call()``, retried with backoff while Redis is unreachable or refuses for a while (full,
    a replica, loading, busy: ``connection.transient``), for up to ``patience_s`` (None: until it
    answers). Every script is safe to repeat: a repeated start or finish of the same attempt is
    refused by its fence and changes nothing."""
    deadline = None if patience_s is None else time.monotonic() + patience_s
    delay = 0.05
    while True:
        try:
            return call()
        except redis.RedisError as exc:
            if not transient(exc) or (deadline is not None and time.monotonic() + delay > deadline):
                raise
            log.warning("%s: Redis unavailable (%s); retrying in %.2fs", what, as_broker_error(exc), delay)
            time.sleep(delay)
            delay = min(delay * 2, RETRY_CAP_S)


def as_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


def report(task_id: str, tag: str | None, outcome: str, payload: str, detail: str = "",
           not_before: float | None = None, patience_s: float | None = PARENT_PATIENCE_S) -> str | None:
    """Record an attempt's outcome through finish.lua; the task's state afterwards (None when not recorded)."""
    if not tag:
        log.error("task %s has no delivery tag; cannot report %s", task_id, outcome)
        return None
    try:
        code, new_state = through_outages(
            lambda: context.scripts().finish(task_id, context.node_id(), tag, outcome, payload, detail, not_before,
                                             context.incarnation()),
            f"reporting task {task_id} {outcome}", patience_s)
    except redis.RedisError as exc:
        if patience_s is None or not transient(exc):
            raise
        log.error("could not record that task %s %s: %s, for %gs", task_id, outcome, as_broker_error(exc),
                  patience_s)
        return None
    if code is FinishCode.OK:
        log.info("task %s %s -> %s", task_id, outcome, new_state)
        return new_state
    return None
