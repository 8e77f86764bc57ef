"""Celery's ``revoke`` remote control, through the broker.

A revoke broadcast reaches every worker, whatever sent it: ``AsyncResult.revoke()``,
``app.control.revoke``, ``celery control revoke``, Flower's Revoke and Terminate buttons, from
any app on this Redis. Each worker cancels the task in the broker first (the node's Redis user
may release capacity, which a producer's may not), then does what Celery does: a pending task
never runs, a running one, with ``terminate``, gets SIGTERM (the agent follows with SIGKILL
after the grace period) and is announced revoked. Many workers cancelling one task is harmless:
the first does it, the rest find it final.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery.signals import task_revoked
from celery.utils.functional import maybe_list
from celery.worker import control

from broker.native.submitter import Submitter
from broker.settings import Settings
from workers import context

log = logging.getLogger(__name__)

_celery_revoke = control.Panel.data["revoke"]
_submitter: Submitter | None = None


def _cancel(task_ids: list[str], terminate: bool) -> None:
    global _submitter
    if _submitter is None:
        _submitter = Submitter(Settings(), context.scripts().redis)
    try:
        _submitter.revoke(task_ids, terminate)
    except redis.RedisError:
        log.warning("revoke of %s: could not cancel through the broker", task_ids, exc_info=True)


@task_revoked.connect
def _discarded(request: Any = None, terminated: bool = False, expired: bool = False, **_: Any) -> None:
    """The worker dropped a message as revoked: by stamped headers (``revoke_by_stamped_headers``),
    or expired by the time it arrived. Its task is cancelled through the broker too, or its
    reservation would hold the node's capacity for ever."""
    task_id = getattr(request, "id", None)
    if task_id and not terminated:
        log.info("task %s: %s at the worker; cancelling it through the broker", task_id,
                 "expired" if expired else "revoked")
        _cancel([str(task_id)], False)


@control.control_command(variadic="task_id", signature="[id1 [id2 [... [idN]]]]")
def revoke(state: Any, task_id: Any, terminate: bool = False, signal: str | None = None, **kwargs: Any) -> Any:
    """Revoke tasks by id, through the broker (see the module docstring), then as Celery does."""
    _cancel([str(i) for i in maybe_list(task_id) or []], bool(terminate))
    return _celery_revoke(state, task_id, terminate=terminate, signal=signal, **kwargs)
