"""Celery settings every gpubroker process shares (client, workers, Flower).

Transport options must be identical everywhere that touches the node queues
(Flower sums queue lengths with them), so they are defined once here.
"""

from __future__ import annotations

import ssl
from typing import Any

from celery import Celery
from kombu.utils.url import parse_url

from broker.settings import Settings


def broker_use_ssl(redis_url: str) -> dict[str, Any] | None:
    """kombu's TLS options for a ``rediss://`` URL: its ``ssl_*`` query parameters, verifying
    the server certificate unless the URL says otherwise (``ssl_cert_reqs=none``).

    redis-py reads the same parameters from the URL itself. Without this, kombu would fall
    back to CERT_NONE when the URL has no ``ssl_cert_reqs``, and Flower's queue view (which
    takes TLS options only from ``broker_use_ssl``) could not connect at all.
    """
    if not redis_url.startswith("rediss://"):
        return None
    return {"ssl_cert_reqs": ssl.CERT_REQUIRED, **(parse_url(redis_url).get("ssl") or {})}


def celery_settings(settings: Settings) -> dict[str, Any]:
    return {
        "broker_url": settings.redis_url,
        # TLS for rediss:// URLs (False, Celery's default, otherwise).
        "broker_use_ssl": broker_use_ssl(settings.redis_url) or False,
        # JSON only: a message of another content type is rejected unread.
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        # Results live in the task record (finish.lua), not in a Celery backend.
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        "worker_prefetch_multiplier": 1,
        "worker_send_task_events": True,
        "task_track_started": True,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            # Recovery is the node lease, never kombu's redelivery (celery#5935).
            "visibility_timeout": settings.visibility_timeout_s,
            "socket_timeout": settings.socket_timeout_s,
            "health_check_interval": 10,
        },
    }


def monitor_app(settings: Settings | None = None) -> Celery:
    """A task-less app for Flower and control commands (revoke)."""
    settings = settings or Settings()
    app = Celery("gpubroker", set_as_current=False)
    app.conf.update(celery_settings(settings))
    return app


#: ``celery -A broker.celery_conf:app flower`` (settings from GPUBROKER_* env).
app = monitor_app()
