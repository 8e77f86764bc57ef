"""Celery messages as kombu hands them to a transport: what a task publish asks for, and what
of it the broker stores.

A task publish is Celery's protocol-2 envelope (``headers.task``, ``headers.id``, a body of
``[args, kwargs, embed]``), with the options of ``apply_async``/``send_task`` that Celery does
not know itself (``resources``, ``tenant``...) carried, as Celery carries any extra option, in
the message properties. The stored envelope is the same message less what depends on where and
when it runs: the routing and delivery tag (reserve.lua adds them), the ETA and expiry (the
broker's own timers, so a worker never holds reserved GPUs waiting for an ETA), and the
broker's options.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

#: apply_async/send_task options the broker reads from the message properties. ``broker_priority``
#: is the priority when given explicitly (``native.app`` copies it there): kombu writes the
#: ``priority`` property as 0 when none was given, so 0 there cannot override a declared default.
OPTIONS = ("resources", "tenant", "estimated_runtime_s", "idempotency_key", "preemptible", "max_retries",
           "broker_priority", "replicas", "spread", "same_label", "min_replicas")
# Properties that are kombu's routing of this one publish, or Celery's expiry for brokers with TTLs.
_DROPPED = ("delivery_info", "delivery_tag", "expiration", *OPTIONS)


class BadMessage(ValueError):
    """A task message this module cannot read (it says what is wrong)."""


def _body(message: dict[str, Any]) -> Any:
    body = message.get("body")
    properties = message.get("properties") or {}
    if properties.get("body_encoding") == "base64" and isinstance(body, str):
        body = base64.b64decode(body)
    if message.get("content-type") != "application/json":
        raise BadMessage(f"content type {message.get('content-type')!r} is not application/json")
    try:
        return json.loads(body)  # type: ignore[arg-type]  # not bytes or str: refused below
    except (TypeError, ValueError) as exc:
        raise BadMessage(f"the body is not JSON ({exc})") from None


def epoch_seconds(iso: Any, field: str) -> float | None:
    """An ISO 8601 time from a Celery header as seconds since the epoch (UTC when it names no zone)."""
    if iso is None:
        return None
    try:
        when = datetime.fromisoformat(str(iso))
    except ValueError:
        raise BadMessage(f"header {field}: {str(iso)[:40]!r} is not an ISO 8601 time") from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


@dataclass(slots=True)
class TaskMessage:
    """One task publish, read."""

    id: str
    name: str
    args: Any
    kwargs: Any
    retries: int
    options: dict[str, Any]  # the broker's options found in the properties, and the priority
    not_before: float | None  # seconds: the ETA (or countdown) Celery put in the headers
    expires_at: float | None
    message: dict[str, Any]

    def stored(self) -> str:
        """The envelope the broker stores (reserve.lua appends the routing and tag to its
        properties, which must close the document). Celery's own fields stay as Celery wrote them:
        the task sees its ``eta``, ``expires`` and ``delivery_info['priority']``; by the time the
        message reaches a worker its eta has passed, and one that expired on the way is revoked
        there, which cancels it through the broker (``workers.control``)."""
        properties = {k: v for k, v in self.message["properties"].items() if k not in _DROPPED}
        envelope = {k: v for k, v in self.message.items() if k != "properties"}
        return json.dumps({**envelope, "properties": properties}, separators=(",", ":"), allow_nan=False)


def task_message(message: Any) -> TaskMessage | None:
    """The task publish in ``message``, or None when it is not one (a control reply, an event)."""
    if not isinstance(message, dict):
        return None
    headers = message.get("headers")
    if not isinstance(headers, dict) or "task" not in headers or "id" not in headers:
        return None
    properties = message.get("properties")
    if not isinstance(properties, dict):
        raise BadMessage("the envelope has no properties object")
    body = _body(message)
    if not isinstance(body, list) or len(body) != 3:
        raise BadMessage("the body is not Celery's [args, kwargs, embed]")
    options = {k: properties[k] for k in OPTIONS if properties.get(k) is not None}
    priority = options.pop("broker_priority", None)
    if priority is not None or properties.get("priority"):
        options["priority"] = properties["priority"] if priority is None else priority
    return TaskMessage(str(headers["id"]), str(headers["task"]), body[0], body[1], int(headers.get("retries") or 0),
                       options, epoch_seconds(headers.get("eta"), "eta"),
                       epoch_seconds(headers.get("expires"), "expires"), message)


def revoke_request(message: Any) -> tuple[list[str], bool] | None:
    """A Celery ``revoke`` broadcast in ``message``: (task ids, terminate); None for anything else."""
    if not isinstance(message, dict):
        return None
    try:
        body = _body(message)
    except BadMessage:
        return None
    if not isinstance(body, dict) or body.get("method") != "revoke":
        return None
    arguments = body.get("arguments") or {}
    ids = arguments.get("task_id")
    ids = [ids] if isinstance(ids, str) else [str(i) for i in ids or ()]
    return ids, bool(arguments.get("terminate"))
