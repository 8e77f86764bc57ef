"""Tasks the end-to-end tests load into workers with ``--tasks tests.tasks_for_tests``."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from workers import context
from workers.app import app


@app.task(name="tests.boom")
def boom(message: str = "boom") -> None:
    raise RuntimeError(message)


@app.task(name="tests.visible")
def visible() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def _attempt(task: Any) -> int:
    """Which attempt this is: reserve.lua tags each attempt's message ``<task id>.<attempt>``."""
    return int(task.request.properties["delivery_tag"].rsplit(".", 1)[1])


@app.task(name="tests.killed_on_attempts", bind=True)
def killed_on_attempts(self: Any, upto: int) -> dict[str, Any]:
    """SIGKILL the process running this attempt, as the OOM killer would, while attempt <= upto."""
    attempt = _attempt(self)
    if attempt <= upto:
        os.kill(os.getpid(), signal.SIGKILL)
    return {"attempt": attempt, "pid": os.getpid(), "node": context.node_id()}


@app.task(name="tests.slow_on_attempts", bind=True)
def slow_on_attempts(self: Any, upto: int, seconds: float) -> dict[str, Any]:
    """Sleep ``seconds`` while attempt <= upto, then return at once: a long task that ends on retry."""
    attempt = _attempt(self)
    started = time.time()
    if attempt <= upto:
        time.sleep(seconds)
    return {"attempt": attempt, "pid": os.getpid(), "node": context.node_id(), "started_at": started,
            "finished_at": time.time()}


@app.task(name="tests.checkpointed", bind=True)
def checkpointed(self: Any, seconds: float, path: str) -> dict[str, Any]:
    """Sleep ``seconds`` in steps; when preempted, save how far it got to ``path`` and stop. A
    later attempt resumes from the saved step: how a training loop checkpoints on SIGTERM."""
    from workers.task import Preempted

    saved = Path(path)
    done = float(saved.read_text()) if saved.exists() else 0.0
    resumed_from = done
    try:
        while done < seconds:
            time.sleep(0.05)
            done += 0.05
    except Preempted:
        saved.write_text(str(done))
        raise
    return {"attempt": _attempt(self), "resumed_from": resumed_from, "node": context.node_id(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "finished_at": time.time()}
