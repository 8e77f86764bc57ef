"""The Python client: submit, inspect, wait for and cancel GPU tasks."""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from redis.exceptions import NoPermissionError

from broker.errors import AccessDenied, InvalidRequest, NodeNotFound, NodeRejected, TaskNotFound, WaitTimeout
from broker.message import new_task_id
from broker.models import NodeView, QueueEntry, Resources, SubmitRequest, TaskStatus
from broker.native.submitter import Submitter
from broker.settings import Settings
from broker.store import gangs, history, reads, records
from broker.store.connection import connect, unavailable_as_error
from broker.store.history import TaskRow, UsageRow
from broker.store.keys import PoolKeys
from broker.store.scripts import CancelCode, Clock, DrainCode, ForgetCode, Scripts, wall_clock_ms

if TYPE_CHECKING:  # Celery is imported when a task is first submitted: commands that only read start faster
    from celery import Celery

    from broker.native.envelope import Envelope, Envelopes
    from broker.native.events import SentEvents

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TaskLog:
    """The last part of one attempt's output as kept with its task (``Client.logs``)."""

    attempt: int  # 0: the task has not been placed yet
    tail: bytes  # the last task_log_tail_bytes (or fewer) it wrote
    size: int  # bytes it wrote in all; the tail is the end of them
    file: str | None  # ``<node>:<path>`` of the whole log, on the node it ran on
    final: bool  # the task has ended: nothing more comes


class TaskHandle:
    """What ``submit`` returns: the task id, with shortcuts to its status."""

    def __init__(self, client: Client, task_id: str, created: bool) -> None:
        self.id = task_id
        self.created = created
        self._client = client

    def status(self) -> TaskStatus:
        return self._client.status(self.id)

    def wait(self, timeout: float | None = None) -> TaskStatus:
        return self._client.wait(self.id, timeout)

    def __repr__(self) -> str:
        return f"TaskHandle({self.id!r})"


@dataclass(frozen=True, kw_only=True, slots=True)
class Submit:
    """One request of ``Client.submit_many``: the arguments of ``Client.submit``, by name."""

    task_name: str
    args: Sequence[Any] = ()
    kwargs: dict[str, Any] | None = None
    resources: Resources | dict[str, Any] | None = None
    priority: int | None = None
    tenant: str | None = None
    estimated_runtime_s: float | None = None
    idempotency_key: str | None = None
    max_retries: int = 3
    preemptible: bool | None = None
    countdown: float | None = None
    eta: datetime | None = None
    expires: float | datetime | None = None
    reuse: bool | None = None
    replicas: int | None = None
    spread: bool | None = None
    same_label: str | None = None
    min_replicas: int | None = None
    options: dict[str, Any] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        values = {"resources": self.resources, "priority": self.priority, "tenant": self.tenant,
                  "estimated_runtime_s": self.estimated_runtime_s, "preemptible": self.preemptible,
                  "idempotency_key": self.idempotency_key, "max_retries": self.max_retries,
                  "replicas": self.replicas, "spread": self.spread, "same_label": self.same_label,
                  "min_replicas": self.min_replicas}
        object.__setattr__(self, "options", {k: v for k, v in values.items() if v is not None})


def checked_reuse(reuse: object) -> bool:
    if not isinstance(reuse, bool):
        raise InvalidRequest({"reuse": f"must be True or False, not {type(reuse).__name__}"})
    return reuse


_SUBMIT_FIELDS = tuple(f.name for f in dataclasses.fields(Submit) if f.init)


def _as_submit(item: Submit | Mapping[str, Any]) -> Submit:
    if isinstance(item, Submit):
        return item
    if not isinstance(item, Mapping):
        raise InvalidRequest({"": f"must be a Submit(...) or a dict of its fields, not {type(item).__name__}"})
    unknown = [k for k in item if k not in _SUBMIT_FIELDS]
    if unknown:
        raise InvalidRequest({str(unknown[0]): f"is not an argument of submit; the arguments are "
                                               f"{', '.join(_SUBMIT_FIELDS)}"})
    if "task_name" not in item:
        raise InvalidRequest({"task_name": "is missing"})
    return Submit(**item)


def _at(index: int, exc: InvalidRequest) -> InvalidRequest:
    """``exc`` (its own class: Unsatisfiable, NotRegistered...) with each field prefixed by the
    request's place in the batch: ``requests[3].resources.gpus``."""
    problems = {f"requests[{index}]" + (f".{k}" if k else ""): v for k, v in exc.problems.items()}
    error = type(exc).__new__(type(exc))
    InvalidRequest.__init__(error, problems)
    error.__dict__.update({k: v for k, v in vars(exc).items() if k != "problems"})
    return error


