"""The Python client: submit, inspect, wait for and cancel GPU tasks."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any, cast

from celery import Celery
from redis.exceptions import NoPermissionError

from broker.celery_conf import monitor_app
from broker.errors import AccessDenied, TaskNotFound, Unsatisfiable, WaitTimeout
from broker.message import build_message, new_task_id
from broker.models import NodeView, QueueEntry, Resources, SubmitRequest, TaskState, TaskStatus, shortfall
from broker.settings import Settings
from broker.store import reads, records
from broker.store.connection import connect, unavailable_as_error
from broker.store.keys import PoolKeys
from broker.store.scripts import CancelCode, Clock, Scripts, SubmitCode, wall_clock_ms

log = logging.getLogger(__name__)

PENDING_QUEUE_LABEL = "gpubroker:pending"


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


class Client:
    """Submit and inspect GPU tasks in one pool. ``Client(redis_url)`` is all most users need."""

    SHAPE_CACHE_S = 5.0

    def __init__(self, redis_url: str | None = None, *, pool: str | None = None,
                 settings: Settings | None = None, clock: Clock = wall_clock_ms) -> None:
        settings = settings or Settings()
        updates = {k: v for k, v in {"redis_url": redis_url, "pool": pool}.items() if v is not None}
        self.settings = Settings(**{**settings.model_dump(), **updates})
        self.keys = PoolKeys(self.settings.pool)
        self.redis = connect(self.settings)
        self.scripts = Scripts(self.redis, self.keys, clock)
        self.clock = clock
        self._events_lock = threading.Lock()
        self._celery: Celery | None = None
        self._events: Any = None
        self._shapes: tuple[float, list[NodeView]] | None = None

    # ---- writing --------------------------------------------------------------

    @unavailable_as_error
    def submit(self, task_name: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
               resources: Resources | None = None, priority: int = 0, tenant: str = "default",
               estimated_runtime_s: float | None = None, idempotency_key: str | None = None,
               max_retries: int = 3, preemptible: bool | None = None) -> TaskHandle:
        """Queue ``task_name(*args, **kwargs)`` to run where ``resources`` are free.

        Every field is validated before anything is written; a request that no
        registered node could ever satisfy is refused, naming the short resource.
        """
        # SubmitRequest takes a list or tuple for args and refuses anything else.
        req = SubmitRequest(task_name=task_name, args=cast(list[Any], args),
                            kwargs=kwargs if kwargs is not None else {},
                            resources=resources if resources is not None else Resources(),
                            priority=priority, tenant=tenant, estimated_runtime_s=estimated_runtime_s,
                            idempotency_key=idempotency_key, max_retries=max_retries, preemptible=preemptible)
        self._check_satisfiable(req.resources)
        task_id = new_task_id()
        message = build_message(task_id, req.task_name, req.args, req.kwargs, self.settings.max_payload_bytes)
        code, existing = self.scripts.submit(task_id, req, message)
        if code is SubmitCode.DUPLICATE:
            return TaskHandle(self, existing, created=existing == task_id)
        # The id is a fresh uuid4: only this call can have taken it, when the reply to the
        # script was lost and redis-py sent it again (connection dropped, socket timeout).
        if code is not SubmitCode.CREATED and code is not SubmitCode.ID_TAKEN:
            raise RuntimeError(f"submit.lua refused fresh task id {task_id}: {code.name}")
        self._announce_sent(message, task_id, req.task_name)
        return TaskHandle(self, task_id, created=True)

    def _check_satisfiable(self, resources: Resources) -> None:
        """Refuse what no registered node could ever run. Node shapes are cached briefly to
        keep submit cheap; a refusal is always confirmed against a fresh read."""
        now = time.monotonic()
        if self._shapes is None or now - self._shapes[0] > self.SHAPE_CACHE_S:
            self._shapes = (now, self.nodes())
        if not self._shapes[1] or not shortfall(resources, self._shapes[1]):
            return
        self._shapes = (now, self.nodes())
        if self._shapes[1] and (short := shortfall(resources, self._shapes[1])):
            raise Unsatisfiable(short)

    @unavailable_as_error
    def cancel(self, task_id: str) -> TaskStatus:
        """Cancel a pending, reserved or running task (a running one is terminated).

        Cancelling a task that already ended changes nothing and returns its status.
        """
        held_by = cast(bytes | None, self.redis.hget(self.keys.task(task_id), "node"))
        node = held_by.decode() if held_by else None
        for _ in range(10):
            try:
                code, detail = self.scripts.cancel(task_id, node)
            except NoPermissionError as exc:
                if node is None:
                    raise
                raise AccessDenied(
                    f"task {task_id} is held by node {node}: cancelling it releases that node's capacity, "
                    f"which the Redis user in the Redis URL may not write ({exc}); nothing was changed. "
                    "Cancel it as a user with node access (admin in config/redis-acl.conf)") from exc
            if code is CancelCode.NOT_FOUND:
                raise TaskNotFound(task_id)
            if code is not CancelCode.MOVED:
                break
            node = detail or None
        if code is CancelCode.CANCELLED and detail in (TaskState.RESERVED, TaskState.RUNNING):
            # The reservation is released already; stop the process and drop the queued message.
            self._celery_app().control.revoke(task_id, terminate=True, signal="SIGTERM")
        return self.status(task_id)

    # ---- reading --------------------------------------------------------------

    @unavailable_as_error
    def status(self, task_id: str) -> TaskStatus:
        h = cast(dict[bytes, bytes], self.redis.hgetall(self.keys.task(task_id)))
        if not h:
            raise TaskNotFound(task_id)
        why = reads.waiting_info(self.redis, self.keys, [task_id])[0] if h[b"state"] == b"PENDING" else None
        return records.task_status(task_id, h, why)

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

    def close(self) -> None:
        with self._events_lock:
            if self._events is not None:
                self._events.close()
                self._events = None
        self.redis.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- Celery side ----------------------------------------------------------

    def _celery_app(self) -> Celery:
        if self._celery is None:
            self._celery = monitor_app(self.settings)
        return self._celery

    def _announce_sent(self, message: str, task_id: str, name: str) -> None:
        """Emit Celery's task-sent event so Flower lists the task while it waits."""
        headers = json.loads(message)["headers"]
        try:
            with self._events_lock:
                if self._events is None:
                    self._events = self._celery_app().events.Dispatcher(
                        self._celery_app().connection_for_write(), enabled=True)
                self._events.send("task-sent", uuid=task_id, name=name, args=headers["argsrepr"],
                                  kwargs=headers["kwargsrepr"], retries=0, eta=None, expires=None,
                                  root_id=task_id, parent_id=None, queue=PENDING_QUEUE_LABEL,
                                  exchange="", routing_key=PENDING_QUEUE_LABEL)
        except Exception:
            log.warning("could not emit task-sent for %s", task_id, exc_info=True)
