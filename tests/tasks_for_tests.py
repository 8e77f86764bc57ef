"""Tasks the end-to-end tests load into workers with ``--tasks tests.tasks_for_tests``."""

from __future__ import annotations

import os

from workers.app import app


@app.task(name="tests.boom")
def boom(message: str = "boom") -> None:
    raise RuntimeError(message)


@app.task(name="tests.visible")
def visible() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")
