"""A running task's checkpoints (issue 17): report one, and read the last one back to resume.

A long task (a training loop) saves its state somewhere durable (a file, an object store)
every so often and then calls ``checkpoint(step=..., path=...)``. That is Celery's own
``update_state(state="CHECKPOINT", meta=...)``: progress.lua, fenced to the live attempt, keeps
the meta as the task's last checkpoint, across attempts, and stamps ``checkpoint_at``. The
preemption planner counts a running task's work at risk from it (time since its last
checkpoint, else since it started), so a task that checkpointed a moment ago is the cheaper
victim; and when the task runs again (preempted, its node lost, a retry), ``last_checkpoint()``
gives the meta back, to resume from there rather than from the start.
"""

from __future__ import annotations

import json
from typing import Any

from celery import current_task

from broker.store.scripts import CHECKPOINT_STATE
from workers import context


def _running_task_id(what: str) -> str:
    task = current_task
    task_id = getattr(getattr(task, "request", None), "id", None) if task else None
    if not task_id:
        raise RuntimeError(f"workers.checkpoint.{what}() is called from inside a running task")
    return str(task_id)


def checkpoint(**meta: Any) -> None:
    """Record that the task's state up to now is saved; ``meta`` (JSON-able) says where or how far."""
    _running_task_id("checkpoint")
    current_task.update_state(state=CHECKPOINT_STATE, meta=meta)


def last_checkpoint() -> dict[str, Any] | None:
    """The meta of this task's last checkpoint, in this attempt or an earlier one; None if none."""
    task_id = _running_task_id("last_checkpoint")
    scripts = context.scripts()
    raw = scripts.redis.hget(scripts.keys.task(task_id), "checkpoint")
    return json.loads(raw) if raw else None
