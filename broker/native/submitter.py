"""The one submit path, and the one cancel path behind Celery's revoke.

``Client.submit``, ``apply_async``/``delay``/``send_task``, canvas callbacks, retries, beat,
and messages published straight to Celery's default queue all end in ``Submitter.submit``:
a request validated field by field (``SubmitRequest``), refused at once when no registered
node runs its task name or could ever hold it, then written by submit.lua.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple, cast

import redis

from broker.errors import InvalidRequest, NotRegistered, Unsatisfiable
from broker.models import NodeView, Resources, SubmitRequest
from broker.native.messages import TaskMessage
from broker.scheduling.shortfall import shortfall
from broker.settings import Settings
from broker.store import gangs, reads
from broker.store.connection import SentCommand, bulk, replicas_ack, wait_command, wait_replicas
from broker.store.keys import PoolKeys
from broker.store.records import StoredRequest
from broker.store.scripts import (
    SIGNATURES,
    CancelCode,
    Clock,
    Scripts,
    SubmitCode,
    as_text,
    script_source,
    wall_clock_ms,
)


def declared(defaults: Mapping[str, Any], name: str) -> Any:
    """A task's declared default: a Resources object becomes the dict it validates from."""
    value = defaults.get(name)
    return value.model_dump() if isinstance(value, Resources) else value


_DECLARED = ("resources", "priority", "tenant", "preemptible", "estimated_runtime_s")  # @app.task may set these
_PASSED = ("idempotency_key", "max_retries", "replicas", "spread", "same_label", "min_replicas")  # as given only
_NO_RESOURCES = Resources()
BATCH_CHUNK = 500  # submit.lua calls per pipelined round trip (``submit_admitted``)


