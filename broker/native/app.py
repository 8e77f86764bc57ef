"""The Celery app and task classes of a gpubroker application.

``BrokerTask`` is the base of every task declared with ``workers.app.app``: the decorator takes
the broker's options as defaults (``@app.task(resources=Resources(gpus=1), priority=5,
tenant="vision", preemptible=True, estimated_runtime_s=600)``) and ``apply_async`` fills in
those not given per call. Both classes give the returned ``AsyncResult`` the id the broker
knows the task by (the same as the one sent, unless an idempotency key already named a task).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from celery import Celery, Task
from celery.result import AsyncResult
from kombu.utils.imports import symbol_by_name

from broker.models import Resources
from broker.native.transport import OPTIONS_KEY, RETRY_KEY, submitted

#: Task attributes that are the broker's defaults for each call (``None``: not declared).
DEFAULTS = ("resources", "tenant", "preemptible", "estimated_runtime_s")


def message_options(options: dict[str, Any]) -> dict[str, Any]:
    """Options as they travel in the message: a Resources as the dict it validates from, and a
    priority that was given as ``broker_priority`` too (``messages.OPTIONS`` says why)."""
    resources = options.get("resources")
    if isinstance(resources, Resources):
        options["resources"] = resources.model_dump()
    if options.get("priority") is not None:
        options["broker_priority"] = options["priority"]
    return options


def _known_as(result: AsyncResult, make: Any) -> AsyncResult:
    """``result``, or a result for the task the broker knows it as."""
    found = submitted(result.id)
    return result if found is None or found[0] == result.id else make(found[0])


class BrokerTask(Task):
    """A task whose calls go through the broker with its declared resources and options."""

    resources: Resources | dict[str, Any] | None = None
    tenant: str | None = None
    preemptible: bool | None = None
    estimated_runtime_s: float | None = None
    #: ``@app.task(reuse=True)``: a GPU task may run in a warm pool process that ran it (or another
    #: reuse task) on the same GPU indices, keeping what it loaded (``workers.warm``); per call:
    #: ``apply_async(reuse=...)``. CPU tasks always reuse pool processes.
    reuse: bool | None = None
    #: ``@app.task(priority=...)``, kept apart from Celery's own task attribute ``priority``,
    #: which Celery 5.3+ deprecates (and warns of) for routing to broker priority queues.
    declared_priority: int | None = None

    def apply_async(self, args: Any = None, kwargs: Any = None, task_id: str | None = None, producer: Any = None,
                    link: Any = None, link_error: Any = None, shadow: Any = None, **options: Any) -> AsyncResult:
        for name, value in self.declared().items():
            if options.get(name) is None and value is not None:
                options[name] = value
        result = super().apply_async(args, kwargs, task_id, producer, link, link_error, shadow,
                                     **message_options(options))
        return _known_as(result, self.AsyncResult)

    @classmethod
    def declared(cls) -> dict[str, Any]:
        """The broker's defaults this task declares (what its worker registers in the catalogue)."""
        return {**{name: getattr(cls, name) for name in DEFAULTS},
                "priority": cls.priority if cls.declared_priority is None else cls.declared_priority}


class GpuCelery(Celery):
    """Celery, with ``send_task`` taking the broker's options the same way ``apply_async`` does,
    and the app's ``result_expires`` (what a Celery user sets) the time the broker keeps a
    finished task's record."""

    def _task_from_fun(self, fun: Any, name: Any = None, base: Any = None, bind: bool = False,
                       **options: Any) -> Any:
        if "priority" in options:
            options["declared_priority"] = options.pop("priority")
        return super()._task_from_fun(fun, name, self._ours(base) if base is not None else None, bind, **options)

    def register_task(self, task: Any, **options: Any) -> Any:
        """A class-based task (Celery 1.0 style) gets the app's task class too."""
        cls = task if inspect.isclass(task) else type(task)
        ours = self._ours(cls)
        return super().register_task(ours() if ours is not cls else task, **options)

    def _ours(self, base: type) -> type:
        """``base`` with the app's task class (``task_cls``, e.g. ``workers.task:GpuTask``) in
        front: a task declared with ``base=YourTask`` still goes through the broker (its fence,
        its unit, its reports) and keeps your class's hooks (the app's class calls them through
        ``super()``)."""
        mine = symbol_by_name(self.task_cls)
        if issubclass(base, mine) or mine is Task:
            return base
        return type(base.__name__, (mine, base), {"__module__": base.__module__, "__qualname__": base.__qualname__})

    @contextlib.contextmanager
    def producer_or_acquire(self, producer: Any = None) -> Iterator[Any]:
        """Celery's, with a producer it acquires publishing in a batch (kombu's ``Producer.batch``):
        the tasks sent while it is held (a group's members share it) are checked as each is sent
        and written together when it is released, pipelined (``transport.SubmitBatch``)."""
        if producer is not None:
            yield producer
            return
        with super().producer_or_acquire() as acquired:
            # The write happens at the batch's exit: a lost Redis still raises kombu's OperationalError.
            with acquired.connection._reraise_as_library_errors(), acquired.batch():
                yield acquired

    def _connection(self, url: str, transport_options: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        expires = self.conf.result_expires
        seconds = expires.total_seconds() if isinstance(expires, timedelta) else float(expires or 0)
        options = dict(self.conf.broker_transport_options or {})
        options[OPTIONS_KEY] = {**options.get(OPTIONS_KEY, {}), "result_expires_s": seconds}
        # A batch's writes are retried as Celery retries a publish (transport.SubmitBatch).
        options[RETRY_KEY] = dict(self.conf.task_publish_retry_policy) if self.conf.task_publish_retry else \
            {"max_retries": 0}
        return super()._connection(url, transport_options={**options, **(transport_options or {})}, **kwargs)

    def send_task(self, name: str, args: Any = None, kwargs: Any = None, countdown: Any = None, eta: Any = None,
                  task_id: str | None = None, producer: Any = None, connection: Any = None, router: Any = None,
                  result_cls: Any = None, **options: Any) -> AsyncResult:
        result = super().send_task(name, args, kwargs, countdown, eta, task_id, producer, connection, router,
                                   result_cls, **message_options(options))
        return _known_as(result, result_cls or self.AsyncResult)
