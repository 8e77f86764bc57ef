"""The Celery app and task classes of a gpubroker application.

``BrokerTask`` is the base of every task declared with ``workers.app.app``: the decorator takes
the broker's options as defaults (``@app.task(resources=Resources(gpus=1), priority=5,
tenant="vision", preemptible=True, estimated_runtime_s=600)``) and ``apply_async`` fills in
those not given per call. Both classes give the returned ``AsyncResult`` the id the broker
knows the task by (the same as the one sent, unless an idempotency key already named a task).
"""

from __future__ import annotations

from typing import Any

from celery import Celery, Task
from celery.result import AsyncResult

from broker.models import Resources
from broker.native.transport import submitted

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

    def apply_async(self, args: Any = None, kwargs: Any = None, task_id: str | None = None, producer: Any = None,
                    link: Any = None, link_error: Any = None, shadow: Any = None, **options: Any) -> AsyncResult:
        for name in DEFAULTS:
            if options.get(name) is None and getattr(self, name) is not None:
                options[name] = getattr(self, name)
        result = super().apply_async(args, kwargs, task_id, producer, link, link_error, shadow,
                                     **message_options(options))
        return _known_as(result, self.AsyncResult)

    @classmethod
    def declared(cls) -> dict[str, Any]:
        """The broker's defaults this task declares (what its worker registers in the catalogue)."""
        return {name: getattr(cls, name) for name in (*DEFAULTS, "priority")}


class GpuCelery(Celery):
    """Celery, with ``send_task`` taking the broker's options the same way ``apply_async`` does."""

    def send_task(self, name: str, args: Any = None, kwargs: Any = None, countdown: Any = None, eta: Any = None,
                  task_id: str | None = None, producer: Any = None, connection: Any = None, router: Any = None,
                  result_cls: Any = None, **options: Any) -> AsyncResult:
        result = super().send_task(name, args, kwargs, countdown, eta, task_id, producer, connection, router,
                                   result_cls, **message_options(options))
        return _known_as(result, result_cls or self.AsyncResult)
