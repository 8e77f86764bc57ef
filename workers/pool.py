"""The prefork pool gpubroker workers run: one fresh process per task, replaced promptly.

With ``max_tasks_per_child=1`` every task gets a process in which CUDA has not been
initialised, so CUDA_VISIBLE_DEVICES decides what it sees. Stock Celery replaces an
exited process from a 5-second maintenance timer, so a task received just after its
predecessor's process exited could wait up to 5 s (celery#9579). This pool runs that
maintenance every 0.1 s instead; the call is cheap when nothing needs replacing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery.concurrency.asynpool import AsynPool
from celery.concurrency.prefork import TaskPool

MAINTAIN_EVERY_S = 0.1


class FreshProcessAsynPool(AsynPool):
    @property
    def timers(self) -> dict[Callable[..., Any], float]:
        return {self.maintain_pool: MAINTAIN_EVERY_S}


class FreshProcessPool(TaskPool):
    Pool = FreshProcessAsynPool
