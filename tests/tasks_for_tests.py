"""Tasks the end-to-end tests load into workers with ``--tasks tests.tasks_for_tests``."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from broker.models import Resources
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


# ---- Celery-native: declared defaults, retries, progress, canvas ----------------------------

@app.task(name="tests.add")
def add(x: float, y: float) -> float:
    return x + y


@app.task(name="tests.tsum")
def tsum(values: list[float]) -> float:
    return sum(values)


@app.task(name="tests.gpu_where", resources=Resources(gpus=1, cpus=1), priority=5, tenant="vision",
          estimated_runtime_s=30)
def gpu_where() -> dict[str, Any]:
    """Declares its resources on the decorator: ``.delay()`` runs it on one whole GPU."""
    return {"node": context.node_id(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


@app.task(name="tests.flaky", bind=True, max_retries=5)
def flaky(self: Any, fail_times: int, countdown: float = 1.0) -> dict[str, Any]:
    """Asks Celery to retry (``self.retry``) ``fail_times`` times, ``countdown`` seconds apart."""
    if self.request.retries < fail_times:
        raise self.retry(exc=ValueError(f"not yet ({self.request.retries})"), countdown=countdown)
    return {"retries": self.request.retries, "at": time.time(), "pid": os.getpid()}


@app.task(name="tests.autoretry", bind=True, autoretry_for=(ValueError,), retry_backoff=0.5,
          retry_backoff_max=1, retry_jitter=False, max_retries=2)
def autoretry(self: Any, succeed_on: int) -> int:
    """Fails with ValueError until retry ``succeed_on`` (never when it is above max_retries)."""
    if self.request.retries < succeed_on:
        raise ValueError(f"attempt {self.request.retries} fails")
    return int(self.request.retries)


@app.task(name="tests.progress", bind=True)
def progress(self: Any, steps: int, pause: float) -> int:
    for step in range(steps):
        self.update_state(state="PROGRESS", meta={"step": step, "of": steps})
        time.sleep(pause)
    return steps


@app.task(name="tests.sleeper")
def sleeper(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@app.task(name="tests.limited", rate_limit="2/s")
def limited() -> float:
    return time.time()


@app.task(name="tests.stubborn")
def stubborn(seconds: float) -> str:
    """Ignores SIGTERM: only SIGKILL stops it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(seconds)
    return "finished"


@app.task(name="tests.echo")
def echo(value: Any) -> Any:
    return value


@app.task(name="tests.note", bind=True)
def note(self: Any, path: str) -> str:
    """Appends its task id to ``path``: what a beat-scheduled task leaves behind."""
    with open(path, "a") as out:
        out.write(f"{self.request.id}\n")
    return str(self.request.id)
