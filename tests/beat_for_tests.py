"""A Celery beat schedule on the gpubroker app: ``celery -A tests.beat_for_tests beat``.

Every second beat sends ``tests.note`` with the path in ``GPUBROKER_TEST_BEAT_FILE``.
"""

from __future__ import annotations

import os

import tests.tasks_for_tests  # noqa: F401  (the tasks beat sends)
from workers.app import app

app.conf.beat_schedule = {
    "note-every-second": {"task": "tests.note", "schedule": 1.0,
                          "args": (os.environ.get("GPUBROKER_TEST_BEAT_FILE", "/dev/null"),)},
}
