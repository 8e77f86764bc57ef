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
        ("task", "pending", "requests", "idempotency", "seq", "wake"),
        ("task_id", "idempotency_key", "priority", "now", "request", "message", "name", "tenant", "max_retries"),
    ),
    "reserve": (ReserveCode, ("pending", "requests", "leases"), ("now",)),
    "start": (StartCode, ("task",), ("node_id", "tag", "now")),
    "finish": (
        FinishCode,
        ("task", "node", "node_tasks", "pending", "requests", "wake"),
        ("task_id", "node_id", "tag", "outcome", "payload", "now"),
    ),
    "cancel": (
        CancelCode,
        ("task", "node", "node_tasks", "pending", "requests", "wake"),
        ("task_id", "node_id", "now"),
    ),
    "reap": (ReapCode, ("prefix", "leases", "pending", "requests", "wake"), ("now", "limit")),
}


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
               message: str, name: str, tenant: str, max_retries: int) -> tuple[SubmitCode, str]:
        k = self.keys
        code, existing = self._run(
            "submit",
            (k.task(task_id), k.pending, k.requests, k.idempotency, k.seq, k.wake),
            (task_id, idempotency_key or "", priority, self.clock(), request, message, name, tenant, max_retries),
        )
        return SubmitCode(code), _text(existing)

    def reserve(self, placements: Sequence[Placement]) -> list[ReserveCode]:
        """Commit a batch; returns one code per placement, in order."""
        if not placements:
            return []
        k = self.keys
        keys = [k.pending, k.requests, k.leases]
        args: list[Any] = [self.clock()]
        task, node, node_tasks, queue = k.task, k.node, k.node_tasks, k.queue
        for p in placements:
            keys += (task(p.task_id), node(p.node_id), node_tasks(p.node_id), queue(p.node_id))
            args += (p.task_id, p.node_id, ",".join(map(str, p.gpu_indices)))
        return [ReserveCode(c) for c in self._run("reserve", keys, args)]

    def start(self, task_id: str, node_id: str, tag: str) -> tuple[StartCode, str]:
        code, gpus = self._run("start", (self.keys.task(task_id),), (node_id, tag, self.clock()))
        return StartCode(code), _text(gpus)

    def finish(self, task_id: str, node_id: str, tag: str, outcome: str, payload: str) -> tuple[FinishCode, str]:
        k = self.keys
        code, state = self._run(
            "finish",
            (k.task(task_id), k.node(node_id), k.node_tasks(node_id), k.pending, k.requests, k.wake),
            (task_id, node_id, tag, outcome, payload, self.clock()),
        )
        return FinishCode(code), _text(state)

    def cancel(self, task_id: str, node_id: str | None) -> tuple[CancelCode, str]:
        k = self.keys
        node = node_id or ""
        code, detail = self._run(
            "cancel",
            (k.task(task_id), k.node(node), k.node_tasks(node), k.pending, k.requests, k.wake),
            (task_id, node, self.clock()),
        )
        return CancelCode(code), _text(detail)
