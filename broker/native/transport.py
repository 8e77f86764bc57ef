"""kombu's Redis transport, where a Celery task publish becomes a broker submit.

Every process configured with the project's Celery settings uses it (``celery_conf`` names it
``broker_transport``): the client, workers (``workers.rejects`` adds its guards on top), beat,
Flower. Celery builds the message as always; ``_put``, where kombu would push it onto a Celery
queue, hands it to ``Submitter.submit_message`` instead. Everything else (events, control
broadcasts and their replies, the node queues workers read) is plain kombu. Two more things
are caught on the way, each then passed on as kombu would:

- a ``revoke`` broadcast (``AsyncResult.revoke``, ``app.control.revoke``, Flower's buttons)
  cancels through the broker before the workers hear it;
- inside a running task, the message Celery's ``Task.retry`` or ``Task.replace`` publishes for
  the task itself (under its own id) is kept for ``workers.task``, which ends the attempt as a
  retry with it, or submits it as what replaced the task, rather than submitted as a second
  task under the same id.

A producer the app acquires publishes in a kombu batch (``GpuCelery.producer_or_acquire``,
``SubmitBatch``): every task published while it is held (one ``delay``; a group's or a chord
header's members, which share it) is checked at once, as it is published, and written when the
producer is released, pipelined (``Submitter.submit_admitted``), before the batch's other
commands (the task-sent events). A member that is refused leaves none of the others written.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import redis
from celery._state import get_current_worker_task
from kombu.transport import redis as kombu_redis
from kombu.utils.functional import retry_over_time

from broker.models import SubmitRequest
from broker.native.events import ROUTING_KEY as SENT_ROUTING_KEY
from broker.native.messages import BadMessage, TaskMessage, revoke_request, task_message
from broker.native.submitter import Submitter
from broker.settings import Settings
from broker.store.connection import FollowMasterConnection, FollowMasterSSLConnection

log = logging.getLogger(__name__)

#: broker_transport_options key with the gpubroker settings this transport needs (celery_conf).
OPTIONS_KEY = "gpubroker"
#: ... and with the app's task_publish_retry_policy (GpuCelery), for the writes a batch makes.
RETRY_KEY = "gpubroker_publish_retry"

_local = threading.local()


RESULTS_KEPT = 1024  # a producer that never reads them (a plain Celery app) keeps this many


def _results() -> dict[str, tuple[str, bool]]:
    results: dict[str, tuple[str, bool]] | None = getattr(_local, "results", None)
    if results is None:
        results = _local.results = {}
    elif len(results) >= RESULTS_KEPT:
        del results[next(iter(results))]
    return results


def submitted(task_id: str) -> tuple[str, bool] | None:
    """What the last publish of ``task_id`` in this thread became: (the id the task is known by,
    created); an idempotency key already taken names another task. Read once."""
    return _results().pop(task_id, None)


class OwnMessage:
    """The message the running task published under its own id (``Task.retry``, or
    ``Task.replace`` once ``replacing`` said so), kept for ``workers.task``."""

    _pending: dict[str, TaskMessage] = {}
    _replacing: set[str] = set()

    @classmethod
    def replacing(cls, task_id: str) -> None:
        """The running task ``task_id`` is replacing itself: what it sends under its id is kept."""
        cls._replacing.add(task_id)

    @classmethod
    def replaced(cls, task_id: str) -> bool:
        return task_id in cls._replacing

    @classmethod
    def keep(cls, task: TaskMessage) -> None:
        cls._pending[task.id] = task

    @classmethod
    def take(cls, task_id: str) -> TaskMessage | None:
        cls._replacing.discard(task_id)
        return cls._pending.pop(task_id, None)


def _own(task: TaskMessage) -> bool:
    """Is this the running task (in this process) publishing its own retry, or what replaces it?"""
    current = get_current_worker_task()
    request = getattr(current, "request", None)
    return (request is not None and request.id == task.id and not request.called_directly
            and (task.retries > int(request.retries or 0) or OwnMessage.replaced(task.id)))


def _sent_event_of(task_id: str, topic: Any, payload: Any) -> bool:
    """Is ``payload`` (kombu's fanout message on ``topic``) Celery's task-sent event of ``task_id``?"""
    if not str(topic).endswith(SENT_ROUTING_KEY):
        return False
    try:
        message = json.loads(payload)
        body = message["body"]
        if message["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        return bool(json.loads(body).get("uuid") == task_id)
    except (ValueError, KeyError, TypeError, AttributeError):
        return False


class SubmitBatch(kombu_redis.PublishBatch):
    """kombu's publish batch, holding the task messages published through it as checked requests
    until the flush writes them in order, one pipelined round trip per chunk of 500. The task-sent
    event Celery publishes right behind a task rides in that task's submit.lua call (published
    there once the task is created, as ``Client.submit``'s): one round trip for a ``delay``, not two."""

    def __init__(self, channel: Channel, max_size: int) -> None:
        super().__init__(channel, max_size)
        self.tasks: list[tuple[str, SubmitRequest, str]] = []
        self.events: dict[str, tuple[str, str]] = {}  # task id -> its task-sent event (channel, payload)
        self._last: str | None = None  # the task just held, while its event may follow

    def add(self, name: str, *args: Any) -> None:
        if name == "publish" and self._last is not None and _sent_event_of(self._last, *args):
            self.events[self._last] = (str(args[0]), str(args[1]))
        else:
            super().add(name, *args)
        self._last = None

    def add_task(self, task: TaskMessage) -> None:
        submitter = self.channel.submitter
        req = submitter.request(task.name, task.args, task.kwargs, task.options, task.not_before, task.expires_at)
        stored = task.stored()
        submitter.admit(req, stored)  # refused here, as its publish: nothing of the batch is written then
        self._last = None
        if req.idempotency_key:  # its AsyncResult must name the task the key stands for at once
            self.flush_tasks()
            _results()[task.id] = submitter.submit_one(task.id, req, stored)
            return
        if len(self.tasks) >= self.max_size:
            self.flush_tasks()
        self.tasks.append((task.id, req, stored))
        self._last = task.id

    def flush_tasks(self) -> None:
        """Write the tasks held, retried on a lost connection as Celery retries a publish (the
        app's ``task_publish_retry_policy``): a task written by a try whose reply was lost
        answers for itself (``Submitter._known_as``)."""
        tasks, events, self.tasks, self.events = self.tasks, self.events, [], {}
        if not tasks:
            return
        policy = self.channel.publish_retry  # kombu's retry loop, as Celery's publish runs it
        written = retry_over_time(self._write, (redis.ConnectionError, redis.TimeoutError), (tasks, events),
                                  max_retries=policy.get("max_retries", 3),
                                  interval_start=policy.get("interval_start", 0),
                                  interval_step=policy.get("interval_step", 0.2),
                                  interval_max=policy.get("interval_max", 1))
        for (task_id, _req, _stored), known in zip(tasks, written, strict=True):
            _results()[task_id] = known

    def _write(self, tasks: list[tuple[str, SubmitRequest, str]],
               events: dict[str, tuple[str, str]]) -> list[tuple[str, bool]]:
        submitter: Submitter = self.channel.submitter
        if len(tasks) == 1:  # a delay: Client.submit's own call, over the connection scripts are kept on
            return [submitter.submit_one(*tasks[0], events.get(tasks[0][0]))]
        return submitter.submit_admitted(tasks, events=events)

    def flush(self) -> None:
        self._check_usable()
        self.flush_tasks()
        super().flush()

    def discard(self) -> None:
        self.tasks, self.events, self._last = [], {}, None
        super().discard()


class Channel(kombu_redis.Channel):
    _submitter: Submitter | None = None
    _shared: tuple[Any, Any] | None = None  # (kombu's connection pool, one Redis client on it)

    @contextlib.contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        """kombu's, without building a Redis client for every ack and every delivery (kombu makes
        one each time; redis-py 8's constructor was 15% of a worker's main process per task): one
        client per connection pool, made again when kombu replaces the pool (a fork, a reconnect).
        A client only borrows the pool's connections, so sharing it is what kombu's does anyway."""
        if client:
            yield client
            return
        pool = self.pool
        if self._shared is None or self._shared[0] is not pool:
            self._shared = (pool, self._create_client())
        yield self._shared[1]

    @property
    def publish_retry(self) -> dict[str, Any]:
        """The app's retry policy for a publish (``GpuCelery``; Celery's defaults without one)."""
        return dict(self.connection.client.transport_options.get(RETRY_KEY) or {})

    @property
    def submitter(self) -> Submitter:
        if self._submitter is None:
            options = dict(self.connection.client.transport_options.get(OPTIONS_KEY) or {})
            settings = Settings(**{**Settings().model_dump(), **options})
            client = self._create_client()
            client.replicas_ack = (settings.min_replicas_ack, int(settings.replicas_ack_timeout_s * 1000))
            self._submitter = Submitter(settings, client)
        return self._submitter

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        try:
            task = task_message(message)
        except BadMessage as exc:
            raise ValueError(f"gpubroker cannot submit this task message: {exc}") from None
        if task is None:
            super()._put(queue, message, **kwargs)
            return
        batch = kwargs.pop("_publish_batch", None)
        if _own(task):
            OwnMessage.keep(task)
        elif isinstance(batch, SubmitBatch):
            batch.add_task(task)
        else:
            _results()[task.id] = self.submitter.submit_message(task)

    def create_publish_batch(self, max_size: int) -> SubmitBatch:
        return SubmitBatch(self, max_size)

    def _put_fanout(self, exchange: str, message: Any, routing_key: str, **kwargs: Any) -> None:
        revoke = revoke_request(message)
        if revoke is not None:
            try:
                self.submitter.revoke(*revoke)
            except redis.exceptions.NoPermissionError:
                log.info("revoke: this Redis user may not release node capacity; the workers will")
        super()._put_fanout(exchange, message, routing_key, **kwargs)


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """The same, on kombu's Sentinel transport (a ``redis+sentinel://`` URL, ``celery_conf``), with
    connections that look the master up again on every reconnect (``FollowMasterConnection``)."""

    connection_class = FollowMasterConnection
    connection_class_ssl = FollowMasterSSLConnection  # type: ignore[assignment]  # kombu's own, the same bases
    # Every sentinel (celery_conf.broker_url): the URL names one, so that kombu never switches the
    # connection to another URL, and this transport with it, for kombu's own.
    sentinels: list[list[Any]] | None = None
    from_transport_options = (*kombu_redis.SentinelChannel.from_transport_options, "sentinels")  # type: ignore[assignment]

    def _sentinel_managed_pool(self, asynchronous: bool = False) -> Any:
        """kombu's, asking every sentinel of ``sentinels`` (kombu reads them from the URL's alternates)."""
        client = self.connection.client
        if not self.sentinels:
            return super()._sentinel_managed_pool(asynchronous)
        alternates, client.alt = client.alt, [f"sentinel://{host}:{port}" for host, port in self.sentinels]
        try:
            return super()._sentinel_managed_pool(asynchronous)
        finally:
            client.alt = alternates


class SentinelTransport(Transport, kombu_redis.SentinelTransport):
    Channel = SentinelChannel
