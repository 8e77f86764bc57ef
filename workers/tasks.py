"""Built-in tasks. ``probe`` is the smallest real model task: it shows where it ran."""

from __future__ import annotations

import os
import time
from typing import Any

from workers import context
from workers.app import app


@app.task(name="workers.tasks.probe")
def probe(seconds: float = 0) -> dict[str, Any]:
    """Sleep ``seconds`` and report the node, the GPUs this process sees, and when it ran."""
    started = time.time()
    if seconds:
        time.sleep(seconds)
    return {
        "node": context.node_id(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "pid": os.getpid(),
        "started_at": started,
        "finished_at": time.time(),
    }