class Client:
    """Submit and inspect GPU tasks in one pool. ``Client(redis_url)`` is all most users need."""

    def __init__(self, redis_url: str | None = None, *, pool: str | None = None,
                 settings: Settings | None = None, clock: Clock = wall_clock_ms) -> None:
        settings = settings or Settings()
        updates = {k: v for k, v in {"redis_url": redis_url, "pool": pool}.items() if v is not None}
        self.settings = Settings(**{**settings.model_dump(), **updates})
        self.keys = PoolKeys(self.settings.pool)
        self.redis = connect(self.settings)
        self.scripts = Scripts(self.redis, self.keys, clock)
        self.submitter = Submitter(self.settings, self.redis, clock)
        self.clock = clock
        self._celery: Celery | None = None
        self._envelopes: Envelopes | None = None
        self._events: SentEvents | None = None

    def for_pool(self, pool: str) -> Client:
        """A client of another pool with these settings: on its own Redis deployment when
        ``pool_urls`` maps it to one (docs/scaling.md), else on the same Redis."""
        return Client(settings=self.settings.for_pool(pool), clock=self.clock)

    # ---- writing --------------------------------------------------------------

    @unavailable_as_error
    def submit(self, task_name: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
               resources: Resources | None = None, priority: int | None = None, tenant: str | None = None,
               estimated_runtime_s: float | None = None, idempotency_key: str | None = None,
               max_retries: int = 3, preemptible: bool | None = None, countdown: float | None = None,
               eta: datetime | None = None, expires: float | datetime | None = None, replicas: int | None = None,
               spread: bool | None = None, same_label: str | None = None, reuse: bool | None = None,
               min_replicas: int | None = None) -> TaskHandle:
        """Queue ``task_name(*args, **kwargs)`` to run where ``resources`` are free.

        The same path as Celery's ``send_task``/``apply_async``: options not given are the task's
        declared defaults (what its workers registered), else the built-in ones. Every field is
        validated before anything is written; a task name no registered node runs, or a request
        that no registered node could ever satisfy, is refused, naming the field. ``countdown``/
        ``eta``: not placed before then; ``expires``: cancelled if not started by then.
        ``replicas`` > 1: a gang of that many members, each with ``resources``, reserved all or
        none, one job id (``status(id).members``); ``spread``: one member per node;
        ``same_label``: all members on nodes sharing one value of that node label key;
        ``min_replicas``: an elastic gang, granted from that many to ``replicas`` members (and
        ``Resources(min_gpus=...)`` an elastic task: docs/scheduling.md "Elastic requests").
        ``reuse``: a GPU task may run in a warm process (``workers.warm``); None: as declared.
        """
        request = Submit(task_name=task_name, args=args, kwargs=kwargs, resources=resources, priority=priority,
                         tenant=tenant, estimated_runtime_s=estimated_runtime_s, idempotency_key=idempotency_key,
                         max_retries=max_retries, preemptible=preemptible, countdown=countdown, eta=eta,
                         expires=expires, reuse=reuse, replicas=replicas, spread=spread, same_label=same_label,
                         min_replicas=min_replicas)
        # Celery's envelope and task-sent event, built here and written in one submit.lua call
        # (send_task's publish and event took two round trips and kombu's producer: issue 14).
        task_id, req, message = self._admitted(request)
        if self._events is None:
            from broker.native.events import SentEvents

            self._events = SentEvents(self._celery_app(), self.redis.connection_pool.connection_kwargs.get("db", 0))
        known_as, created = self.submitter.submit_one(task_id, req, message.stored, self._events.build(message.headers))
        from broker.native.envelope import after_publish

        after_publish(message)
        return TaskHandle(self, known_as, created=created)

    @unavailable_as_error
    def submit_many(self, requests: Iterable[Submit | Mapping[str, Any]]) -> list[TaskHandle]:
        """Submit many tasks at once; their handles, in order.

        Each request is a ``Submit(...)`` or a dict of the same names (``submit``'s arguments),
        and is validated as ``submit`` validates it. All are validated before anything is sent: a
        refusal names the request's index and field (``requests[3].resources.gpus``), and then
        nothing was written. The tasks are written in order, one round trip per 500; an
        idempotency key already taken, here or earlier in the same batch, returns that task
        (``handle.created`` is False). A gang (``replicas`` > 1) is written in its place in the
        order, as ``submit`` writes one. No task-sent event is sent for them (Flower sees each
        task once a worker receives it).

        Python's cyclic garbage collector is paused meanwhile: a batch allocates hundreds of
        thousands of short-lived objects, which reference counting frees, and the collector's
        passes over them found nothing but took ~15% of a 10,000-task batch."""
        paused = gc.isenabled()
        gc.disable()
        try:
            admitted = []
            for index, item in enumerate(requests):
                try:
                    admitted.append(self._admit(_as_submit(item)))
                except InvalidRequest as exc:
                    raise _at(index, exc) from None
            written = self.submitter.submit_admitted(admitted)
        finally:
            if paused:
                gc.enable()
        return [TaskHandle(self, task_id, created) for task_id, created in written]

    def _admit(self, request: Submit) -> tuple[str, SubmitRequest, str]:
        """One request of a batch validated, its envelope built, and checked as ``submit`` checks it."""
        task_id, req, message = self._admitted(request)
        return task_id, req, message.stored

    def _admitted(self, request: Submit) -> tuple[str, SubmitRequest, Envelope]:
        options = request.options
        reuse = None if request.reuse is None else checked_reuse(request.reuse)
        req = self.submitter.request(request.task_name, cast(list[Any], request.args), request.kwargs, options)
        if self._envelopes is None:
            from broker.native.envelope import Envelopes

            self._envelopes = Envelopes(self._celery_app())
        task_id = new_task_id()
        message = self._envelopes.build(task_id, req.task_name, req.args, req.kwargs, options.get("priority"),
                                        request.countdown, request.eta, request.expires, reuse)
        if message.not_before is not None or message.expires_at is not None:
            req = self.submitter.request(req.task_name, req.args, req.kwargs, options, message.not_before,
                                         message.expires_at)
        self.submitter.admit(req, message.stored)
        return task_id, req, message

    @unavailable_as_error
    def cancel(self, task_id: str) -> TaskStatus:
        """Cancel a pending, reserved or running task.

        A pending or reserved one is CANCELLED at once. A running one keeps its GPUs until its
        process is gone: within half a second its worker sends SIGTERM (``workers.task.Preempted``
        in the task), waits ``cancel_grace_s``, then SIGKILLs; its status shows RUNNING until
        then, then CANCELLED. Needs no Celery broadcast. A Redis user that may not write node
        state (the producer role) cannot release a reserved task itself: the cancel is recorded
        and a dispatcher releases it on its next cycle (its status shows RESERVED until then).
        Cancelling a task that already ended changes nothing and returns its status.
        """
        try:
            code, _detail = self.submitter.cancel(task_id)
            for member in gangs.live_members(self.redis, self.keys, task_id):
                self.submitter.cancel(member)
        except NoPermissionError as exc:
            raise AccessDenied(
                f"cancelling task {task_id} writes its record, which the Redis user in the Redis URL may not do "
                f"({exc}); nothing was changed. Cancel it as a producer or admin (config/redis-acl.conf)") from exc
        if code is CancelCode.NOT_FOUND:
            raise TaskNotFound(task_id)
        # Nothing to broadcast: the node's worker sees the mark on a running task within
        # workers.agent.STOP_CHECK_S, and drops a reserved one's queued message (start.lua).
        return self.status(task_id)

    # ---- nodes ----------------------------------------------------------------

    @unavailable_as_error
    def drain(self, node_id: str) -> NodeView:
        """Place nothing new on ``node_id``; what runs there finishes. Kept across a restart of its
        worker, until ``undrain``."""
        return self._drain(node_id, "operator")

    @unavailable_as_error
    def undrain(self, node_id: str) -> NodeView:
        """Place tasks on ``node_id`` again."""
        return self._drain(node_id, "")

    def _drain(self, node_id: str, by: str) -> NodeView:
        try:
            code, _ = self.scripts.drain(node_id, by)
        except NoPermissionError as exc:
            raise AccessDenied(f"draining node {node_id} writes node state, which the Redis user in the Redis URL "
                               f"may not do ({exc}); nothing was changed. Use the admin user") from exc
        if code is DrainCode.NOT_FOUND:
            raise NodeNotFound(node_id)
        return next(n for n in self.nodes() if n.id == node_id)

    @unavailable_as_error
    def remove_node(self, node_id: str) -> None:
        """Forget a node that is down (its tasks were already requeued by the reaper). A node that
        is up is refused: stop its worker first (it then leaves by itself)."""
        try:
            code, _ = self.scripts.forget(node_id)
        except NoPermissionError as exc:
            raise AccessDenied(f"removing node {node_id} writes node state, which the Redis user in the Redis URL "
                               f"may not do ({exc}); nothing was changed. Use the admin user") from exc
        if code is ForgetCode.NOT_FOUND:
            raise NodeNotFound(node_id)
        if code is ForgetCode.UP:
            raise NodeRejected(f"node {node_id} is up (its worker is heartbeating); nothing was changed. Stop its "
                               "worker (it drains and leaves by itself), or drain it: gpubroker drain NODE")

    # ---- reading --------------------------------------------------------------

    @unavailable_as_error
    def status(self, task_id: str) -> TaskStatus:
        h = cast(dict[bytes, bytes], self.redis.hgetall(self.keys.task(task_id)))
        if not h:
            raise TaskNotFound(task_id)
        why = reads.waiting_info(self.redis, self.keys, [task_id])[0] if h[b"state"] == b"PENDING" else None
        if b"replicas" in h:
            return gangs.gang_status(self.redis, self.keys, task_id, h, why)
        return records.task_status(task_id, h, why)

    def logs(self, task_id: str, attempt: int | None = None) -> TaskLog:
        """What is kept of an attempt's output (default: the latest attempt's)."""
        key = self.keys.task(task_id)
        state, attempts = cast(list[bytes | None], self.redis.hmget(key, "state", "attempts"))
        if state is None:
            raise TaskNotFound(task_id)
        n = attempt if attempt is not None else int(attempts or 0)
        tail, size, file = cast(list[bytes | None], self.redis.hmget(key, f"log:{n}", f"log_size:{n}",
                                                                       f"log_file:{n}"))
        return TaskLog(n, tail or b"", int(size or 0), file.decode() if file else None,
                       state.decode() in ("SUCCEEDED", "FAILED", "CANCELLED"))

    def wait(self, task_id: str, timeout: float | None = None) -> TaskStatus:
        """Block until the task is SUCCEEDED, FAILED or CANCELLED and return its status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.02
        while True:
            status = self.status(task_id)
            if status.state.is_final:
                return status
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(task_id, timeout or 0, status.state.value)
            pause = delay if deadline is None else min(delay, max(0.0, deadline - time.monotonic()))
            time.sleep(pause)
            delay = min(delay * 1.5, 0.5)

    @unavailable_as_error
    def nodes(self) -> list[NodeView]:
        """Every registered node with its capacity and what is free, per GPU."""
        return reads.read_nodes(self.redis, self.keys)

    @unavailable_as_error
    def queue(self, limit: int = 10_000) -> list[QueueEntry]:
        """Pending tasks in dispatch order, with their position (1 = next), and, as of the
        dispatcher's last full pass, why each waits and when it is estimated to start."""
        return reads.queue_entries(self.redis, self.keys, limit)

    @unavailable_as_error
    def tasks(self, state: str | Iterable[str] | None = None, tenant: str | None = None, node: str | None = None,
              since: str | float | timedelta | datetime | None = None, limit: int | None = None) -> list[TaskRow]:
        """Tasks like squeue/sacct list them: pending (dispatch order), running (by node), then
        final ones newest first. ``state``: pending, running, finished (succeeded), failed,
        cancelled, or several (default all); ``since`` ("1h", seconds or a timedelta ago, or a
        datetime) bounds when final ones finished. Final tasks show until their records expire."""
        states, limit = history.parse_states(state), history.parse_limit(limit)
        now = self.clock()
        return history.read_tasks(self.redis, self.keys, now, states, tenant, node,
                                  history.parse_since(since, now / 1000), limit)

    @unavailable_as_error
    def usage(self, since: str | float | timedelta | datetime | None = None, by: str = "tenant") -> list[UsageRow]:
        """GPU-hours, CPU-hours, task counts and wait p50/p95 of the tasks that ended since
        ``since``, per tenant, node or task name (``by``), most GPU-hours first."""
        by = history.parse_by(by)
        now = self.clock()
        return history.read_usage(self.redis, self.keys, now, history.parse_since(since, now / 1000), by)

    def close(self) -> None:
        if self._celery is not None:
            self._celery.close()
        self.redis.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- Celery side ----------------------------------------------------------

    def _celery_app(self) -> Celery:
        if self._celery is None:
            from broker.celery_conf import monitor_app

            self._celery = monitor_app(self.settings)
        return self._celery
