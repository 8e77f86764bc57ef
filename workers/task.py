"""The task base class and request class that tie Celery execution to reservations.

In the pool child (``GpuTask.__call__``): fence with start.lua, set
CUDA_VISIBLE_DEVICES to the reserved GPUs, run, and report the outcome through
finish.lua. In the worker's main process (``GpuRequest``): when the child never
got to report (hard time limit, the child killed, a Redis hiccup in the child),
report for it. finish.lua is fenced by the delivery tag, so whichever report
comes second changes nothing.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from billiard.exceptions import WorkerLostError
from celery import Task
from celery.exceptions import Ignore, Reject, Retry, TaskRevokedError, Terminated
from celery.signals import task_unknown
from celery.worker.request import Request

from broker.scripts import FinishCode, StartCode
from workers import context

log = logging.getLogger(__name__)

# Outcomes in the parent that mean "not a failure of this attempt": the fence refused
# the message, or the task was cancelled.
_NOT_OUTCOMES = (Ignore, Reject, Retry, Terminated, TaskRevokedError)


def encode_result(result: Any) -> str:
    try:
        return json.dumps(result, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"task result must be JSON-serialisable: {exc}") from None


def report(task_id: str, tag: str | None, outcome: str, payload: str) -> None:
    if not tag:
        log.error("task %s has no delivery tag; cannot report %s", task_id, outcome)
        return
    code, new_state = context.scripts().finish(task_id, context.node_id(), tag, outcome, payload)
    if code is FinishCode.OK:
        log.info("task %s %s -> %s", task_id, outcome, new_state)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class GpuRequest(Request):
    """Runs in the worker's main process; reports outcomes the child could not."""

    @property
    def delivery_tag(self) -> str | None:
        return (self.request_dict.get("properties") or {}).get("delivery_tag")

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
        code, gpus = context.scripts().start(task_id, context.node_id(), tag or "")
        if code is not StartCode.OK:
            # A redelivered, stale or cancelled message: never run it (invariant 4).
            log.warning("dropping message %s of task %s: %s", tag, task_id, code.name)
            raise Ignore()
        os.environ["CUDA_VISIBLE_DEVICES"] = context.visible_devices(gpus)
        try:
            result = self.run(*args, **kwargs)
            payload = encode_result(result)
        except BaseException as exc:
            report(task_id, tag, "failed", _describe(exc))
            raise
        report(task_id, tag, "succeeded", payload)
        return result


@task_unknown.connect
def _unknown_task(sender: Any = None, message: Any = None, name: str = "", id: str = "", **_: Any) -> None:
    """A task name this worker does not know would otherwise hold its reservation forever."""
    tag = (message.properties or {}).get("delivery_tag") if message is not None else None
    report(id, tag, "failed", f"NotRegistered: task {name!r} is not registered on node {context.node_id()}")
