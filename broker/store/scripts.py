"""Typed wrappers around the Lua transition scripts (one per state change).

Each script is loaded once through redis-py's ``Script`` (EVALSHA, reloaded by
redis-py after ``SCRIPT FLUSH``), with the helper files its header names after
``Includes:`` prepended. Return codes are IntEnums whose members mirror the
``Returns:`` block of each script's header (``tests/store/test_lua_headers.py``
checks that they agree).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from typing import Any

import redis

from broker.errors import InvalidRequest
from broker.models import SubmitRequest
from broker.scheduling.model import Placement
from broker.store import warm_map
from broker.store.codes import (  # every script's return codes (SIGNATURES), re-exported from here
    SIGNATURES,
    CancelCode,
    DrainCode,
    ExpireCode,
    FinishCode,
    ForgetCode,
    GangReserveCode,
    HeadCode,
    HeartbeatCode,
    LogCode,
    PreemptCode,
    ProgressCode,
    PromoteCode,
    QuarantineCode,
    ReapCode,
    RedeliverCode,
    RegisterCode,
    ReserveCode,
    SettleCode,
    StartCode,
    SubmitCode,
)
from broker.store.connection import HeldConnection, SentCommand, bulk, replicas_ack, wait_command, wait_replicas
from broker.store.keys import PoolKeys
from broker.store.reads import head_of
from broker.store.records import REQUEST_FIELDS, StoredRequest, gpus_arg, labels_arg

__all__ = [  # the return codes live in codes.py; importers take them from here
    "LUA", "SIGNATURES", "CancelCode", "Clock", "DrainCode", "ExpireCode", "FinishCode", "ForgetCode",
    "GangReserveCode", "HeadCode", "HeartbeatCode", "LogCode", "PreemptCode", "PreparedReserve", "ProgressCode",
    "PromoteCode", "QuarantineCode", "ReapCode", "RedeliverCode", "RegisterCode", "ReserveCode", "Scripts",
    "SettleCode", "StartCode", "SubmitCode", "includes", "script_source", "wall_clock_ms",
]

LUA = resources.files("broker.store") / "lua"




#: The custom state (Celery's update_state) by which a running task reports a checkpoint.
CHECKPOINT_STATE = "CHECKPOINT"

#: Transitions whose loss in a failover would lose or duplicate work: WAIT for ``min_replicas_ack``.
DURABLE = frozenset({"submit", "reserve", "start", "finish", "cancel", "submit_gang", "reserve_gang", "settle_gang"})

_FIXED_RESERVE_KEYS = SIGNATURES["reserve"][1]  # PoolKeys attributes, in order
_RESERVE_CODES = list(ReserveCode)  # code -> member, by index: cheaper than ReserveCode(code) per placement


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
        self.fixed_keys = b"".join(bulk(getattr(keys, name).encode()) for name in _FIXED_RESERVE_KEYS)
        self.nodes: dict[str, tuple[bytes, bytes]] = {}  # node id -> (its 3 KEYS, its id as ARGV)
        self.gpus: dict[tuple[int, ...], bytes] = {}  # GPU indices -> their ARGV

    def _node(self, node_id: str) -> tuple[bytes, bytes]:
        if len(self.nodes) >= self.MAX_NODES:
            self.nodes.clear()
        k = self.keys
        part = self.nodes[node_id] = (
            b"".join(bulk(key.encode()) for key in (k.node(node_id), k.node_tasks(node_id), k.queue(node_id))),
            bulk(node_id.encode()))
        return part

    def _gpus(self, gpus: tuple[int, ...]) -> bytes:
        if len(self.gpus) >= self.MAX_NODES:
            self.gpus.clear()
        part = self.gpus[gpus] = bulk(gpus_arg(gpus).encode())
        return part

    def command(self, sha: str, now: int, placements: Sequence[Placement]) -> bytes:
        """EVALSHA sha with what ``Scripts._reserve_call`` would pass, encoded."""
        prefix, nodes, gpus = self.task_prefix, self.nodes, self.gpus
        keys, args = [self.fixed_keys], [bulk(b"%d" % now)]
        for p in placements:
            node = nodes.get(p.node_id) or self._node(p.node_id)
            task_id = p.task_id.encode()
            keys += (b"$%d\r\n%s%s\r\n" % (len(prefix) + len(task_id), prefix, task_id), node[0])
            args += (bulk(task_id), node[1], gpus.get(p.gpu_indices) or self._gpus(p.gpu_indices))
        n = len(placements)
        fixed = len(_FIXED_RESERVE_KEYS)
        head = b"*%d\r\n" % (3 + fixed + 4 * n + 1 + 3 * n) + bulk(b"EVALSHA") + bulk(sha.encode())
        return b"".join([head, bulk(b"%d" % (fixed + 4 * n)), *keys, *args])


class PreparedReserve:
    """One reserve.lua call, encoded: ``send()`` it, then ``codes()`` reads the reply (once).

    Between the two it holds a pooled connection of its own. ``run_as_usual`` makes the call
    the ordinary way if the script cache was flushed meanwhile (then nothing ran)."""

    def __init__(self, client: redis.Redis, command: bytes, run_as_usual: Callable[[], Any]) -> None:
        self.client, self.command, self.run_as_usual = client, command, run_as_usual
        self.sent: SentCommand | None = None
        self.wait = wait_command(client)  # WAIT for min_replicas_ack, sent right behind it

    def send(self) -> None:
        self.sent = SentCommand(self.client, self.command, self.wait)

    def codes(self) -> list[ReserveCode]:
        assert self.sent is not None, "send() first"
        try:
            reply, *acked = self.sent.replies()
        except redis.exceptions.NoScriptError:  # nothing ran (a new master, a flushed cache): load it
            reply, acked = self.run_as_usual(), []
        if acked:
            wait_replicas(acked[0], *replicas_ack(self.client))
        return [_RESERVE_CODES[c] for c in reply]


_INCLUDES = re.compile(r"^-- Includes: (.+)$", re.MULTILINE)


def includes(name: str) -> list[str]:
    """The helper files ``name``.lua names in its header, in order."""
    found = _INCLUDES.search((LUA / f"{name}.lua").read_text())
    return found.group(1).split() if found else []


_FLAGS = re.compile(r"^-- Flags: (.+)$", re.MULTILINE)


def script_source(name: str) -> str:
    """The script as loaded: its Redis flags (a ``-- Flags:`` header line, e.g. ``allow-oom``
    for a script that must run while Redis is full), its includes, then itself."""
    found = _FLAGS.search((LUA / f"{name}.lua").read_text())
    shebang = f"#!lua flags={','.join(found.group(1).split())}\n" if found else ""
    return shebang + "".join((LUA / part).read_text() for part in [*includes(name), f"{name}.lua"])


def wall_clock_ms() -> int:
    return int(time.time() * 1000)


def _ms(seconds: float | None) -> int:
    """Seconds since the epoch as scripts take them (ms); 0 for none."""
    return 0 if seconds is None else int(seconds * 1000)


Clock = Callable[[], int]


def as_text(value: Any) -> str:
    """A script's reply item as text (bytes decoded)."""
    return value.decode() if isinstance(value, bytes) else str(value)


