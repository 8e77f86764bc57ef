"""The task base class and request class that tie Celery execution to reservations.

In the pool child (``GpuTask.__call__``): fence with start.lua, set
CUDA_VISIBLE_DEVICES to the reserved GPUs, run, and report the outcome through
finish.lua. In the worker's main process (``GpuRequest``): when the child never
got to report (hard time limit, the child killed), report for it. finish.lua is
fenced by the delivery tag, so whichever report comes second changes nothing.
While Redis is unreachable both retry with backoff (``through_outages``): a child
until Redis answers, the main process for up to ``PARENT_PATIENCE_S``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from billiard.exceptions import WorkerLostError
from celery import Task
from celery.exceptions import Ignore, Reject, Retry, TaskRevokedError, Terminated
from celery.signals import task_rejected, task_unknown
from celery.worker.request import Request

from broker.store.scripts import FinishCode, StartCode
from workers import context, rejects

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long the worker's main process retries a transition script while Redis is unreachable
# before it gives up on recording an outcome (it blocks the event loop meanwhile). A pool
# child has nothing else to do and waits for as long as it takes (patience None): the outcome
# of work that ran is not thrown away because Redis restarted.
PARENT_PATIENCE_S = 30.0
RETRY_CAP_S = 2.0

# Outcomes in the parent that mean "not a failure of this attempt": the fence refused
# the message, or the task was cancelled.
_NOT_OUTCOMES = (Ignore, Reject, Retry, Terminated, TaskRevokedError)


class Preempted(BaseException):
    """Raised inside a running task when the scheduler stops it for a more urgent one.

    The worker sends SIGTERM, waits the pool's ``preempt_grace_s``, then SIGKILLs. Catch it
    to save a checkpoint, then re-raise (or return): the task is requeued at its original
    place in line, without counting against its retries, and runs again from the start.
    A BaseException, like KeyboardInterrupt, so ``except Exception`` does not swallow it."""


def _raise_preempted(signum: int, frame: Any) -> None:
    raise Preempted("stopped by the scheduler for a more urgent task (SIGTERM)")


def encode_result(result: Any) -> str:
    try:
        return json.dumps(result, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"task result must be JSON-serialisable: {exc}") from None


def through_outages(call: Callable[[], T], what: str, patience_s: float | None) -> T:
    """``call()``, retried with backoff while Redis is unreachable, for up to ``patience_s``
    (None: until it answers). Every script is safe to repeat: a repeated start or finish of
    the same attempt is refused by its fence and changes nothing."""
    deadline = None if patience_s is None else time.monotonic() + patience_s
    delay = 0.05
    while True:
        try:
            return call()
        except redis.AuthenticationError:
            raise
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if deadline is not None and time.monotonic() + delay > deadline:
                raise
            log.warning("%s: Redis unreachable (%s); retrying in %.2fs", what, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, RETRY_CAP_S)


def report(task_id: str, tag: str | None, outcome: str, payload: str,
           patience_s: float | None = PARENT_PATIENCE_S) -> None:
    if not tag:
        log.error("task %s has no delivery tag; cannot report %s", task_id, outcome)
        return
    try:
        code, new_state = through_outages(
            lambda: context.scripts().finish(task_id, context.node_id(), tag, outcome, payload),
            f"reporting task {task_id} {outcome}", patience_s)
    except (redis.ConnectionError, redis.TimeoutError):
        if patience_s is None:
            raise
        log.error("could not record that task %s %s: Redis unreachable for %gs", task_id, outcome, patience_s)
        return
    if code is FinishCode.OK:
        log.info("task %s %s -> %s", task_id, outcome, new_state)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class GpuRequest(Request):
    """Runs in the worker's main process; reports outcomes the child could not."""

    acknowledged: bool  # Celery's, declared for mypy

    @property
    def delivery_tag(self) -> str | None:
        return (self.request_dict.get("properties") or {}).get("delivery_tag")

    def acknowledge(self) -> None:
        """Ack, unless the message came on a connection that has since been lost.

        Such a message cannot be acked (kombu's Redis transport raises AttributeError from
        the closed channel, which would stop the worker); workers.recovery already put it
        back on the queue at reconnect, and start.lua drops that copy.
        """
        if self.acknowledged:
            return
        channel = self.message.channel
        if channel is None or getattr(channel, "closed", False) or getattr(channel, "connection", True) is None:
            log.info("task %s: not acking message %s of a lost connection", self.id, self.delivery_tag)
        else:
            # The event loop runs the ack a moment later: if the connection drops in between,
            # the same AttributeError must not stop the worker either.
            self._on_ack(log, (*self._connection_errors, AttributeError))
        self.acknowledged = True

    def on_success(self, failed__retval__runtime: Any, **kwargs: Any) -> None:
        super().on_success(failed__retval__runtime, **kwargs)
        failed, retval, _ = failed__retval__runtime
        if not failed:
            try:
                report(self.id, self.delivery_tag, "succeeded", encode_result(retval))
            except TypeError as exc:
                report(self.id, self.delivery_tag, "failed", str(exc))

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> None:
        exc = getattr(exc_info.exception, "exc", exc_info.exception)
        try:
            super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
        finally:
            if isinstance(exc, WorkerLostError):
                report(self.id, self.delivery_tag, "lost", _describe(exc))
            elif not isinstance(exc, _NOT_OUTCOMES):
                report(self.id, self.delivery_tag, "failed", _describe(exc))

    def on_timeout(self, soft: bool, timeout: float) -> None:
        super().on_timeout(soft, timeout)
        if not soft:
            report(self.id, self.delivery_tag, "failed", f"TimeLimitExceeded: hard time limit ({timeout}s)")


class GpuTask(Task):
    """Base of every task on a gpubroker worker (``task_cls`` of ``workers.app.app``)."""

    Request = GpuRequest

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.request.called_directly:
            return self.run(*args, **kwargs)
        task_id = self.request.id
        tag = (self.request.properties or {}).get("delivery_tag")
        code, gpus = through_outages(lambda: context.scripts().start(task_id, context.node_id(), tag or ""),
                                     f"starting task {task_id}", None)
        if code is not StartCode.OK:
            # A redelivered, stale or cancelled message: never run it (invariant 4).
            log.warning("dropping message %s of task %s: %s", tag, task_id, code.name)
            if code is StartCode.NOT_FOUND:  # no task in the pool sent it: a poison message
                rejects.count(f"message {tag} names unknown task {task_id}")
            raise Ignore()
        os.environ["CUDA_VISIBLE_DEVICES"] = context.visible_devices(gpus)
        previous = signal.signal(signal.SIGTERM, _raise_preempted)
        try:
            result = self.run(*args, **kwargs)
            payload = encode_result(result)
        except BaseException as exc:
            report(task_id, tag, "failed", _describe(exc), patience_s=None)
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
        report(task_id, tag, "succeeded", payload, patience_s=None)
        return result


@task_unknown.connect
def _unknown_task(sender: Any = None, message: Any = None, name: str = "", id: str = "", **_: Any) -> None:
    """A task name this worker does not know would otherwise hold its reservation forever."""
    tag = (message.properties or {}).get("delivery_tag") if message is not None else None
    rejects.count(f"task {name!r} is not registered here")
    report(id, tag, "failed", f"NotRegistered: task {name!r} is not registered on node {context.node_id()}")


@task_rejected.connect
def _rejected(sender: Any = None, message: Any = None, exc: BaseException | None = None, **_: Any) -> None:
    """Celery refused a message unread: not a task message, or a content type other than JSON."""
    rejects.count(f"{type(exc).__name__}: {exc}" if exc is not None else "not a task message")
