"""The "model" tasks ``bench.affinity`` serves: ``bench.affinity.model<i>``, each declared
``reuse=True``. A pool process "loads" a model (sleeps ``BENCH_LOAD_S``) when the model it holds
is not the one asked for, then answers (sleeps ``BENCH_SERVE_S``): what a process warm for
another model, or a fresh one, pays."""

from __future__ import annotations

import os
import time
from typing import Any

from workers.app import app

MODELS = 8
LOAD_S = float(os.environ.get("BENCH_LOAD_S", "0.5"))
SERVE_S = float(os.environ.get("BENCH_SERVE_S", "0.02"))
_loaded: str | None = None  # the model this process holds


def _serve(model: str) -> dict[str, Any]:
    global _loaded
    load = _loaded != model
    if load:
        time.sleep(LOAD_S)
        _loaded = model
    time.sleep(SERVE_S)
    return {"loaded": load, "pid": os.getpid()}


def _model_task(i: int) -> Any:
    name = f"bench.affinity.model{i}"

    def serve() -> dict[str, Any]:
        return _serve(name)

    serve.__name__ = f"model{i}"
    return app.task(name=name, reuse=True)(serve)


TASKS = [_model_task(i) for i in range(MODELS)]
