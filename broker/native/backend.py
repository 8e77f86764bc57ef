"""Celery's result backend, read from the broker's own task records.

``AsyncResult(id).get()``, ``.state``, ``.result``, ``.info``, ``.traceback``, groups and chords
work as with Celery's Redis backend, but a task's outcome has one home: its record, written by
the transition scripts. Nothing here keeps a second copy that could disagree. States:

| record                                | Celery state                                   |
|---------------------------------------|------------------------------------------------|
| PENDING, RESERVED                     | PENDING (RETRY while a retry waits its turn)   |
| RUNNING                               | STARTED, or the state ``update_state`` set     |
| SUCCEEDED / FAILED / CANCELLED        | SUCCESS / FAILURE (its exception) / REVOKED    |

The backend's own keys (``P celery:<key>``) hold what Celery keeps beside results: a group's
member list, a chord's counter, and the outcome Celery records for an id the broker never held
(a chord's callback that failed before it was sent).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, cast

import redis
from celery import states
from celery.backends.base import KeyValueStoreBackend
from celery.exceptions import TimeoutError as CeleryTimeout
from kombu.utils import json as kombu_json

from broker.native.transport import OPTIONS_KEY
from broker.settings import Settings
from broker.store import gangs, records
from broker.store.connection import as_broker_error, connect, transient
from broker.store.keys import PoolKeys
from broker.store.scripts import Scripts

log = logging.getLogger(__name__)

_STATES = {"SUCCEEDED": states.SUCCESS, "FAILED": states.FAILURE, "CANCELLED": states.REVOKED,
           "RUNNING": states.STARTED}


def _exception(exc_type: str, exc_module: str, message: str) -> dict[str, Any]:
    """An exception as Celery's JSON serializer writes one (``prepare_exception``)."""
    return {"exc_type": exc_type, "exc_module": exc_module, "exc_message": [message]}


TASK_META = "celery-task-meta-"  # Celery's key for a result: the backend's own keys keep Celery's names


def record_failure(client: redis.Redis, keys: PoolKeys, task_id: str, exc_type: str, message: str,
                   ttl_s: float) -> None:
    """Record, as Celery's backends do, that a task the broker never held failed: ``AsyncResult``
    then raises ``exc_type(message)`` instead of waiting for ever."""
    meta = {"task_id": task_id, "status": states.FAILURE, "result": _exception(exc_type, "gpubroker", message),
            "traceback": None, "children": [], "date_done": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())}
    client.set(keys.celery(TASK_META + task_id), json.dumps(meta), px=int(ttl_s * 1000) or None)


