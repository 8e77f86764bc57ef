"""Build a task's Celery message once, at submit, with Celery's own protocol builder.

Celery publishes the task through its normal producer path onto kombu's in-memory
transport, and we read back exactly the envelope kombu's Redis transport would
LPUSH. The only parts that depend on where and when the task is placed — the
delivery tag and ``delivery_info`` — are dropped here and written by reserve.lua,
which appends them to the ``properties`` object this module guarantees is last.
"""

from __future__ import annotations

import json
import threading
import uuid
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where a message is built: the client's read-only commands need no Celery
    from celery import Celery

from broker.errors import InvalidRequest

_CAPTURE_QUEUE = "gpubroker.capture"
_lock = threading.Lock()
_app: Celery | None = None


def _capture_app() -> Celery:
    global _app
    if _app is None:
        from celery import Celery

        _app = Celery("gpubroker-producer", broker="memory://", set_as_current=False)
        _app.conf.update(
            task_serializer="json",
            accept_content=["json"],
            task_default_priority=0,
            broker_connection_retry_on_startup=False,
        )
    return _app


def build_message(task_id: str, task_name: str, args: Any, kwargs: dict[str, Any],
                  max_bytes: int) -> str:
    """Return the JSON envelope for ``task_name(*args, **kwargs)`` with id ``task_id``."""
    app = _capture_app()
    with _lock, app.connection_for_write() as conn:
        try:
            app.send_task(task_name, args=list(args), kwargs=kwargs, task_id=task_id,
                          queue=_CAPTURE_QUEUE, priority=0, connection=conn)
        except RecursionError:  # Celery's encoder nests deeper than SubmitRequest's check
            raise InvalidRequest({"args": "nested too deeply to encode"}) from None
        raw = conn.default_channel._get(_CAPTURE_QUEUE)
    properties = raw.pop("properties")
    properties.pop("delivery_tag", None)
    properties.pop("delivery_info", None)
    # properties must close the document: reserve.lua appends the routing and the tag there.
    text = json.dumps({**raw, "properties": properties}, separators=(",", ":"), allow_nan=False)
    if len(text) > max_bytes:
        # Name the bigger of the two, so the user knows which one to shrink.
        field = "kwargs" if len(json.dumps(kwargs)) > len(json.dumps(list(args))) else "args"
        raise InvalidRequest({field: f"the encoded task (args and kwargs) is {len(text)} bytes; "
                                     f"the limit is {max_bytes}"})
    return text


def new_task_id() -> str:
    return str(uuid.uuid4())


class MessageTemplates:
    """Celery-built messages, one build per task name, for the simulator (broker.sim.engine): a
    simulated task's message is carried by reserve.lua to the node queue and dropped there, never
    run, so a copy of Celery's message with the task's own id stands in for building each (which
    would cost ~0.5 ms)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._parts: dict[str, list[str]] = {}

    def __call__(self, task_id: str, name: str) -> str:
        parts = self._parts.get(name)
        if parts is None:
            placeholder = new_task_id()
            parts = self._parts[name] = build_message(placeholder, name, [], {}, self.max_bytes).split(placeholder)
        return task_id.join(parts)
