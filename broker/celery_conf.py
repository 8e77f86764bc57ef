"""Celery settings every gpubroker process shares (client, workers, beat, Flower).

With them, any Celery app sends its tasks through the broker (``broker.native``): the transport
submits what Celery publishes, and the result backend reads the broker's task records.
Transport options must be identical everywhere that touches the node queues (Flower sums queue
lengths with them), so they are defined once here.
"""

from __future__ import annotations

import functools
import ssl
import warnings
from typing import Any
from urllib.parse import urlsplit

from celery import Celery
from celery.events.state import Task as TaskState
from celery.exceptions import CPendingDeprecationWarning
from celery.signals import worker_ready
from kombu.entity import Queue
from kombu.utils.url import parse_url

from broker.native.app import GpuCelery
from broker.redis_urls import is_sentinel, parse_sentinel
from broker.settings import Settings

TRANSPORT = "broker.native.transport:Transport"
SENTINEL_TRANSPORT = "broker.native.transport:SentinelTransport"
BACKEND = "broker.native.backend:BrokerBackend"

# Flower shows a task's fields from its events as listed here; the worker adds where a task ran
# (node, GPU indices) and its tenant to its task-started event (workers.task).
EVENT_FIELDS = ("node", "gpus", "tenant")
TaskState._fields = tuple(dict.fromkeys((*TaskState._fields, *EVENT_FIELDS)))
for _field in EVENT_FIELDS:  # unset until the task-started event says (Celery's other fields work so)
    setattr(TaskState, _field, None)


def quiet_reconnect_warning() -> None:
    """Drop the 6-line notice Celery 5 prints on every broker reconnect while
    ``worker_cancel_long_running_tasks_on_connection_loss`` is False (it says the default turns True
    in Celery 6). False is gpubroker's choice, not Celery's default: a running task outlives a Redis
    blip, and the node lease, not Celery's redelivery, decides what is lost (celery_settings)."""
    warnings.filterwarnings("ignore", message=r"\s*In Celery 5\.1 we introduced an optional breaking change",
                            category=CPendingDeprecationWarning)


quiet_reconnect_warning()


@worker_ready.connect(weak=False)
def _quiet_after_celery_logging(**_: Any) -> None:
    """Again once the worker runs: Celery's logging setup (``Logging.setup``) puts an 'always' filter
    for its deprecation warnings in front of every other, so the import-time filter alone loses."""
    quiet_reconnect_warning()


def broker_use_ssl(redis_url: str) -> dict[str, Any] | None:
    """kombu's TLS options for a ``rediss://`` URL: its ``ssl_*`` query parameters, verifying
    the server certificate unless the URL says otherwise (``ssl_cert_reqs=none``).

    redis-py reads the same parameters from the URL itself. Without this, kombu would fall
    back to CERT_NONE when the URL has no ``ssl_cert_reqs``, and Flower's queue view (which
    takes TLS options only from ``broker_use_ssl``) could not connect at all.
    """
    if is_sentinel(redis_url):
        target = parse_sentinel(redis_url)
        if not target.tls:
            return None
        reqs = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL}.get(target.ssl.get("ssl_cert_reqs", ""),
                                                                         ssl.CERT_REQUIRED)
        return {**target.ssl, "ssl_cert_reqs": reqs}
    if not redis_url.startswith("rediss://"):
        return None
    return {"ssl_cert_reqs": ssl.CERT_REQUIRED, **(parse_url(redis_url).get("ssl") or {})}


def broker_url(redis_url: str, own_transport: bool = True) -> tuple[str, dict[str, Any]]:
    """kombu's URL for a gpubroker Redis URL, and the transport options it needs: a Sentinel URL
    becomes kombu's ``sentinel://h1:p1;sentinel://h2:p2/db`` with ``master_name``. With the
    broker's own transport, only the first sentinel is in the URL and all are in ``sentinels``
    (``broker.native.transport.SentinelChannel``): kombu switches a failed connection to the next
    of several URLs with the transport their scheme names, which would drop the broker's and
    publish a task straight onto Celery's queue, past submit.lua and ``min_replicas_ack``."""
    if not is_sentinel(redis_url):
        return redis_url, {}
    target = parse_sentinel(redis_url)
    options: dict[str, Any] = {"master_name": target.service}
    if not own_transport:
        return target.kombu_url(), options
    return target.kombu_url().split(";")[0], {**options, "sentinels": [list(s) for s in target.sentinels]}


