"""The task base class and request class that tie Celery execution to reservations.

In the pool child (``GpuTask.__call__``): fence with start.lua, set CUDA_VISIBLE_DEVICES to the
reserved GPUs, run, and report the outcome through finish.lua. In the worker's main process
(``GpuRequest``): when the child never got to report (hard time limit, the child killed), report
for it. finish.lua is fenced by the delivery tag, so whichever report comes second changes
nothing. While Redis is unreachable both retry with backoff (``through_outages``): a child
until Redis answers, the main process for up to ``PARENT_PATIENCE_S``.

What Celery sees of an attempt that does not end the task: ``self.retry()`` ends the attempt as
a retry (its new message waits out its countdown in the broker, holding nothing); a preempted
attempt, or one whose process was lost and is requeued, shows as a retry (``task-retried``),
never as a failure; a cancelled one as revoked.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import traceback
from typing import Any, TypeVar, cast

from billiard.einfo import ExceptionWithTraceback
from billiard.exceptions import WorkerLostError
from celery.app.task import get_actual_ignore_result
from celery.exceptions import Ignore, Reject, Retry, TaskRevokedError, Terminated
from celery.signals import task_rejected, task_unknown
from celery.worker.request import Request

from broker.errors import InvalidRequest
from broker.native.app import BrokerTask
from broker.native.submitter import Submitter
from broker.native.transport import OwnMessage
from broker.store.scripts import StartCode
from workers import affinity, context, gang, log_files, logs, rejects, warm
from workers.fence import Watchdog, watch
from workers.outcome import as_text, encode_result, report, through_outages
from workers.unit import Unit, alive
from workers.warm import ThisProcess

log = logging.getLogger(__name__)
T = TypeVar("T")

# Outcomes in the parent that mean "not a failure of this attempt": the fence refused
# the message, the task was cancelled, or the child reported it already.
_NOT_OUTCOMES = (Ignore, Reject, Retry, Terminated, TaskRevokedError)


class Preempted(BaseException):
    """Raised inside a running task when it must stop: the scheduler preempts it for a more
    urgent task, or it was cancelled (revoked with terminate).

    The worker sends SIGTERM, waits the grace period, then SIGKILLs. Catch it to save a
    checkpoint, then re-raise (or return): a preempted task is requeued at its original place
    in line, without counting against its retries, and runs again from the start.
    A BaseException, like KeyboardInterrupt, so ``except Exception`` does not swallow it."""


def _raise_preempted(signum: int, frame: Any) -> None:
    raise Preempted("stopped by the scheduler for a more urgent task, or cancelled (SIGTERM)")


def _redelivered(message: str) -> str:
    """``message`` with ``headers.redelivered`` set: the worker's transport shows it in
    ``request.delivery_info['redelivered']`` (``workers.rejects.GuardedTransport``)."""
    envelope = json.loads(message)
    envelope["headers"] = {**(envelope.get("headers") or {}), "redelivered": True}
    envelope["properties"] = envelope.pop("properties")  # last: reserve.lua appends to it
    return json.dumps(envelope, separators=(",", ":"))


def _started_here(task_id: str) -> bool:
    """Did this very process start ``task_id`` (start.lua records the pid of the attempt's process)?"""
    scripts = context.scripts()
    return as_text(scripts.redis.hget(scripts.keys.task(task_id), "pid")) == str(os.getpid())


def _orphaned(task_id: str) -> bool:
    """Is the process start.lua recorded for ``task_id``'s running attempt on this node gone? (It
    was killed before the worker learnt it ran that attempt, so no WorkerLostError reports it.)"""
    scripts = context.scripts()
    pid, node = (as_text(v) for v in scripts.redis.hmget(scripts.keys.task(task_id), "pid", "node"))
    return node == context.node_id() and pid.isdigit() and not alive(int(pid))


def _end_unit(unit: Unit, watchdog: Watchdog, capture: logs.Capture) -> None:
    """The attempt's code is done: every process it started goes before its outcome is recorded
    (which releases its capacity). A SIGTERM from now on (a stop that came late) must not break
    off the report; SIGKILL still ends it, and the handler is restored once it is recorded. Its
    log's last part is kept with the task now, while the attempt still holds it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    watchdog.stop()
    unit.end_here()
    capture.end()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _exception(task: Any, exc: BaseException, tb: str | None) -> str:
    """The exception as AsyncResult will raise it (Celery's own encoding), with its traceback."""
    try:
        encoded = task.backend.prepare_exception(exc)
    except (TypeError, ValueError):  # an exception whose args cannot be encoded: its text will do
        encoded = {"exc_type": type(exc).__name__, "exc_module": type(exc).__module__, "exc_message": [str(exc)]}
    return json.dumps({**encoded, "traceback": tb}, default=str)


class GpuRequest(Request):
    """Runs in the worker's main process; reports outcomes the child could not."""

    acknowledged: bool  # Celery's, declared for mypy

    @property
    def delivery_tag(self) -> str | None:
        return (self.request_dict.get("properties") or {}).get("delivery_tag")

    def send_event(self, type_: str, **fields: Any) -> None:
        """Celery's task events, with where the task runs on its task-started event (Flower shows it)."""
        if type_ == "task-started":
            placed = (self.request_dict.get("properties") or {}).get("gpubroker") or {}
            fields.update(node=context.node_id(), gpus=placed.get("gpus"), tenant=placed.get("tenant"))
        super().send_event(type_, **fields)

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

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> None:
        exc = exc_info.exception  # what the task raised (a Retry stays a Retry, with or without its exc)
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        if isinstance(exc, WorkerLostError) and context.replaced():
            # This worker process was replaced under its node id and killed its children: the
            # message may be its successor's (taken while this one hung). Hand it back.
            log.warning("task %s: child lost after this worker was replaced; handing message %s back", self.id,
                        self.delivery_tag)
            self.reject(requeue=True)
            return
        if isinstance(exc, WorkerLostError):
            # Nothing it started may outlive it: its GPUs are released by the report below.
            self._end_unit()
            # Report first: a lost attempt that is run again (or was cancelled) is not a failure.
            after = report(self.id, self.delivery_tag, "lost", _describe(exc),
                           _exception(self.task, exc, exc_info.traceback))
            if after == "PENDING":
                self.send_event("task-retried", exception=_describe(exc), traceback=exc_info.traceback)
                self.acknowledge()
                return
            if after == "CANCELLED":
                self._announce_revoked("lost", True, None, False)
                return
        try:
            super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
        finally:
            if not isinstance(exc, (*_NOT_OUTCOMES, WorkerLostError)):
                report(self.id, self.delivery_tag, "failed", _describe(exc),
                       _exception(self.task, exc, exc_info.traceback))

    def on_timeout(self, soft: bool, timeout: float) -> None:
        super().on_timeout(soft, timeout)
        if not soft:
            self._end_unit()
            report(self.id, self.delivery_tag, "failed", f"TimeLimitExceeded: hard time limit ({timeout}s)")

    def _end_unit(self) -> None:
        """Kill whatever is left of this attempt (its pool child, what it started) and wait for it."""
        if self.delivery_tag:
            Unit(context.node_id(), self.delivery_tag).kill(self.worker_pid, wait_s=10.0)
            # The child could not: its output, if any, may still be in its spare file.
            logs.keep_tail(self.id, self.delivery_tag, log_files.adopt(self.worker_pid, self.delivery_tag))


class GpuTask(BrokerTask):
    """Base of every task on a gpubroker worker (``task_cls`` of ``workers.app.app``)."""

    Request = GpuRequest

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.request.called_directly or self.request.is_eager:  # apply(), task_always_eager: here, now
            return self.run(*args, **kwargs)
        task_id = self.request.id
        tag = (self.request.properties or {}).get("delivery_tag")
        reserved, reuse = warm.reservation(self.request.properties, self)
        if not ThisProcess.admits(reserved, reuse):
            # Warm for other GPUs (or for CPU tasks): hand the task, not started, to a fresh process.
            ThisProcess.retire()
            raise Reject(f"pool process {os.getpid()} is warm for {ThisProcess.held}; handing {task_id} to a "
                         "fresh one", requeue=True)
        if reserved:  # no process warm for other tasks on these GPUs may hold them while it runs
            warm.board().retire_holders(reserved, reuse)
            warm.board().wait_released(reserved, reuse, os.getpid())
        capture = logs.Capture(task_id, tag or task_id)  # its file first: start.lua records where it is
        try:
            gpus = self._start(task_id, tag, capture.location)
        except BaseException:
            capture.end()
            raise
        if ThisProcess.held is None or gpus:  # a warm process keeps its CUDA_VISIBLE_DEVICES for life
            os.environ["CUDA_VISIBLE_DEVICES"] = context.visible_devices(gpus)
        granted = str(len(gpus.split(",")) if gpus else 0)  # what an elastic task was granted
        if os.environ.get("GPUBROKER_GPUS") != granted:
            os.environ["GPUBROKER_GPUS"] = granted
        if ThisProcess.starting(tag or task_id, gpus, reuse, self.name):
            affinity.publish_now()  # the dispatcher may send the next task of this name here
        unit = Unit(context.node_id(), tag or task_id, warm=not ThisProcess.retiring)
        unit.enter()
        capture.begin()
        watchdog = watch(unit, context.settings().fence_margin_s)
        previous = signal.signal(signal.SIGTERM, _raise_preempted)
        try:
            try:
                gang.enter(task_id)  # a gang member: its rendezvous env, and no code before all members start
                result = self.run(*args, **kwargs)
                payload = encode_result(result, self.backend, bool(get_actual_ignore_result(self, self.request)))
            except BaseException as exc:
                _end_unit(unit, watchdog, capture)
                self._end_raised(task_id, tag, exc, watchdog.fired)
                raise
            _end_unit(unit, watchdog, capture)
            report(task_id, tag, "succeeded", payload, patience_s=None)
        finally:
            # Ended and recorded: the node agent no longer signals this process for it, and a warm
            # process takes SIGTERM as a pool process does again.
            ThisProcess.ended()
            unit.leave()
            signal.signal(signal.SIGTERM, previous)
        return result

    def _start(self, task_id: str, tag: str | None, log_file: str = "") -> str:
        """start.lua's fence; the reserved GPUs. Raises what Celery needs when it may not run."""
        code, gpus = through_outages(lambda: context.scripts().start(task_id, context.node_id(), tag or "",
                                                                     os.getpid(), context.incarnation(), log_file),
                                     f"starting task {task_id}", None)
        if code is StartCode.FENCED:
            # This worker process was replaced under its node id (it hung, and came back): the
            # attempt is its successor's. Hand the message back to the queue; the heartbeat
            # stops this process.
            log.warning("task %s: this worker was replaced on node %s; handing message %s back", task_id,
                        context.node_id(), tag)
            raise Reject("this worker process was replaced on its node", requeue=True)
        if code is StartCode.ALREADY_RUNNING and _started_here(task_id):
            # This process's own start, applied by an earlier try whose reply was lost or whose
            # replicas did not confirm in time (min_replicas_ack): it is this attempt's to run.
            code, gpus = StartCode.OK, as_text(context.scripts().redis.hget(context.scripts().keys.task(task_id),
                                                                          "gpus"))
        if code is StartCode.ALREADY_RUNNING and _orphaned(task_id):
            # Its attempt's process died (a warm process killed between start.lua and the pool's
            # word that it took the task): the attempt is lost, recorded as a lost one is.
            log.warning("task %s: the process of attempt %s is gone; recording it lost", task_id, tag)
            report(task_id, tag, "lost", "its pool process died before its outcome was recorded")
            raise Ignore()
        if code is not StartCode.OK:
            # A redelivered, stale or cancelled message: never run it (invariant 4).
            log.warning("dropping message %s of task %s: %s", tag, task_id, code.name)
            if code is StartCode.NOT_FOUND:  # no task in the pool sent it: a poison message
                rejects.count(f"message {tag} names unknown task {task_id}")
            if code is StartCode.CANCELLED:
                self._announce_revoked()
            raise Ignore()
        return gpus

    def _end_raised(self, task_id: str, tag: str | None, exc: BaseException, fenced: bool) -> None:
        """Record how an attempt that raised ends (its processes are gone already): Celery's
        Retry, Ignore (or Task.replace) and Reject each as Celery means them, anything else as
        a failure (or a loss, when its own watchdog stopped it)."""
        if isinstance(exc, Retry):
            self._end_as_retry(task_id, tag, exc)
        elif isinstance(exc, Ignore) and OwnMessage.replaced(task_id):
            self._end_as_replaced(task_id, tag)
        elif isinstance(exc, Ignore):
            report(task_id, tag, "ignored", f"the task raised Ignore ({exc}): Celery records no outcome",
                   patience_s=None)
        elif isinstance(exc, Reject):
            self._end_as_rejected(task_id, tag, exc)
        else:
            self._end_as_failure(task_id, tag, exc, fenced=fenced)

    def _end_as_rejected(self, task_id: str, tag: str | None, exc: Reject) -> None:
        """Celery's Reject: with requeue the task runs again (as a retry would), else it fails."""
        if exc.requeue:  # the same message again, marked redelivered as kombu marks a restored one
            report(task_id, tag, "retry", _redelivered(self._stored_message()), f"rejected and requeued ({exc.reason})",
                   None, patience_s=None)
        else:  # get() raises the Reject, as Celery's does
            report(task_id, tag, "failed", _describe(exc), _exception(self, exc, traceback.format_exc()),
                   patience_s=None)

    def _end_as_retry(self, task_id: str, tag: str | None, exc: Retry) -> None:
        """``self.retry()`` published the task's next message (kept by the transport): this attempt
        ends and the task waits, holding nothing, for its countdown (finish.lua)."""
        retry = OwnMessage.take(task_id)
        if retry is None:  # a Retry raised by hand, with no new message: run the same one again
            report(task_id, tag, "retry", self._stored_message(), str(exc), None, patience_s=None)
        else:
            report(task_id, tag, "retry", retry.stored(), str(exc), retry.not_before, patience_s=None)

    def on_replace(self, sig: Any) -> Any:
        """Celery's ``Task.replace``: what it sends under this task's id is kept (the transport),
        and this attempt ends as replaced (``_end_as_replaced``) when Celery raises Ignore."""
        if not self.request.called_directly and not self.request.is_eager:
            OwnMessage.replacing(self.request.id)
        return super().on_replace(sig)

    def _end_as_replaced(self, task_id: str, tag: str | None) -> None:
        """The attempt ends; the task waits, holding nothing, for what replaced it: sent now (a
        single task) or later by whoever runs the chain or group it became."""
        replacement = OwnMessage.take(task_id)
        submitter = Submitter(context.settings(), context.scripts().redis)
        if replacement is not None:
            try:  # refused now, not after the task gave up its place: it would wait for ever
                submitter.check(submitter.request(replacement.name, replacement.args, replacement.kwargs,
                                                  replacement.options))
            except InvalidRequest as exc:
                report(task_id, tag, "failed", f"could not be replaced by {replacement.name}: {exc}", patience_s=None)
                return
        what = replacement.name if replacement is not None else "a chain or group, sent as it runs"
        after = report(task_id, tag, "replaced", what, patience_s=None)
        if replacement is not None and after == "PENDING":
            through_outages(lambda: submitter.submit_message(replacement), f"submitting what replaced {task_id}", None)

    def _end_as_failure(self, task_id: str, tag: str | None, exc: BaseException, fenced: bool = False) -> None:
        # Stopped by its own watchdog (workers.fence): the node lost its lease, as if it were lost.
        after = report(task_id, tag, "lost" if fenced else "failed",
                       "stopped itself: its node's lease was not renewed in time" if fenced else _describe(exc),
                       _exception(self, exc, traceback.format_exc()), patience_s=None)
        if isinstance(exc, Preempted):
            if after == "PENDING":  # preempted: requeued, to run again. Celery shows a retry.
                raise Retry(f"preempted: back in line ({exc})", exc) from exc
            if after == "CANCELLED":  # cancelled: shown revoked, as Celery's own revoke would
                self._announce_revoked()
                raise Ignore() from exc

    def _announce_revoked(self) -> None:
        """Tell Flower (task events) that the task was revoked: a cancel through the broker reaches
        the task here, not through Celery's revoke, which would have said so."""
        try:
            self.send_event("task-revoked", terminated=True, signum="SIGTERM", expired=False)
        except Exception:  # an event is worth a try, never a lost outcome
            log.warning("could not send task-revoked for %s", self.request.id, exc_info=True)

    def _stored_message(self) -> str:
        scripts = context.scripts()
        stored = cast(bytes | None, scripts.redis.hget(scripts.keys.task(self.request.id), "message"))
        return stored.decode() if stored else ""


@task_unknown.connect
def _unknown_task(sender: Any = None, message: Any = None, name: str = "", id: str = "", **_: Any) -> None:
    """A task name this worker does not know would otherwise hold its reservation forever."""
    tag = (message.properties or {}).get("delivery_tag") if message is not None else None
    rejects.count(f"task {name!r} is not registered here")
    report(id, tag, "failed", f"NotRegistered: task {name!r} is not registered on node {context.node_id()}")


@task_rejected.connect
def _rejected(sender: Any = None, message: Any = None, exc: BaseException | None = None, **_: Any) -> None:
    """Celery refused a message unread: not a task message, or a content type other than JSON."""
    rejects.count(f"{type(exc).__name__}: {exc}" if exc is not None else "not a task message",
                  getattr(message, "delivery_tag", None))
