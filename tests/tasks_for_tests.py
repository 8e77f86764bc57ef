"""Tasks the end-to-end tests load into workers with ``--tasks tests.tasks_for_tests``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from celery import Task

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


@app.task(name="tests.checkpointing", bind=True)
def checkpointing(self: Any, seconds: float, every: float | None = None) -> dict[str, Any]:
    """Work ``seconds`` in 0.05 s steps, reporting a checkpoint (``workers.checkpoint``) every
    ``every`` seconds (None: never); an attempt resumes from the last checkpoint reported."""
    from workers.checkpoint import checkpoint, last_checkpoint

    last = last_checkpoint()
    done = resumed_from = float(last["done"]) if last else 0.0
    since = 0.0
    while done < seconds:
        time.sleep(0.05)
        done, since = done + 0.05, since + 0.05
        if every is not None and since >= every:
            checkpoint(done=done)
            since = 0.0
    return {"attempt": _attempt(self), "resumed_from": resumed_from}


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


@app.task(name="tests.stubborn", bind=True)
def stubborn(self: Any, seconds: float) -> str:
    """Ignores SIGTERM: only SIGKILL stops it. Says so (state IGNORING_SIGTERM) once it does: a
    SIGTERM before that line still stops it, as it would any task."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    self.update_state(state="IGNORING_SIGTERM")
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


# ---- an attempt's processes (workers.unit) and self-fencing (workers.fence) -------------------

TICKER = """
import signal, sys, time
path = sys.argv[1]
if sys.argv[2] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
while True:
    with open(path, "a") as out:
        out.write(f"{time.time()}\\n")
    time.sleep(0.02)
"""


@app.task(name="tests.family", bind=True)
def family(self: Any, path: str, seconds: float = 0.0, die_on: int = 0, scrub: bool = False,
           stubborn: bool = False) -> dict[str, Any]:
    """Starts a grandchild in a session of its own (``setsid``) that appends the time to ``path``
    every 20 ms for ever, then sleeps ``seconds``; SIGKILLs itself on attempt ``die_on``.
    ``scrub``: the grandchild gets an empty environment (no attempt marker); ``stubborn``: it
    and this task ignore SIGTERM."""
    import subprocess
    import sys

    attempt = _attempt(self)
    env = {} if scrub else None
    grandchild = subprocess.Popen([sys.executable, "-c", TICKER, f"{path}.{attempt}", str(stubborn and "stubborn")],
                                  env=env, start_new_session=True)
    if stubborn:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Path(f"{path}.{attempt}.pid").write_text(str(grandchild.pid))
    if attempt == die_on:
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(seconds)
    return {"attempt": attempt, "grandchild": grandchild.pid, "node": context.node_id()}


@app.task(name="tests.ticker", bind=True)
def ticker(self: Any, path: str, seconds: float) -> dict[str, Any]:
    """Appends ``<attempt> <time>`` to ``path`` every 20 ms for ``seconds``: when each attempt ran."""
    attempt = _attempt(self)
    end = time.time() + seconds
    while time.time() < end:
        with open(path, "a") as out:
            out.write(f"{attempt} {time.time()}\n")
        time.sleep(0.02)
    return {"attempt": attempt, "node": context.node_id()}


# ---- more of Celery's task API: replace, Reject, Ignore, base classes, request fields -----------

@app.task(name="tests.replacer", bind=True)
def replacer(self: Any, x: int, how: str) -> Any:
    """Replaces itself: with one GPU task, a chain, or a group."""
    from celery import chain, group

    if how == "task":
        return self.replace(gpu_where.s())
    if how == "chain":
        return self.replace(chain(add.s(x, 1), add.s(10)))
    if how == "slow chain":  # its first link takes 3 s: the replaced task waits meanwhile
        return self.replace(chain(sleeper.si(3), add.si(x, 1)))
    return self.replace(group(add.s(i, i) for i in range(x)))


@app.task(name="tests.rejector", bind=True)
def rejector(self: Any, path: str) -> int:
    """Rejects its message (requeue) on the first attempt, succeeds on the next."""
    from celery.exceptions import Reject

    if not Path(path).exists():
        Path(path).write_text("rejected once")
        raise Reject("not yet", requeue=True)
    return _attempt(self)


@app.task(name="tests.reject_once", bind=True, acks_late=True)
def reject_once(self: Any) -> str:
    """Celery's usual way to requeue once: a message delivered again says it was redelivered."""
    from celery.exceptions import Reject

    if not self.request.delivery_info.get("redelivered"):
        raise Reject("first delivery", requeue=True)
    return "second delivery"


@app.task(name="tests.reject_for_good")
def reject_for_good() -> None:
    from celery.exceptions import Reject

    raise Reject("not for us", requeue=False)


@app.task(name="tests.plain_retry", bind=True)
def plain_retry(self: Any) -> int:
    """``self.retry()`` with no exc, as Celery's docs write it."""
    if self.request.retries == 0:
        raise self.retry(countdown=0)
    return int(self.request.retries)


