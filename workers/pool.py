"""The prefork pool gpubroker workers run: warm processes where a task allows it, a fresh
process per task where it does not (``workers.warm`` decides), replaced promptly.

A pool process that must not take another task (it ran a GPU task that does not reuse its
process, or it is warm for GPUs reserved for something else) exits at the top of billiard's
loop, after its last result was sent and before it takes the next job (``WarmWorker``): what
``max_tasks_per_child`` does, decided per task. Every GPU task that does not reuse gets a
process in which CUDA has not been initialised, so CUDA_VISIBLE_DEVICES decides what it sees.
Stock Celery replaces an exited process from a 5-second maintenance timer, so a task received
just after its predecessor's process exited could wait up to 5 s (celery#9579). This pool runs
that maintenance every 0.1 s instead; the call is cheap when nothing needs replacing.

Celery also runs a full ``gc.collect()`` in the worker's main process before every fork
(celery#2927). With a fresh process per task that is a full collection per task, about
0.1 s of the main process's CPU on a loaded 2-core machine, which capped a worker at a
few tasks per second whatever its slots. Once the initial processes are started, this
pool moves every object the worker has built so far into the permanent generation
(``gc.freeze``; Sentry does the same for its prefork workers), so each of those
collections only looks at what was allocated since. It happens once, at start-up: what
the worker allocates later is collected as usual.

When the broker connection comes back after an outage, Celery registers the pool with the
consumer's new event loop, watching every process in the pool for its exit. A process that
has exited and whose exit was already handled (its watch removed, ``_sentinel_poll`` set to
None) but that ``maintain_pool`` has not yet replaced is still in the pool: stock Celery
passes its None to the event loop, which raises ``ValueError: file descriptor is None``, an
"Unrecoverable error" that stops the consumer for good (seen after a Redis restart; the same
family as celery#9250). With a fresh process per task there is often such a process. This
pool skips it: nothing is left to watch, and its replacement is watched when it starts.
"""

from __future__ import annotations

import gc
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from billiard.pool import (
    EX_RECYCLE,
    GUARANTEE_MESSAGE_CONSUMPTION_RETRY_INTERVAL,
    GUARANTEE_MESSAGE_CONSUMPTION_RETRY_LIMIT,
)
from celery.concurrency.asynpool import AsynPool
from celery.concurrency.asynpool import Worker as AsynWorker
from celery.concurrency.prefork import TaskPool

from workers.warm import ThisProcess, process_order

MAINTAIN_EVERY_S = 0.1
CONSUMED_POLL_S = 0.002
CONSUMED_WAIT_S = GUARANTEE_MESSAGE_CONSUMPTION_RETRY_LIMIT * GUARANTEE_MESSAGE_CONSUMPTION_RETRY_INTERVAL
log = logging.getLogger(__name__)


class WarmWorker(AsynWorker):
    """A pool process that exits, as one past ``max_tasks_per_child`` does, when it must not take
    another task. billiard looks for a job at least once a second, so an idle process told to
    retire (``workers.warm.Board``) is gone within a second."""

    def _make_child_methods(self, *args: Any, **kwargs: Any) -> None:
        super()._make_child_methods(*args, **kwargs)
        receive: Callable[[], Any] = self.wait_for_job  # type: ignore[has-type]  # billiard sets it

        def wait_for_job() -> Any:
            if ThisProcess.must_retire():
                sys.exit(EX_RECYCLE)  # billiard's workloop waits until its results are read, then exits
            return receive()
        self.wait_for_job = wait_for_job

    def _ensure_messages_consumed(self, completed: int) -> bool:
        """billiard's wait, before a process exits, until the main process has read its results;
        looking every ``CONSUMED_POLL_S`` instead of every 0.1 s, within the same 30 s. A process
        that exits after each task (a fresh-process GPU task) slept 0.1 s per task here for a
        result the main process read within a millisecond: half a slot's time per task."""
        if not self.on_ready_counter:
            return False
        deadline = time.monotonic() + CONSUMED_WAIT_S
        while self.on_ready_counter.value < completed:
            if time.monotonic() > deadline:
                log.warning("could not ensure all messages were consumed prior to exiting")
                return False
            time.sleep(CONSUMED_POLL_S)
        return True


class FreshProcessAsynPool(AsynPool):
    Worker = WarmWorker

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        gc.freeze()  # see the module docstring

    def _create_write_handlers(self, hub: Any, *args: Any, **kwargs: Any) -> None:
        """Celery writes the next job to the first idle process the event loop reports, whatever
        it is warm for; hand it the processes in the order ``warm.process_order`` prefers (warm
        for the job's GPUs, then fresh, then the rest), so that a task warm affinity placed on
        a warm set reaches the process warm for it instead of one that would hand it back and exit."""
        super()._create_write_handlers(hub, *args, **kwargs)
        schedule_writes = hub.consolidate_callback
        outbound, processes = self.outbound_buffer, self._fileno_to_inq

        def warm_first(ready_fds: list[int], *rest: Any) -> Any:
            if len(ready_fds) > 1 and outbound:
                ready_fds = process_order(getattr(outbound[0], "correlation_id", None), ready_fds, processes)
            return schedule_writes(ready_fds, *rest)
        hub.consolidate_callback = warm_first

    @property
    def timers(self) -> dict[Callable[..., Any], float]:
        return {self.maintain_pool: MAINTAIN_EVERY_S}

    def _track_child_process(self, proc: Any, hub: Any) -> None:
        if getattr(proc, "_sentinel_poll", 0) is None:  # exited, exit handled: see the module docstring
            return
        super()._track_child_process(proc, hub)


class FreshProcessPool(TaskPool):
    Pool = FreshProcessAsynPool