class BrokerBackend(KeyValueStoreBackend):
    """``result_backend = "broker.native.backend:BrokerBackend"`` (set by ``celery_conf``)."""

    supports_autoexpire = True  # records expire with result_expires: no celery.backend_cleanup task
    supports_native_join = True  # get_many reads the records (mget)
    implements_incr = True  # chords count their parts here
    FIRST_POLL_S = 0.01

    def __init__(self, app: Any, url: str | None = None, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        options = dict((app.conf.broker_transport_options or {}).get(OPTIONS_KEY) or {})
        values = {**Settings().model_dump(), **options}
        if app.conf.broker_url and "redis_url" not in options:  # a Celery app not from celery_conf
            values["redis_url"] = app.conf.broker_url
        self.settings = Settings(**values)
        self.keys = PoolKeys(self.settings.pool)
        self._client: redis.Redis | None = None
        self._scripts: Scripts | None = None

    @property
    def client(self) -> redis.Redis:
        if self._client is None:  # after fork, in the process that uses it
            self._client = connect(self.settings)
        return self._client

    @property
    def scripts(self) -> Scripts:
        if self._scripts is None:
            self._scripts = Scripts(self.client, self.keys)
        return self._scripts

    # ---- the backend's own keys ---------------------------------------------------------------

    def _key(self, key: bytes | str) -> str:
        return self.keys.celery(key.decode() if isinstance(key, bytes) else key)

    def get(self, key: bytes | str) -> Any:
        return self.client.get(self._key(key))

    def mget(self, keys: list[bytes | str]) -> list[Any]:
        """The backend's own keys; a task's result key reads its record (``get_many``,
        ``join_native``, ``GroupResult.collect`` come this way)."""
        if not keys:
            return []
        names = [k.decode() if isinstance(k, bytes) else k for k in keys]
        values = cast(list[Any], self.client.mget([self._key(k) for k in names]))
        prefix = self.task_keyprefix.decode()
        ids = [(i, name[len(prefix):]) for i, name in enumerate(names) if values[i] is None and name.startswith(prefix)]
        if ids:
            with self.client.pipeline(transaction=False) as pipe:
                for _, task_id in ids:
                    pipe.hgetall(self.keys.task(task_id))
                for (i, task_id), h in zip(ids, pipe.execute(), strict=True):
                    if h:
                        values[i] = self.encode(self._record_meta(task_id, h))
        return values

    def set(self, key: bytes | str, value: Any) -> None:
        ttl = int(self.expires * 1000) if self.expires else None
        self.client.set(self._key(key), value, px=ttl)

    def delete(self, key: bytes | str) -> None:
        self.client.delete(self._key(key))

    def incr(self, key: bytes | str) -> int:
        return int(self.client.incr(self._key(key)))

    def expire(self, key: bytes | str, value: Any) -> None:
        name = key.decode() if isinstance(key, bytes) else key
        if name.startswith(self.task_keyprefix.decode()):
            return  # a task's outcome lives in its record, which expires on its own
        if value:
            self.client.pexpire(self._key(name), int(float(value) * 1000))

    # ---- results ---------------------------------------------------------------------------

    def _get_task_meta_for(self, task_id: str) -> dict[str, Any]:
        h = cast(dict[bytes, bytes], self.client.hgetall(self.keys.task(task_id)))
        if not h:  # not a broker task: what Celery recorded of it here, if anything
            return cast(dict[str, Any], super()._get_task_meta_for(task_id))
        h = gangs.as_record(self.client, self.keys, task_id, h)  # a gang: its deciding member's outcome
        return cast(dict[str, Any], self.meta_from_decoded(self._record_meta(task_id, h)))

    def _record_meta(self, task_id: str, h: dict[bytes, bytes]) -> dict[str, Any]:
        """Celery's result meta for a task record, as its backends store it (before decoding)."""
        status = records.task_status(task_id, h, None)
        state, result, traceback = _STATES.get(status.state.value, states.PENDING), None, None
        if status.state.value in ("PENDING", "RESERVED") and status.retried:
            state, result = states.RETRY, _exception("Retry", "celery.exceptions", status.retry_reason or "")
        elif status.state.value == "RUNNING":
            state = status.progress_state or states.STARTED
            result = status.progress if status.progress_state else {"hostname": status.node}
        elif status.state.value == "SUCCEEDED":
            result = kombu_json.loads(h[b"result"]) if b"result" in h else None  # datetimes etc. revived
        elif status.state.value == "FAILED":
            exc = status.exception or {}
            traceback = exc.get("traceback")
            result = {k: v for k, v in exc.items() if k != "traceback"} or _exception(
                "Exception", "builtins", status.error or "failed")
        elif status.state.value == "CANCELLED":
            result = _exception("TaskRevokedError", "celery.exceptions", status.error or "revoked")
        meta = {"task_id": task_id, "status": state, "result": result, "traceback": traceback,
                "children": json.loads(h[b"children"]) if b"children" in h else [],
                "date_done": status.finished_at and time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(status.finished_at)),
                "name": status.name, "retries": status.attempts}
        return meta

    def _store_result(self, task_id: str, result: Any, state: str, traceback: str | None = None,
                      request: Any = None, **kwargs: Any) -> Any:
        """Only what the records do not say already: a running task's custom state (update_state),
        the children a finished one started, and outcomes of ids the broker does not hold.

        An attempt's own writes (its request carries the delivery tag reserve.lua gave it) never
        fail the task: STARTED is not stored (start.lua made the record RUNNING), its outcome is
        finish.lua's, and a custom state or the children that Redis cannot take now are dropped
        with a warning (they describe the task; a Redis outage must not fail one that ran)."""
        tag = str(((getattr(request, "properties", None) or {}).get("delivery_tag") or "") if request else "")
        if not tag.startswith(f"{task_id}."):  # not an attempt of a broker task: maybe an id it never held
            if self.client.exists(self.keys.task(task_id)):
                return result  # its record says it
            return super()._store_result(task_id, result, state, traceback, request, **kwargs)
        try:
            if state not in states.ALL_STATES:
                self.scripts.progress(task_id, tag, state, json.dumps(self.prepare_value(result), default=str))
            elif state == states.SUCCESS:
                children = self.current_task_children(request)
                if children:
                    self.client.hset(self.keys.task(task_id), "children", json.dumps(children))
        except redis.RedisError as exc:
            if not transient(exc):
                raise
            log.warning("task %s: %s not recorded (%s)", task_id,
                        "its children" if state == states.SUCCESS else f"state {state}", as_broker_error(exc))
        return result

    def _forget(self, task_id: str) -> None:
        """Drop a finished task's record now rather than at its expiry (a live one stays)."""
        key = self.keys.task(task_id)
        with self.client.pipeline() as pipe:
            try:
                pipe.watch(key)
                state = pipe.hget(key, "state")
                if state in (b"SUCCEEDED", b"FAILED", b"CANCELLED"):
                    pipe.multi()
                    pipe.delete(key)
                    pipe.execute()
            except redis.WatchError:
                pass
        super()._forget(task_id)

    def wait_for(self, task_id: str, timeout: float | None = None, interval: float = 0.5, no_ack: bool = True,
                 on_interval: Any = None) -> dict[str, Any]:
        """Celery's polling loop, starting at 10 ms rather than ``interval`` (a short task is seen
        done as soon as it is), and asking ``on_interval`` (a failed parent raises there) before
        returning what it found, as Celery's Redis backend does."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = min(self.FIRST_POLL_S, interval)
        while True:
            meta = cast(dict[str, Any], self.get_task_meta(task_id))
            if on_interval:  # a failed parent's error first, as Celery's Redis backend raises it
                on_interval()
            if meta["status"] in states.READY_STATES:
                return meta
            if deadline is not None and time.monotonic() >= deadline:
                raise CeleryTimeout("The operation timed out.")
            time.sleep(pause if deadline is None else max(0.0, min(pause, deadline - time.monotonic())))
            pause = min(pause * 2, interval)

    def as_uri(self, include_password: bool = False) -> str:
        return f"gpubroker://{self.settings.pool}"
