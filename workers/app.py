"""The Celery app every gpubroker worker runs, and user task modules register on.

Tasks declared with ``@app.task`` (or ``shared_task``) get ``GpuTask`` as base, so
each one passes start.lua's fence, sees only its reserved GPUs, and always ends
in finish.lua. Register your own tasks in a module and start the worker with
``gpubroker worker --node ID --tasks your.module``::

    from workers.app import app

    @app.task
    def train(epochs: int) -> dict: ...
"""

from __future__ import annotations

from broker.celery_conf import celery_settings
from broker.native.app import GpuCelery
from broker.settings import Settings

app = GpuCelery("gpubroker", task_cls="workers.task:GpuTask")
app.conf.update(celery_settings(Settings()))
app.conf.include = ["workers.tasks"]