def transport_for(redis_url: str, plain: str, sentinel: str) -> str | None:
    """The explicit transport (``plain`` or ``sentinel``) for a URL the broker's transport serves."""
    scheme = urlsplit(redis_url).scheme
    if scheme in ("redis", "rediss"):
        return plain
    return sentinel if is_sentinel(redis_url) else None


def transport_options(settings: Settings) -> dict[str, Any]:
    """What ``broker.native`` reads of the gpubroker settings, carried in the transport options."""
    return {**settings.model_dump(include={"pool", "max_payload_bytes", "result_expires_s", "cancel_grace_s",
                                           "socket_timeout_s", "min_replicas_ack", "replicas_ack_timeout_s"}),
            # gpubroker's form of the pool's URL (broker_url is kombu's, which may differ: Sentinel).
            "redis_url": settings.url}


def celery_settings(settings: Settings, submit: bool = True) -> dict[str, Any]:
    """The Celery settings of a gpubroker process. ``submit=False``: kombu's own Redis transport, for
    a process that only watches (Flower, which reads queue lengths by the URL's scheme); its
    revokes still cancel through the broker, on the workers (``workers.control``)."""
    transport = transport_for(settings.url, TRANSPORT, SENTINEL_TRANSPORT) if submit else None
    url, sentinel_options = broker_url(settings.url, own_transport=transport is not None)
    return {
        "broker_url": url,
        # Tasks go through the broker: an explicit transport wins over the URL's scheme.
        **({"broker_transport": transport} if transport else {}),
        # TLS for rediss:// URLs (False, Celery's default, otherwise).
        "broker_use_ssl": broker_use_ssl(settings.url) or False,
        # JSON only: a message of another content type is rejected unread.
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        # AsyncResult reads the task records (finish.lua writes them); they expire as Celery's results do.
        "task_ignore_result": False,
        "result_backend": BACKEND,
        "result_expires": settings.result_expires_s or None,
        # Flower lists a task as soon as it is submitted.
        "task_send_sent_event": True,
        # Tasks are submitted, never pushed onto Celery's default queue: nothing is declared for it
        # (a producer writes nothing before its submit is validated, and needs no kombu bindings).
        "task_queues": (Queue("celery", no_declare=True),),
        # The dispatcher enforces rate limits before reserving: a worker never holds GPUs idle for one.
        "worker_disable_rate_limits": True,
        "task_acks_late": True,
        "worker_prefetch_multiplier": 1,
        # Task events only while a monitor asks for them (Flower's enable_events, every 5 s), as in
        # plain Celery: publishing three per task cost a worker a fifth of its time (issue 14).
        "worker_send_task_events": False,
        "task_track_started": True,
        "broker_connection_retry_on_startup": True,
        # A worker that loses Redis keeps its running tasks (they report when it is back); set, so
        # Celery 6's change of default cannot flip it (quiet_reconnect_warning).
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "broker_transport_options": {
            # Recovery is the node lease, never kombu's redelivery (celery#5935).
            "visibility_timeout": settings.visibility_timeout_s,
            "socket_timeout": settings.socket_timeout_s,
            "health_check_interval": 10,
            **sentinel_options,
            "gpubroker": transport_options(settings),
        },
    }


def monitor_app(settings: Settings | None = None, submit: bool = True) -> Celery:
    """A task-less app for ``Client``'s sends and control commands (revoke), and for Flower."""
    settings = settings or Settings()
    app = GpuCelery("gpubroker", set_as_current=False)
    app.conf.update(celery_settings(settings, submit))
    return app


@functools.cache
def _flower_app() -> Celery:
    return monitor_app(submit=False)


def __getattr__(name: str) -> Any:
    """``app``: ``celery -A broker.celery_conf:app flower`` (settings from GPUBROKER_* env). Built
    when asked for, not at import: a bad GPUBROKER_* setting must not make ``import broker`` (every
    gpubroker command) fail with a traceback before the command can say which setting is wrong."""
    if name == "app":
        return _flower_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