def _arg(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _evalsha(head: bytes, encoded: dict[Any, bytes], arguments: tuple[Any, ...]) -> bytes:
    """One submit.lua call in the Redis protocol: ``head`` (EVALSHA, sha, key count) and each
    argument as a bulk string; the short ones a batch repeats (its keys, tenant, name, codes)
    are encoded once (``encoded``), which halved a batch's encoding."""
    parts = [head]
    for value in arguments:
        cacheable = type(value) is str or type(value) is int  # exact types: True == 1, 1.0 == 1
        done = encoded.get(value) if cacheable else None
        if done is None:
            done = bulk(_arg(value))
            if cacheable and len(done) < 200 and len(encoded) < 4096:
                encoded[value] = done
        parts.append(done)
    return b"".join(parts)


class _Flight(NamedTuple):
    """A chunk of a batch sent, its replies not read yet: ``start`` is its first task's index."""

    start: int
    part: Sequence[tuple[str, SubmitRequest, str]]
    command: bytes
    wait: bytes | None
    sent: SentCommand


# What a request's StoredRequest is made of (store.records.encode_request), but its resources;
# SubmitRequest's other fields are _UNSHAPED. tests/test_submit_many.py holds the two to all its fields.
_SHAPED = ("task_name", "tenant", "priority", "estimated_runtime_s", "preemptible", "replicas", "spread",
           "same_label", "min_replicas")
_UNSHAPED = ("args", "kwargs", "idempotency_key", "max_retries", "not_before", "expires_at")
_shape = operator.attrgetter(*_SHAPED)


_RESOURCES_SCALARS = ("gpus", "gpu_memory_mb", "cpus", "memory_mb", "min_gpus")  # with labels: every field (a test)
_resource_scalars = operator.attrgetter(*_RESOURCES_SCALARS)


def _resources_key(r: Resources) -> tuple[Any, ...]:
    """Every field of ``r``, hashable (the labels as their repr)."""
    return _resource_scalars(r), repr(r.labels) if r.labels else ""


class Submitter:
    """Submits and cancels in one pool through one Redis connection."""

    NODES_CACHE_S = 5.0  # how long a read of the registered nodes serves submit-time checks

    def __init__(self, settings: Settings, client: redis.Redis, clock: Clock = wall_clock_ms) -> None:
        self.settings = settings
        self.keys = PoolKeys(settings.pool)
        self.redis = client
        self.scripts = Scripts(client, self.keys, clock)
        self.catalogue = reads.Catalogue(self.NODES_CACHE_S)
        self._nodes: tuple[float, list[NodeView]] | None = None
        self._fits: dict[tuple[Any, ...], bool] = {}  # (task name, resources) some node of _nodes runs
        self._node_access = True  # until Redis refuses this user a node key (cancel)

    # ---- submit ---------------------------------------------------------------------------

    def request(self, name: str, args: Any, kwargs: Any, options: Mapping[str, Any], not_before: float | None = None,
                expires_at: float | None = None) -> SubmitRequest:
        """The validated request: ``options`` as given, the rest from what workers registered of
        the task name (its ``@app.task`` defaults), then the built-in defaults."""
        # (a name that is not a string is refused by SubmitRequest below, naming the field)
        defaults = self.catalogue.get(self.redis, self.keys).get(name) if isinstance(name, str) else None
        values = {key: options[key] if options.get(key) is not None else declared(defaults, key)
                  for key in _DECLARED} if defaults else {key: options.get(key) for key in _DECLARED}
        resources = values["resources"]
        if resources is None:  # one frozen object for all that ask for nothing (building one: a fifth of this)
            resources = _NO_RESOURCES
        elif isinstance(resources, Mapping):
            try:
                resources = Resources(**resources)
            except InvalidRequest as exc:
                raise InvalidRequest({f"resources.{k}": v for k, v in exc.problems.items()}) from None
        elif not isinstance(resources, Resources):
            raise InvalidRequest({"resources": f"must be Resources(...) or a dict of its fields, not "
                                               f"{type(resources).__name__}"})
        given = {**values, "resources": resources, "not_before": not_before, "expires_at": expires_at,
                 **{key: options.get(key) for key in _PASSED}}
        return SubmitRequest(task_name=name, args=args if args is not None else [],
                             kwargs=kwargs if kwargs is not None else {},
                             **{k: v for k, v in given.items() if v is not None})

    def submit(self, task_id: str, req: SubmitRequest, message: str) -> tuple[str, bool]:
        """Write the task; returns the id it is known by and whether this call created it (an
        idempotency key already taken returns the task it stands for)."""
        self.admit(req, message)
        return self.submit_one(task_id, req, message)

    def submit_one(self, task_id: str, req: SubmitRequest, message: str,
                   event: tuple[str, str] | None = None) -> tuple[str, bool]:
        """``submit`` of a task that passed ``admit``, publishing ``event`` (its task-sent event)
        in submit.lua's call once it is created. A gang sends none: the job id never runs as a
        Celery task, its members do (``<id>:m<rank>``, ``root_id`` the job's), and Flower lists
        them from the workers' events; a sent event would leave the job id SENT there for ever."""
        ttl_ms = int(self.settings.result_expires_s * 1000)
        if req.replicas == 1:
            return self._known_as(task_id, *self.scripts.submit(task_id, req, message, result_ttl_ms=ttl_ms,
                                                                event=event))
        return self._known_as(task_id, *gangs.submit_gang(self.scripts, task_id, req, message, ttl_ms))

    def admit(self, req: SubmitRequest, message: str) -> None:
        """Every check ``submit`` makes before writing: the encoded size, then ``check``."""
        if len(message) > self.settings.max_payload_bytes:
            field = "kwargs" if len(str(req.kwargs)) > len(str(req.args)) else "args"
            raise InvalidRequest({field: f"the encoded task (args and kwargs) is {len(message)} bytes; the limit "
                                         f"is {self.settings.max_payload_bytes}"})
        self.check(req)

    def submit_admitted(self, tasks: Sequence[tuple[str, SubmitRequest, str]], chunk: int = BATCH_CHUNK,
                        events: Mapping[str, tuple[str, str]] | None = None) -> list[tuple[str, bool]]:
        """Write tasks that passed ``admit``, in order, one pipelined round trip per ``chunk``;
        returns what ``submit`` returns for each. Each task is its own submit.lua call, so an
        idempotency key taken earlier in the same batch returns that task, as across batches.
        ``events``: task id -> (channel, payload) its submit.lua publishes once it is created.

        A chunk is sent before the next one is encoded and its replies are read after: Redis runs
        one chunk while Python encodes the next, instead of each waiting for the other. One chunk
        is in flight at a time, so the order of the writes is the order of ``tasks``."""
        ttl_ms = int(self.settings.result_expires_s * 1000)
        sha, n_keys = self.scripts.sha("submit").encode(), b"%d" % len(SIGNATURES["submit"][1])
        n_args = 3 + len(SIGNATURES["submit"][1]) + len(SIGNATURES["submit"][2])
        head = b"*%d\r\n" % n_args + b"".join(bulk(part) for part in (b"EVALSHA", sha, n_keys))
        encoded: dict[Any, bytes] = {}  # argument -> its bulk string, for those a batch repeats
        stored: dict[tuple[Any, ...], StoredRequest] = {}  # _shape -> its stored request
        known: list[tuple[str, bool]] = []
        flight: _Flight | None = None
        try:
            for start, part in _runs(tasks, chunk):
                if part[0][1].replicas > 1:  # a gang: its own submit_gang.lua call, in its place
                    if flight:
                        known += self._written(flight)
                    flight = None
                    known.append(self.submit_one(*part[0]))
                    continue
                # Encoded here, not through redis-py's Pipeline: its per-command bookkeeping cost a
                # batch about as much as submit.lua's own run (bench/submit.py).
                command = b"".join([_evalsha(head, encoded, (*keys, *args)) for keys, args in (
                    self.scripts.submit_call(task_id, req, message, self._stored(stored, req), result_ttl_ms=ttl_ms,
                                             event=events.get(task_id) if events else None)
                    for task_id, req, message in part)])
                if flight:
                    known += self._written(flight)
                wait = wait_command(self.redis)  # min_replicas_ack: WAIT behind the chunk, on its connection
                flight = _Flight(start, part, command, wait, SentCommand(self.redis, command, wait, len(part)))
            if flight:
                known += self._written(flight)
        except BaseException:
            if flight:  # if its replies are unread, the connection cannot be reused
                flight.sent.discard()
            raise
        return known

    @staticmethod
    def _stored(stored: dict[tuple[Any, ...], StoredRequest], req: SubmitRequest) -> StoredRequest:
        """``StoredRequest.of(req)``, once per shape of request in a batch (it was an eighth of a
        batch's Python time, and a batch is mostly one shape)."""
        shape = (_shape(req), _resources_key(req.resources))
        found = stored.get(shape)
        if found is None:
            found = StoredRequest.of(req)
            if len(stored) < 4096:
                stored[shape] = found
        return found

    def _written(self, flight: _Flight) -> list[tuple[str, bool]]:
        """What ``submit`` returns for each task of a chunk sent, once its replies are read."""
        try:
            replies = flight.sent.replies()
        except redis.exceptions.NoScriptError:  # Redis restarted or SCRIPT FLUSH: load it, send again
            # (safe: a task this chunk wrote before the flush answers ID_TAKEN, its own id)
            self.redis.script_load(script_source("submit"))
            replies = SentCommand(self.redis, flight.command, flight.wait, len(flight.part)).replies()
        if flight.wait:
            wait_replicas(replies.pop(), *replicas_ack(self.redis))
        known = []
        for offset, ((task_id, _, _), (code, existing, *why)) in enumerate(zip(flight.part, replies, strict=True)):
            if code == SubmitCode.BAD_REQUEST:  # admit mirrors submit.lua's checks: not expected
                index = flight.start + offset
                raise InvalidRequest({f"[{index}]": f"refused by submit.lua ({as_text(existing)}: "
                                      f"{as_text(why[0])}); the {index} tasks before it were written"})
            known.append(self._known_as(task_id, SubmitCode(code), as_text(existing)))
        return known

    @staticmethod
    def _known_as(task_id: str, code: SubmitCode, existing: str) -> tuple[str, bool]:
        if code is SubmitCode.DUPLICATE:
            return existing, existing == task_id
        # ID_TAKEN: the id is this call's own (a fresh or idempotency-derived uuid): the reply to an
        # earlier try was lost and kombu or redis-py sent it again.
        return task_id, True

    def submit_message(self, task: TaskMessage) -> tuple[str, bool]:
        """Submit a task as Celery published it."""
        req = self.request(task.name, task.args, task.kwargs, task.options, task.not_before, task.expires_at)
        return self.submit(task.id, req, task.stored())

    def check(self, req: SubmitRequest) -> None:
        """Refuse what no node that is up runs or could ever hold (a draining node counts: it may be
        undrained; a down one does not, and is named when only it could have held the request).
        Nodes are cached briefly to keep submit cheap; a refusal is always confirmed against a
        fresh read. With no node up at all (none started yet, or all restarting) anything is taken."""
        nodes = self._registered(fresh=False)
        # A batch asks the same few things thousands of times: what fits these nodes is kept
        # with them (the check was a fifth of a batch submit's time).
        fit = (req.task_name, _resources_key(req.resources))
        if fit in self._fits or not self._refusal(req, nodes):
            if len(self._fits) < 1024:
                self._fits[fit] = True
            self._check_gang(req, nodes)
            return
        refusal = self._refusal(req, self._registered(fresh=True))
        if refusal is not None:
            raise refusal
        self._check_gang(req, self._registered(fresh=False))

    @staticmethod
    def _check_gang(req: SubmitRequest, nodes: list[NodeView]) -> None:
        if req.replicas > 1:
            gangs.check_gang(req, [n for n in nodes if n.state == "up" and (n.serves is None or
                                                                             req.task_name in n.serves)])

    def _registered(self, fresh: bool) -> list[NodeView]:
        now = time.monotonic()
        if fresh or self._nodes is None or now - self._nodes[0] > self.NODES_CACHE_S:
            self._nodes = (now, reads.read_nodes(self.redis, self.keys))
            self._fits = {}
        return self._nodes[1]

    @staticmethod
    def _refusal(req: SubmitRequest, nodes: list[NodeView]) -> InvalidRequest | None:
        up = [n for n in nodes if n.state == "up"]
        if not up:
            return None
        runs = [n for n in up if n.serves is None or req.task_name in n.serves]
        if not runs:
            return NotRegistered(req.task_name)
        short = shortfall(req.resources, runs)
        if not short:
            return None
        departed = [n.id for n in nodes if n.state != "up" and (n.serves is None or req.task_name in n.serves)
                    and not shortfall(req.resources, [n])]
        if departed:
            field = next(iter(short))
            short[field] += (f" (only node{'s' * (len(departed) > 1)} {', '.join(departed)}, now down, could have "
                             "held it; the nodes that are up cannot)")
        return Unsatisfiable(short)

    # ---- cancel -----------------------------------------------------------------------------

    def cancel(self, task_id: str, mode: str = "cancel") -> tuple[CancelCode, str]:
        """Cancel (``mode="revoke"``: a running attempt may finish) wherever the task is now.

        A reserved task's release writes its node, which a Redis user without node access (the
        producer role) may not do: such a caller asks instead (REQUESTED), and the dispatcher
        carries it out on its next cycle. The first refusal is remembered, so each Submitter
        tries (and Redis logs an ACL denial) once."""
        state, held_by = cast(list[bytes | None], self.redis.hmget(self.keys.task(task_id), "state", "node"))
        # A running task is only marked (its worker releases it): no node key needed.
        node = held_by.decode() if held_by and state != b"RUNNING" and self._node_access else None
        grace_ms = int(self.settings.cancel_grace_s * 1000)
        for _ in range(10):
            try:
                code, detail = self.scripts.cancel(task_id, node, mode, grace_ms, ask=not self._node_access)
            except redis.exceptions.NoPermissionError:
                if node is None or not self._node_access:
                    raise
                self._node_access, node = False, None
                continue
            if code is not CancelCode.MOVED:
                return code, detail
            node = detail or None
        return code, detail

    def revoke(self, task_ids: list[str], terminate: bool) -> None:
        """Celery's revoke of ``task_ids``, through the broker; tasks it does not know are left to
        Celery (a chord's callback, say, has no record until it is sent)."""
        for task_id in task_ids:
            self.cancel(task_id, "cancel" if terminate else "revoke")


def _runs(tasks: Sequence[tuple[str, SubmitRequest, str]],
          chunk: int) -> Iterator[tuple[int, Sequence[tuple[str, SubmitRequest, str]]]]:
    """``tasks`` in order as (offset, part): each gang alone, single tasks in runs of up to ``chunk``."""
    start = 0
    while start < len(tasks):
        end = start + 1
        if tasks[start][1].replicas == 1:
            while end < len(tasks) and end - start < chunk and tasks[end][1].replicas == 1:
                end += 1
        yield start, tasks[start:end]
        start = end
