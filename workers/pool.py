"""The prefork pool gpubroker workers run: one fresh process per task, replaced promptly.

With ``max_tasks_per_child=1`` every task gets a process in which CUDA has not been
initialised, so CUDA_VISIBLE_DEVICES decides what it sees. Stock Celery replaces an
exited process from a 5-second maintenance timer, so a task received just after its
predecessor's process exited could wait up to 5 s (celery#9579). This pool runs that
maintenance every 0.1 s instead; the call is cheap when nothing needs replacing.

Celery also runs a full ``gc.collect()`` in the worker's main process before every fork
(celery#2927). With a fresh process per task that is a full collection per task, about
0.1 s of the main process's CPU on a loaded 2-core machine, which capped a worker at a
few tasks per second whatever its slots. Once the initial processes are started, this
pool moves every object the worker has built so far into the permanent generation
(``gc.freeze``; Sentry does the same for its prefork workers), so each of those
collections only looks at what was allocated since. It happens once, at start-up: what
the worker allocates later is collected as usual.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

from celery.concurrency.asynpool import AsynPool
from celery.concurrency.prefork import TaskPool

MAINTAIN_EVERY_S = 0.1


class FreshProcessAsynPool(AsynPool):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        gc.freeze()  # see the module docstring

    @property
    def timers(self) -> dict[Callable[..., Any], float]:
        return {self.maintain_pool: MAINTAIN_EVERY_S}


class FreshProcessPool(TaskPool):
    Pool = FreshProcessAsynPool
