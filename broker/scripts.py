"""Typed wrappers around the Lua transition scripts (one per state change).

Each script is loaded once through redis-py's ``Script`` (EVALSHA, reloaded by
redis-py after ``SCRIPT FLUSH``), with ``lua/_lib.lua`` prepended. Return codes
are IntEnums whose members mirror the ``Returns:`` block of each script's header
(``tests/test_lua_headers.py`` checks that they agree).
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

import redis

from broker.keys import PoolKeys
from broker.policy import Placement

LUA = resources.files("broker") / "lua"


class RegisterCode(enum.IntEnum):
    CREATED = 0
    REFRESHED = 1
    REPLACED = 2
    SHAPE_CHANGED = 3


class HeartbeatCode(enum.IntEnum):
    OK = 0
    NOT_REGISTERED = 1
    FENCED = 2
    REAPED = 3


class SubmitCode(enum.IntEnum):
    CREATED = 0
    DUPLICATE = 1
    ID_TAKEN = 2


class ReserveCode(enum.IntEnum):
    OK = 0
    NOT_PENDING = 1
    NODE_DOWN = 2
    LABEL_MISMATCH = 3
    NO_CAPACITY = 4
    BAD_PLACEMENT = 5


class StartCode(enum.IntEnum):
    OK = 0
    NOT_FOUND = 1
    CANCELLED = 2
    STALE = 3
    ALREADY_RUNNING = 4


class FinishCode(enum.IntEnum):
    OK = 0
    NOT_FOUND = 1
    STALE = 2
    BAD_OUTCOME = 3


class CancelCode(enum.IntEnum):
    CANCELLED = 0
    NOT_FOUND = 1
    ALREADY_FINAL = 2
    MOVED = 3


class ReapCode(enum.IntEnum):
    OK = 0


class PreemptCode(enum.IntEnum):
    REQUEUED = 0
    STOPPING = 1
    NOT_FOUND = 2
    NOT_HELD = 3
    ALREADY = 4


#: script name -> (its return-code enum, the KEYS it takes in order, the ARGV it takes in order).
#: The names must match the script headers; a batch script lists its fixed prefix only.
SIGNATURES: dict[str, tuple[type[enum.IntEnum], tuple[str, ...], tuple[str, ...]]] = {
    "register": (
        RegisterCode,
        ("prefix", "node", "nodes", "leases", "pending", "requests", "wake"),
        ("node_id", "incarnation", "now", "lease_ms", "gpus", "gpu_mem", "cpu_m", "mem", "slots", "labels"),
    ),
    "heartbeat": (HeartbeatCode, ("node", "leases"), ("node_id", "incarnation", "now", "lease_ms")),
    "submit": (
        SubmitCode,
        ("task", "pending", "requests", "idempotency", "seq", "wake", "mix"),
        ("task_id", "idempotency_key", "priority", "now", "request", "message", "name", "tenant", "max_retries",
         "shape"),
    ),
    "reserve": (ReserveCode, ("pending", "requests", "leases", "changes"), ("now",)),
    "start": (StartCode, ("task",), ("node_id", "tag", "now")),
    "finish": (
        FinishCode,
        ("task", "node", "node_tasks", "pending", "requests", "wake", "runtimes", "changes"),
        ("task_id", "node_id", "tag", "outcome", "payload", "now"),
    ),
    "cancel": (
        CancelCode,
        ("task", "node", "node_tasks", "pending", "requests", "wake", "changes"),
        ("task_id", "node_id", "now"),
    ),
    "reap": (ReapCode, ("prefix", "leases", "pending", "requests", "wake"), ("now", "limit")),
    "preempt": (
        PreemptCode,
        ("task", "node", "node_tasks", "pending", "requests", "preempting", "wake", "changes"),
        ("task_id", "node_id", "preemptor", "grace_ms", "now"),
    ),
}


_FIXED_RESERVE_KEYS = SIGNATURES["reserve"][1]  # PoolKeys attributes, in order
_RESERVE_CODES = list(ReserveCode)  # code -> member, by index: cheaper than ReserveCode(code) per placement


def _bulk(data: bytes) -> bytes:
    """One bulk string of the Redis protocol (RESP)."""
    return b"$%d\r\n%s\r\n" % (len(data), data)


def encode_command(*args: bytes) -> bytes:
    """A command in the Redis protocol, to send as is (see ``prepare_reserve``, ``state.read_free``)."""
    return b"*%d\r\n" % len(args) + b"".join(map(_bulk, args))


class _ReserveEncoder:
    """Encodes reserve.lua batches straight into the Redis protocol, for ``prepare_reserve``.

    redis-py's generic packing (a Python pass over every argument, then a sprintf per
    argument in hiredis) cost the dispatcher more than planning the batch did: a placement
    is 7 arguments, and 5 of them (the node's 3 keys and its id, the GPU list) recur all
    through a batch. Those parts are encoded once here and reused."""

    MAX_NODES = 100_000  # node parts kept; a long-lived dispatcher sees nodes come and go

    def __init__(self, keys: PoolKeys) -> None:
        self.keys = keys
        self.task_prefix = keys.task("").encode()
        self.fixed_keys = b"".join(_bulk(getattr(keys, name).encode()) for name in _FIXED_RESERVE_KEYS)
        self.nodes: dict[str, tuple[bytes, bytes]] = {}  # node id -> (its 3 KEYS, its id as ARGV)
        self.gpus: dict[tuple[int, ...], bytes] = {}  # GPU indices -> their ARGV

    def _node(self, node_id: str) -> tuple[bytes, bytes]:
        if len(self.nodes) >= self.MAX_NODES:
            self.nodes.clear()
        k = self.keys
        part = self.nodes[node_id] = (
            b"".join(_bulk(key.encode()) for key in (k.node(node_id), k.node_tasks(node_id), k.queue(node_id))),
            _bulk(node_id.encode()))
        return part

    def _gpus(self, gpus: tuple[int, ...]) -> bytes:
        if len(self.gpus) >= self.MAX_NODES:
            self.gpus.clear()
        part = self.gpus[gpus] = _bulk(",".join(map(str, gpus)).encode())
        return part

    def command(self, sha: str, now: int, placements: Sequence[Placement]) -> bytes:
        """EVALSHA sha with what ``Scripts._reserve_call`` would pass, encoded."""
        prefix, nodes, gpus = self.task_prefix, self.nodes, self.gpus
        keys, args = [self.fixed_keys], [_bulk(b"%d" % now)]
        for p in placements:
            node = nodes.get(p.node_id) or self._node(p.node_id)
            task_id = p.task_id.encode()
            keys += (b"$%d\r\n%s%s\r\n" % (len(prefix) + len(task_id), prefix, task_id), node[0])
            args += (_bulk(task_id), node[1], gpus.get(p.gpu_indices) or self._gpus(p.gpu_indices))
        n = len(placements)
        fixed = len(_FIXED_RESERVE_KEYS)
        head = b"*%d\r\n" % (3 + fixed + 4 * n + 1 + 3 * n) + _bulk(b"EVALSHA") + _bulk(sha.encode())
        return b"".join([head, _bulk(b"%d" % (fixed + 4 * n)), *keys, *args])


class PreparedReserve:
    """One reserve.lua call, encoded: ``send()`` it, then ``codes()`` reads the reply (once).

    Between the two it holds a pooled connection of its own. ``run_as_usual`` makes the call
    the ordinary way if the script cache was flushed meanwhile (then nothing ran)."""

    def __init__(self, client: redis.Redis, command: bytes, run_as_usual: Callable[[], Any]) -> None:
        self.pool, self.command, self.run_as_usual = client.connection_pool, command, run_as_usual
        self.conn: Any = None

    def send(self) -> None:
        self.conn = self.pool.get_connection()
        try:
            self.conn.send_packed_command([self.command])
        except BaseException:
            self._drop()
            raise

    def codes(self) -> list[ReserveCode]:
        try:
            reply = self.conn.read_response()
        except redis.exceptions.NoScriptError:
            self.pool.release(self.conn)
            reply = self.run_as_usual()
        except redis.ResponseError:
            self.pool.release(self.conn)
            raise
        except BaseException:  # the reply may be half read: the connection is unusable
            self._drop()
            raise
        else:
            self.pool.release(self.conn)
        return [_RESERVE_CODES[c] for c in reply]

    def _drop(self) -> None:
        self.conn.disconnect()
        self.pool.release(self.conn)


def script_source(name: str) -> str:
    return (LUA / "_lib.lua").read_text() + (LUA / f"{name}.lua").read_text()


def wall_clock_ms() -> int:
    return int(time.time() * 1000)


Clock = Callable[[], int]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Scripts:
    """The pool's transition scripts, bound to one Redis connection and one clock."""

    def __init__(self, client: redis.Redis, keys: PoolKeys, clock: Clock = wall_clock_ms) -> None:
        self.redis = client
        self.keys = keys
        self.clock = clock
        self._scripts = {name: client.register_script(script_source(name)) for name in SIGNATURES}
        self._reserve_encoder = _ReserveEncoder(keys)

    def _run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return self._scripts[name](keys=list(keys), args=list(args))

    # ---- nodes ----------------------------------------------------------------

    def register(self, node_id: str, incarnation: str, lease_ms: int, gpus: int, gpu_mem: int,
                 cpu_m: int, mem: int, slots: int, labels: dict[str, str]) -> tuple[RegisterCode, int]:
        k = self.keys
        code, reclaimed = self._run(
            "register",
            (k.prefix, k.node(node_id), k.nodes, k.leases, k.pending, k.requests, k.wake),
            (node_id, incarnation, self.clock(), lease_ms, gpus, gpu_mem, cpu_m, mem, slots,
             json.dumps(labels, sort_keys=True) if labels else "{}"),
        )
        return RegisterCode(code), int(reclaimed)

    def heartbeat(self, node_id: str, incarnation: str, lease_ms: int) -> HeartbeatCode:
        (code,) = self._run("heartbeat", (self.keys.node(node_id), self.keys.leases),
                            (node_id, incarnation, self.clock(), lease_ms))
        return HeartbeatCode(code)

    def reap(self, limit: int = 100) -> list[str]:
        k = self.keys
        _ok, *nodes = self._run("reap", (k.prefix, k.leases, k.pending, k.requests, k.wake),
                                 (self.clock(), limit))
        return [_text(n) for n in nodes]

    # ---- tasks ----------------------------------------------------------------

    def submit(self, task_id: str, idempotency_key: str | None, priority: int, request: str,
               message: str, name: str, tenant: str, max_retries: int, shape: str = "0,0") -> tuple[SubmitCode, str]:
        k = self.keys
        code, existing = self._run(
            "submit",
            (k.task(task_id), k.pending, k.requests, k.idempotency, k.seq, k.wake, k.mix),
            (task_id, idempotency_key or "", priority, self.clock(), request, message, name, tenant, max_retries,
             shape),
        )
        return SubmitCode(code), _text(existing)

    def reserve(self, placements: Sequence[Placement]) -> list[ReserveCode]:
        """Commit a batch; returns one code per placement, in order."""
        if not placements:
            return []
        return [_RESERVE_CODES[c] for c in self._run("reserve", *self._reserve_call(placements))]

    def prepare_reserve(self, placements: Sequence[Placement]) -> PreparedReserve:
        """``reserve`` in parts: encode the batch now, ``send()`` it later, then read its ``codes()``.

        The dispatcher encodes and plans the next batch while Redis runs this one, so Redis
        and Python each keep a core busy and Redis never waits for the encoding."""
        now = self.clock()
        command = self._reserve_encoder.command(self._scripts["reserve"].sha, now, placements)
        return PreparedReserve(self.redis, command, lambda: self._run("reserve", *self._reserve_call(placements, now)))

    def _reserve_call(self, placements: Sequence[Placement], now: int | None = None) -> tuple[list[str], list[Any]]:
        k = self.keys
        keys = [getattr(k, name) for name in _FIXED_RESERVE_KEYS]
        args: list[Any] = [self.clock() if now is None else now]
        for p in placements:
            keys += (k.task(p.task_id), k.node(p.node_id), k.node_tasks(p.node_id), k.queue(p.node_id))
            args += (p.task_id, p.node_id, ",".join(map(str, p.gpu_indices)))
        return keys, args

    def start(self, task_id: str, node_id: str, tag: str) -> tuple[StartCode, str]:
        code, gpus = self._run("start", (self.keys.task(task_id),), (node_id, tag, self.clock()))
        return StartCode(code), _text(gpus)

    def finish(self, task_id: str, node_id: str, tag: str, outcome: str, payload: str) -> tuple[FinishCode, str]:
        k = self.keys
        code, state = self._run(
            "finish",
            (k.task(task_id), k.node(node_id), k.node_tasks(node_id), k.pending, k.requests, k.wake, k.runtimes,
             k.changes),
            (task_id, node_id, tag, outcome, payload, self.clock()),
        )
        return FinishCode(code), _text(state)

    def preempt(self, task_id: str, node_id: str, preemptor: str, grace_ms: int) -> PreemptCode:
        k = self.keys
        (code,) = self._run(
            "preempt",
            (k.task(task_id), k.node(node_id), k.node_tasks(node_id), k.pending, k.requests, k.preempting, k.wake,
             k.changes),
            (task_id, node_id, preemptor, grace_ms, self.clock()),
        )
        return PreemptCode(code)

    def cancel(self, task_id: str, node_id: str | None) -> tuple[CancelCode, str]:
        k = self.keys
        node = node_id or ""
        # With no node, KEYS[2]/[3] are never touched: pass the task's own key rather than
        # a node key, so a Redis user without node access (producer ACL) may cancel.
        node_key, tasks_key, changes = ((k.node(node), k.node_tasks(node), k.changes) if node
                                        else (k.task(task_id),) * 3)
        code, detail = self._run(
            "cancel",
            (k.task(task_id), node_key, tasks_key, k.pending, k.requests, k.wake, changes),
            (task_id, node, self.clock()),
        )
        return CancelCode(code), _text(detail)
