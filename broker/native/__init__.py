"""Celery-native: every Celery call a user makes goes through the broker.

Celery is the interface; the broker is how it runs. A task published by any app configured with
the project's Celery settings (``broker.celery_conf``) reaches kombu's Redis transport, where
``transport`` turns it into a broker submit (``submitter``: the same validation and submit
script as ``Client.submit``) instead of a push onto a Celery queue: ``.delay``, ``apply_async``,
``send_task``, canvas callbacks, retries and beat alike. ``backend`` is the result backend:
``AsyncResult`` reads the broker's own task records. ``app`` holds the app and task classes that
add per-task resource defaults and give ``AsyncResult`` the broker's task id.
"""