@app.task(name="tests.ignorer")
def ignorer() -> None:
    from celery.exceptions import Ignore

    raise Ignore()


@app.task(name="tests.request_info", bind=True)
def request_info(self: Any) -> dict[str, Any]:
    return {"eta": self.request.eta, "expires": self.request.expires,
            "priority": (self.request.delivery_info or {}).get("priority")}


@app.task(name="tests.typed")
def typed() -> dict[str, Any]:
    import datetime
    import decimal
    import uuid

    return {"when": datetime.datetime(2026, 12, 2, 12, 30, tzinfo=datetime.UTC), "id": uuid.UUID(int=7),
            "amount": decimal.Decimal("1.25")}


class Hooked(Task):
    """A base class of the user's own, with a hook and an autoretry, as Celery apps often have."""

    autoretry_for = (ValueError,)
    max_retries = 3
    default_retry_delay = 0

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        Path(kwargs["path"]).with_suffix(".hook").write_text(f"{task_id} {retval}")


@app.task(name="tests.hooked", base=Hooked, bind=True)
def hooked(self: Any, path: str, fail_times: int) -> dict[str, Any]:
    if self.request.retries < fail_times:
        raise ValueError("not yet")
    return {"retries": self.request.retries, "node": context.node_id()}


class ClassBased(Task):
    """A Celery 1.0-style task class, registered with ``app.register_task``."""

    name = "tests.class_based"

    def run(self, x: int) -> dict[str, Any]:
        return {"x": x, "node": context.node_id()}


app.register_task(ClassBased())


@app.task(name="tests.chatty", bind=True, max_retries=3)
def chatty(self: Any, lines: int = 0, pause: float = 0.0, filler: int = 0, retry_first: bool = False,
           killed_first: bool = False) -> int:
    """Writes to stdout, stderr and from a subprocess, each line naming its attempt; ``filler``
    bytes of 'x' and ``lines`` numbered lines ``pause`` s apart; the first attempt retries, or is
    SIGKILLed (as the OOM killer would) at its end, on request."""
    attempt = _attempt(self)
    print(f"out {attempt}", flush=True)
    print(f"err {attempt}", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-c", f"import os; os.write(1, b'child {attempt}\\n')"], check=True)
    if filler:
        print("x" * filler, flush=True)
    for i in range(lines):
        print(f"line {i}", flush=True)
        time.sleep(pause)
    print(f"end {attempt}", flush=True)
    if retry_first and attempt == 1:
        raise self.retry(countdown=0.1)
    if killed_first and attempt == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return attempt


GANG_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
            "CUDA_VISIBLE_DEVICES", "GPUBROKER_GPUS")


@app.task(name="tests.gang_member")
def gang_member(seconds: float = 0.0) -> dict[str, Any]:
    """A gang member's view: its rendezvous environment, node, and when its code began."""
    began = time.time()
    time.sleep(seconds)
    return {"env": {name: os.environ.get(name) for name in GANG_ENV}, "node": context.node_id(), "began": began}


@app.task(name="tests.gloo_all_reduce")
def gloo_all_reduce() -> dict[str, Any]:
    """A real process group over the gang's rendezvous (env://, no torchrun): each rank adds rank + 1."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=__import__("datetime").timedelta(seconds=60))
    try:
        value = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(value)
        return {"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": value.item()}
    finally:
        dist.destroy_process_group()


@app.task(name="tests.gang_fail_once", bind=True)
def gang_fail_once(self: Any, seconds: float) -> dict[str, Any]:
    """Rank 1 fails on the gang's first attempt while rank 0 works on; on later attempts every
    rank returns at once."""
    attempt, rank = _attempt(self), int(os.environ["RANK"])
    if attempt == 1 and rank == 1:
        raise RuntimeError("rank 1 fails on the first attempt")
    if attempt == 1:
        time.sleep(seconds)
    return {"attempt": attempt, "rank": rank, "pid": os.getpid()}


@app.task(name="tests.gang_long_first", bind=True)
def gang_long_first(self: Any, seconds: float) -> dict[str, Any]:
    """A gang member that works ``seconds`` on its gang's first attempt (long enough to be
    preempted) and returns at once on later ones."""
    attempt = _attempt(self)
    if attempt == 1:
        time.sleep(seconds)
    return {"attempt": attempt, "rank": int(os.environ["RANK"]), "node": context.node_id()}


_runs_here = 0  # module state: how many tasks this pool process has run (workers.warm keeps it)


def _warm(seconds: float) -> dict[str, Any]:
    global _runs_here
    _runs_here += 1
    time.sleep(seconds)
    return {"pid": os.getpid(), "runs": _runs_here, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}


@app.task(name="tests.warm_state")
def warm_state(seconds: float = 0) -> dict[str, Any]:
    """Which process ran it, how many tasks that process ran, and the GPUs it saw."""
    return _warm(seconds)


@app.task(name="tests.warm_gpu", reuse=True)
def warm_gpu(seconds: float = 0) -> dict[str, Any]:
    """``warm_state`` declared ``reuse=True``: a GPU task that keeps its process."""
    return _warm(seconds)