class Scripts:
    """The pool's transition scripts, bound to one Redis connection and one clock."""

    def __init__(self, client: redis.Redis, keys: PoolKeys, clock: Clock = wall_clock_ms) -> None:
        self.redis = client
        self.keys = keys
        self.clock = clock
        self._scripts = {name: client.register_script(script_source(name)) for name in SIGNATURES}
        self._reserve_encoder = _ReserveEncoder(keys)
        self._held = HeldConnection(client)

    def _run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return self._held.script(self._scripts[name], keys, args, durable=name in DURABLE)

    def sha(self, name: str) -> str:
        """The SHA1 script ``name`` is run by (EVALSHA)."""
        return str(self._scripts[name].sha)

    def call(self, name: str, keys: Sequence[str], args: Sequence[Any], client: Any = None) -> Any:
        """Run script ``name`` as is; with ``client=`` a pipeline, queue it there (its reply comes
        from the pipeline's ``execute``; a durable transition's WAIT is then the caller's). The typed
        methods below are the usual way in."""
        if client is None:
            return self._run(name, keys, args)
        return self._scripts[name](keys=list(keys), args=list(args), client=client)

    # ---- nodes ----------------------------------------------------------------

    def register(self, node_id: str, incarnation: str, lease_ms: int, gpus: int, gpu_mem: int,
                 cpu_m: int, mem: int, slots: int, labels: dict[str, str],
                 tasks: Mapping[str, str] | None = None) -> tuple[RegisterCode, int]:
        """``tasks``: the task names the node runs, each with its catalogue entry (records); None:
        it runs any task (a node that does not say)."""
        k = self.keys
        listed = [part for name, entry in sorted((tasks or {}).items()) for part in (name, entry)]
        code, reclaimed = self._run(
            "register",
            (k.prefix, k.node(node_id), k.nodes, k.leases, k.pending, k.requests, k.wake, k.changes, k.tasks),
            (node_id, incarnation, self.clock(), lease_ms, gpus, gpu_mem, cpu_m, mem, slots, labels_arg(labels),
             "all" if tasks is None else "listed", *listed),
        )
        return RegisterCode(code), int(reclaimed)

    def heartbeat(self, node_id: str, incarnation: str, lease_ms: int) -> HeartbeatCode:
        (code,) = self._run("heartbeat", (self.keys.node(node_id), self.keys.leases),
                            (node_id, incarnation, self.clock(), lease_ms))
        return HeartbeatCode(code)

    def reap(self, limit: int = 100) -> list[str]:
        k = self.keys
        _ok, *nodes = self._run("reap", (k.prefix, k.leases, k.pending, k.requests, k.wake, k.changes),
                                 (self.clock(), limit))
        return [as_text(n) for n in nodes]

    def redeliver(self, node_id: str, confirm: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
        """Queue again each RESERVED task's message lost in a failover (redeliver.lua): all those
        missing (``confirm`` None), or only those of ``confirm`` (the "id:tag" pairs a previous
        call found missing) still missing. The ids queued, and the "id:tag" pairs missing now."""
        k = self.keys
        pairs = "*" if confirm is None else " ".join(confirm)
        _ok, n, *rest = self._run("redeliver", (k.prefix, k.node_tasks(node_id), k.queue(node_id),
                                                k.unacked(node_id)), (node_id, pairs))
        return [as_text(i) for i in rest[:n]], [as_text(i) for i in rest[n:]]

    def drain(self, node_id: str, by: str, incarnation: str = "") -> tuple[DrainCode, int]:
        """Drain ``node_id`` (``by``: "operator", or "shutdown", which also hands back what was
        reserved there and has not started), or undrain it (``by=""``); how many were handed back."""
        k = self.keys
        code, handed = self._run("drain", (k.prefix, k.node(node_id), k.node_tasks(node_id), k.pending, k.requests,
                                           k.wake, k.changes), (node_id, self.clock(), by, incarnation))
        return DrainCode(code), int(handed)

    def forget(self, node_id: str, incarnation: str = "") -> tuple[ForgetCode, int]:
        """Remove a down node (or, with ``incarnation``, the leaving worker's own); tasks reclaimed."""
        k = self.keys
        code, reclaimed = self._run("forget", (k.prefix, k.node(node_id), k.nodes, k.leases, k.pending, k.requests,
                                               k.wake, k.changes), (node_id, self.clock(), incarnation))
        if code == ForgetCode.REMOVED:  # nothing of it stays warm (advice only: a second step is enough)
            warm_map.remove(self.redis, k, node_id)
        return ForgetCode(code), int(reclaimed)

    # ---- tasks ----------------------------------------------------------------

    def submit(self, task_id: str, req: SubmitRequest, message: str, stored: StoredRequest | None = None,
               result_ttl_ms: int = 0, event: tuple[str, str] | None = None) -> tuple[SubmitCode, str]:
        """Store a validated request (``stored``, when the caller encoded it already) and its
        Celery message under ``task_id``; returns the code and the task id it is known by.
        ``result_ttl_ms``: how long the record is kept once final (0: kept); ``event``: (channel,
        payload) published once the task is created (its task-sent event). A request submit.lua
        refuses (a producer's own encoding that the dispatcher could not read) raises InvalidRequest."""
        code, existing, *why = self._run("submit", *self.submit_call(task_id, req, message, stored, result_ttl_ms,
                                                                      event))
        if code == SubmitCode.BAD_REQUEST:
            key = as_text(existing)
            if key == "message":
                raise InvalidRequest({key: f"refused by submit.lua, nothing was written: {as_text(why[0])}"})
            raise InvalidRequest({REQUEST_FIELDS.get(key, key): f"refused by submit.lua, nothing was written: stored "
                                                                f"request key {key!r} {as_text(why[0])}"})
        return SubmitCode(code), as_text(existing)

    def submit_call(self, task_id: str, req: SubmitRequest, message: str, stored: StoredRequest | None = None,
                    result_ttl_ms: int = 0, event: tuple[str, str] | None = None) -> tuple[list[str], list[Any]]:
        """submit.lua's KEYS and ARGV (for ``call`` on a pipeline)."""
        k, stored = self.keys, stored or StoredRequest.of(req)
        key = req.idempotency_key
        return ([k.task(task_id), k.pending, k.requests, k.idempotency(key) if key else k.task(task_id), k.seq,
                 k.wake, k.mix, k.delayed, k.expiring],
                [task_id, key or "", req.priority, self.clock(), stored.text, message, req.task_name, req.tenant,
                 req.max_retries, stored.gpu_kind, _ms(req.not_before), _ms(req.expires_at), result_ttl_ms,
                 *(event or ("", ""))])

    def reserve(self, placements: Sequence[Placement]) -> list[ReserveCode]:
        """Commit a batch; returns one code per placement, in order, in one call on the held
        connection (express placement, tests, ``prepare_reserve``'s fallback): a cycle sends
        encoded batches while it plans the next (``prepare_reserve``)."""
        if not placements:
            return []
        return [_RESERVE_CODES[c] for c in self._run("reserve", *self._reserve_call(placements))]

    def prepare_reserve(self, placements: Sequence[Placement]) -> PreparedReserve:
        """``reserve`` in parts: encode the batch now, ``send()`` it later, then read its ``codes()``.

        The dispatcher encodes and plans the next batch while Redis runs this one, so Redis
        and Python each keep a core busy and Redis never waits for the encoding."""
        now = self.clock()
        command = self._reserve_encoder.command(self.sha("reserve"), now, placements)
        return PreparedReserve(self.redis, command, lambda: self._run("reserve", *self._reserve_call(placements, now)))

    def _reserve_call(self, placements: Sequence[Placement], now: int | None = None) -> tuple[list[str], list[Any]]:
        k = self.keys
        keys = [getattr(k, name) for name in _FIXED_RESERVE_KEYS]
        args: list[Any] = [self.clock() if now is None else now]
        for p in placements:
            keys += (k.task(p.task_id), k.node(p.node_id), k.node_tasks(p.node_id), k.queue(p.node_id))
            args += (p.task_id, p.node_id, gpus_arg(p.gpu_indices))
        return keys, args

    def start(self, task_id: str, node_id: str, tag: str, pid: int | None = None,
              incarnation: str = "", log_file: str = "") -> tuple[StartCode, str]:
        """Pass the fence; ``pid``: the process that will run the attempt; ``incarnation``: the
        worker process asking (refused if the node has a newer one); ``log_file``: where the
        attempt's output goes (``<node>:<path>``, recorded as log.lua records it)."""
        code, gpus = self._run("start", (self.keys.task(task_id), self.keys.node(node_id)),
                               (node_id, tag, self.clock(), pid or "", incarnation, log_file))
        return StartCode(code), as_text(gpus)

    def finish(self, task_id: str, node_id: str, tag: str, outcome: str, payload: str, detail: str = "",
               not_before: float | None = None, incarnation: str = "") -> tuple[FinishCode, str]:
        """End an attempt: outcome succeeded (payload: result JSON), failed (error text; detail: the
        exception as JSON), retry (payload: the new message; detail: why; not placed before
        ``not_before``, seconds) or lost (error text). ``incarnation``: the worker process
        reporting (refused if the node has a newer one)."""
        code, state, _head = self.end(task_id, node_id, tag, outcome, payload, detail, not_before, incarnation)
        return code, state

    def end(self, task_id: str, node_id: str, tag: str, outcome: str, payload: str, detail: str = "",
            not_before: float | None = None, incarnation: str = "") -> tuple[FinishCode, str, str]:
        """``finish``, and the task the attempt passed its place to (hand-off; "" for none)."""
        code, state, *head = self._run("finish", *self.finish_call(task_id, node_id, tag, outcome, payload, detail,
                                                                   not_before, incarnation))
        return FinishCode(code), as_text(state), as_text(head[0]) if head else ""

    def finish_call(self, task_id: str, node_id: str, tag: str, outcome: str, payload: str, detail: str = "",
                    not_before: float | None = None, incarnation: str = "") -> tuple[list[str], list[Any]]:
        """finish.lua's KEYS and ARGV (for ``call`` on a pipeline)."""
        k = self.keys
        return ([k.task(task_id), k.node(node_id), k.node_tasks(node_id), k.pending, k.requests, k.wake, k.runtimes,
                 k.changes, k.prefix],
                [task_id, node_id, tag, outcome, payload, self.clock(), detail, _ms(not_before), incarnation])

    def preempt(self, task_id: str, node_id: str, preemptor: str, grace_ms: int) -> PreemptCode:
        k = self.keys
        (code,) = self._run(
            "preempt",
            (k.task(task_id), k.node(node_id), k.node_tasks(node_id), k.pending, k.requests, k.preempting, k.wake,
             k.changes),
            (task_id, node_id, preemptor, grace_ms, self.clock()),
        )
        return PreemptCode(code)

    def cancel(self, task_id: str, node_id: str | None, mode: str = "cancel",
               grace_ms: int = 0, ask: bool = False) -> tuple[CancelCode, str]:
        """Cancel (``mode="revoke"``: a running attempt may finish); ``node_id``: where the caller
        believes a reserved task is held; ``grace_ms``: SIGTERM to SIGKILL for a running one;
        ``ask``: the caller may not write node state, so a reserved task is left to a dispatcher."""
        k = self.keys
        node = node_id or ""
        # With no node, KEYS[2]/[3] are never touched: pass the task's own key rather than
        # a node key, so a Redis user without node access (producer ACL) may cancel.
        node_key, tasks_key, changes = ((k.node(node), k.node_tasks(node), k.changes) if node
                                        else (k.task(task_id),) * 3)
        code, detail = self._run(
            "cancel",
            (k.task(task_id), node_key, tasks_key, k.pending, k.requests, k.wake, changes, k.prefix),
            (task_id, node, self.clock(), mode, grace_ms, "1" if ask else ""),
        )
        return CancelCode(code), as_text(detail)

    def promote(self, limit: int = 1000) -> int:
        """Move delayed tasks whose start time has come to the pending queue; how many moved."""
        k = self.keys
        _ok, moved = self._run("promote", (k.prefix, k.delayed, k.pending, k.requests, k.wake), (self.clock(), limit))
        return int(moved)

    def head(self, first: int) -> tuple[list[tuple[bytes, float]], list[bytes | None]]:
        """The first ``first`` pending ids with their scores, and each one's stored request (head.lua)."""
        return head_of(self._run("head", (self.keys.pending, self.keys.requests), (first,)))

    def expire(self, limit: int = 1000) -> list[str]:
        """Cancel tasks whose expires time passed before they started; their ids."""
        k = self.keys
        _ok, *ids = self._run("expire", (k.prefix, k.expiring, k.pending, k.requests, k.wake, k.changes),
                              (self.clock(), limit))
        return [as_text(i) for i in ids]

    def quarantine(self, task_id: str, request: bytes | str, reason: str) -> QuarantineCode:
        """End a pending task whose stored ``request`` cannot be read: FAILED with ``reason``."""
        k = self.keys
        (code,) = self._run("quarantine", (k.task(task_id), k.pending, k.requests, k.deadletter, k.prefix),
                            (task_id, request, reason, self.clock()))
        return QuarantineCode(code)

    def progress(self, task_id: str, tag: str, state: str, meta: str) -> ProgressCode:
        """Record a running attempt's custom state and its meta (JSON); state ``CHECKPOINT``
        (``workers.checkpoint``) also as the task's last checkpoint."""
        (code,) = self._run("progress", (self.keys.task(task_id),),
                            (tag, state, meta, self.clock(), "1" if state == CHECKPOINT_STATE else ""))
        return ProgressCode(code)

    def log(self, task_id: str, tag: str, tail: bytes, size: int, file: str = "") -> LogCode:
        """Keep the running attempt's last output (``tail``, of ``size`` bytes in all) with its task."""
        (code,) = self._run("log", (self.keys.task(task_id),), (tag, tag.rpartition(".")[2], tail, size, file))
        return LogCode(code)
