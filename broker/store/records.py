"""Every format gpubroker stores in Redis: encoded and decoded here, and nowhere else in Python.

The Lua scripts read and write the same formats (each script's header names the fields it
touches); ``store/keys.py`` lists the keys and the fields of the task and node hashes.

**The request** (task hash ``req``, ``P requests``): ``store/request_records.py``, where its
keys are listed; its names are imported from here like the rest.

**The allocation** (task hash ``alloc``, written by reserve.lua, given back by ``release`` in
``lua/_release.lua``): ``{"g": [[index, milli, mem_mb], ...], "c": cpu_milli, "r": mem_mb}``:
what the task holds on each GPU index, and of the host.

**A GPU kind** (task hash ``gpu_kind``, the fields of ``P mix`` and ``P runtimes``):
``"<whole GPUs>,<milli of one GPU>"``: ``"2,0"``, ``"0,500"``, ``"0,0"`` for a CPU task.

**Learned runtimes** (``P runtimes``, written by finish.lua on success): ``n:<name>|<kind>``
counts succeeded runs and ``s:<name>|<kind>`` sums their seconds; ``n:<name>|`` and
``s:<name>|`` do the same for the name alone.

**The task catalogue** (``P tasks``, written by register.lua for each task name a worker runs):
JSON with the defaults its ``@app.task`` declared (``resources``, ``priority``, ``tenant``,
``preemptible``, ``estimated_runtime_s``: null when not declared), its Celery ``rate_limit`` as
written and ``rate``, the same in starts per second (0: none; reserve.lua reads it). A submit by
name alone (``app.send_task``, beat, a plain Celery producer) takes its defaults from here.

**States** (task hash ``state``) and the scripts that move a task between them: ``TRANSITIONS``
(tests/store/test_lua_headers.py checks each script's header and its state literals against it).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from broker.errors import InvalidRequest
from broker.models import (
    MILLI,
    GpuView,
    NodeView,
    Resources,
    SubmitRequest,
    TaskState,
    TaskStatus,
)
from broker.scheduling.model import GpuKind, NodeFree, RunningTask
from broker.store.request_records import (
    REQUEST_COUNTS,
    REQUEST_FIELDS,
    Pending,
    Poisoned,
    UnreadableRecord,
    Wire,
    decode_pending,
    decode_request,
    encode_request,
    quarantine_reason,
    resources_of,
    task_request,
    task_requests,
)

# The request's names live in store/request_records.py; this module is where every format is read.
__all__ = [
    "CATALOGUE_DEFAULTS",
    "FREE_FIELDS",
    "LABEL",
    "MAX_NODE_GPUS",
    "REQUEST_COUNTS",
    "REQUEST_FIELDS",
    "SERVED",
    "TRANSITIONS",
    "NodeShape",
    "Pending",
    "Poisoned",
    "StoredRequest",
    "UnreadableRecord",
    "Wire",
    "catalogue_entry",
    "decode_catalogue",
    "decode_mix",
    "decode_pending",
    "decode_request",
    "decode_runtimes",
    "encode_request",
    "gpu_kind_of",
    "gpu_kind_text",
    "gpus_arg",
    "labels_arg",
    "node_free",
    "node_is_up",
    "node_labels",
    "node_serves",
    "node_shape",
    "node_view",
    "parse_gpu_kind",
    "parse_gpus",
    "quarantine_reason",
    "rate_limits",
    "resources_of",
    "running_task",
    "same_registration",
    "task_request",
    "task_requests",
    "task_status",
]

# ---- states and transitions --------------------------------------------------------------

P, R, U, S, F, C = (TaskState.PENDING, TaskState.RESERVED, TaskState.RUNNING, TaskState.SUCCEEDED,
                    TaskState.FAILED, TaskState.CANCELLED)

#: script -> (the states it moves a task from, the states it may leave it in). A script's header
#: says ``Transitions: FROM -> TO`` with the same names.
TRANSITIONS: dict[str, tuple[frozenset[TaskState], frozenset[TaskState]]] = {
    "submit": (frozenset({P}), frozenset({P})),  # (new), or a task awaiting its replacement
    "promote": (frozenset({P}), frozenset({P})),
    "reserve": (frozenset({P}), frozenset({R})),
    "submit_gang": (frozenset(), frozenset({P})), "reserve_gang": (frozenset({P}), frozenset({R})),
    "settle_gang": (frozenset({R}), frozenset({P, S, F})),  # gangs (issue 13): broker.store.gangs
    "start": (frozenset({R}), frozenset({U})),
    "progress": (frozenset(), frozenset()), "log": (frozenset(), frozenset()), "head": (frozenset(), frozenset()),
    "finish": (frozenset({R, U, P}), frozenset({S, F, C, P, R})),  # P -> R: the head it passes its place to
    "cancel": (frozenset({P, R}), frozenset({C})),
    "expire": (frozenset({P, R}), frozenset({C})),
    "preempt": (frozenset({R}), frozenset({P})),
    "reap": (frozenset({R, U}), frozenset({P, F, C})),
    "redeliver": (frozenset(), frozenset()), "heartbeat": (frozenset(), frozenset()),
    "register": (frozenset({R, U}), frozenset({P, F, C})),
    "drain": (frozenset({R}), frozenset({P, C})),
    "forget": (frozenset({R, U}), frozenset({P, F, C})),
    "quarantine": (frozenset({P}), frozenset({F})),
}


# ---- the task hash ------------------------------------------------------------------------------


def task_status(task_id: str, h: Mapping[bytes, bytes], waiting: Mapping[str, Any] | None) -> TaskStatus:
    """A task hash (``keys``' task fields) as users read it; ``waiting``: the dispatcher's last
    word on a pending task (position, reason, eta)."""
    t = {k.decode(): v.decode(errors="replace") for k, v in h.items() if k != b"message" and k[:4] != b"log:"}
    try:
        wire = decode_request(t.get("req", ""))
    except UnreadableRecord:  # a quarantined task: its error says what was wrong
        wire = {"g": 0, "m": 0, "gm": 0, "c": 0, "r": 0, "l": {}}

    def seconds(name: str) -> float | None:
        return int(t[name]) / 1000 if t.get(name) else None

    return TaskStatus(
        id=task_id, name=t["name"], state=TaskState(t["state"]), tenant=t["tenant"],
        priority=int(t["priority"]), resources=resources_of(wire), node=t.get("node") or None,
        gpus=parse_gpus(t.get("gpus")), attempts=int(t.get("attempts", 0)),
        result=json.loads(t["result"]) if "result" in t else None, error=t.get("error"),
        submitted_at=seconds("submitted_at") or 0.0, reserved_at=seconds("reserved_at"),
        started_at=seconds("started_at"), finished_at=seconds("finished_at"), preemptible=wire.get("x"),
        preemptions=int(t.get("preemptions", 0)), position=waiting["position"] if waiting else None,
        reason=waiting["reason"] if waiting else None, estimated_start_at=waiting["eta"] if waiting else None,
        progress_state=t.get("progress_state"), progress=json.loads(t["progress"]) if "progress" in t else None,
        exception=json.loads(t["exc"]) if t.get("exc") else None, retried="retried" in t,
        retry_reason=t.get("retry_reason"), replaced_by=t.get("replaced_by") if "awaiting" in t else None,
        not_before=seconds("not_before"), expires_at=seconds("expires_at"),
        log_files={int(k.partition(":")[2]): v for k, v in t.items() if k.startswith("log_file:")})


# ---- GPU kinds, the request mix and learned runtimes -------------------------------------------


def gpu_kind_text(kind: GpuKind) -> str:
    return f"{kind[0]},{kind[1]}"


def gpu_kind_of(resources: Resources) -> str:
    return gpu_kind_text((resources.whole_gpus, resources.gpu_milli))


def parse_gpu_kind(text: str) -> GpuKind:
    """``"whole,milli"`` back to a GpuKind; ValueError says what is wrong."""
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"{text!r} is not 'whole_gpus,gpu_milli' (two integers >= 0)")
    whole, milli = int(parts[0]), int(parts[1])
    if milli > MILLI or (whole and milli):
        raise ValueError(f"{text!r}: a share is 1..{MILLI} milli of one GPU, with 0 whole GPUs")
    return whole, milli


@dataclass(frozen=True, slots=True)
class StoredRequest:
    """What submit.lua stores of a validated request besides its message."""

    text: str  # the request JSON
    gpu_kind: str  # its GPU kind, counted in P mix

    @classmethod
    def of(cls, req: SubmitRequest) -> StoredRequest:
        return cls(encode_request(req), gpu_kind_of(req.resources))


def decode_mix(raw: Mapping[Any, Any]) -> dict[GpuKind, int]:
    """``P mix`` (or any ``{"whole,milli": count}``) as {GpuKind: count}; InvalidRequest names a bad entry."""
    mix: dict[GpuKind, int] = {}
    for key, count in raw.items():
        text = key.decode() if isinstance(key, bytes) else key
        try:
            kind = parse_gpu_kind(text) if isinstance(text, str) else parse_gpu_kind(repr(text))
        except ValueError as exc:
            raise InvalidRequest({"mix": f"key {exc}"}) from None
        value = int(count) if isinstance(count, bytes) else count
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidRequest({"mix": f"count for {text!r} must be an integer >= 0, got {count!r}"})
        mix[kind] = mix.get(kind, 0) + value
    return mix


def decode_runtimes(raw: Mapping[bytes, bytes]) -> dict[tuple[str, GpuKind | None], float]:
    """``P runtimes`` as mean seconds per (task name, GPU kind), and per (task name, None)."""
    out: dict[tuple[str, GpuKind | None], float] = {}
    for name_field, count in raw.items():
        if name_field.startswith(b"n:") and int(count) > 0:
            name, _, kind = name_field[2:].decode().rpartition("|")
            total = raw.get(b"s:" + name_field[2:])
            if total is not None:
                try:
                    key = (name, parse_gpu_kind(kind) if kind else None)
                except ValueError:
                    continue  # a runtime learned under a kind this version cannot read: not worth a crash
                out[key] = float(total) / int(count)
    return out


# ---- the allocation and running tasks -------------------------------------------------------


def running_task(task_id: str, node: str, alloc: bytes | str, wire: Wire, started_s: float, seq: int,
                 submitted_s: float, preempting: bool, preemptible_default: bool) -> RunningTask:
    """A RESERVED or RUNNING task as the planner sees it: what its ``alloc`` holds, and its request."""
    held = json.loads(alloc)
    gpus = held["g"]
    x = wire.get("x")
    return RunningTask(task_id, node, tuple(g[0] for g in gpus), gpus[0][1] if gpus else 0,
                       gpus[0][2] if gpus else 0, held["c"], held["r"], wire["p"], wire.get("t", "default"),
                       wire.get("n", ""), started_s, wire.get("e"), preemptible_default if x is None else bool(x),
                       preempting, seq, submitted_s)


# ---- the task catalogue ------------------------------------------------------------------------

CATALOGUE_DEFAULTS = ("resources", "priority", "tenant", "preemptible", "estimated_runtime_s")


def catalogue_entry(defaults: Mapping[str, Any], rate_limit: str | None, rate: float) -> str:
    """What a worker registers of one task name: its declared defaults and rate limit."""
    entry = {name: defaults.get(name) for name in CATALOGUE_DEFAULTS}
    return json.dumps({**entry, "rate_limit": rate_limit, "rate": rate}, separators=(",", ":"), sort_keys=True)


def decode_catalogue(raw: Mapping[bytes, bytes]) -> dict[str, dict[str, Any]]:
    """``P tasks`` as task name -> entry; an entry this version cannot read is left out."""
    out = {}
    for name, text in raw.items():
        try:
            entry = json.loads(text)
        except ValueError:
            continue
        if isinstance(entry, dict):
            out[name.decode()] = entry
    return out


def rate_limits(catalogue: Mapping[str, Mapping[str, Any]], buckets: Mapping[bytes, bytes],
                now_ms: int) -> dict[str, tuple[float, float]]:
    """Rate-limited names -> (starts per second, starts its bucket allows now), as reserve.lua's
    buckets hold them (``P ratelimit``: ``tokens,last_ms``; a burst of one second's worth)."""
    out = {}
    for name, entry in catalogue.items():
        rate = entry.get("rate")
        if not isinstance(rate, int | float) or rate <= 0:
            continue
        capacity, saved = max(1.0, float(rate)), buckets.get(name.encode())
        tokens = capacity
        if saved:
            left, _, last = saved.decode().partition(",")
            tokens = min(capacity, float(left) + max(0, now_ms - int(last)) * rate / 1000)
        out[name] = (float(rate), tokens)
    return out


# ---- the node hash ------------------------------------------------------------------------------


LABEL = b"label:"  # node hash fields label:<key> hold its labels


def node_labels(h: Mapping[bytes, bytes]) -> dict[str, str]:
    return {k[len(LABEL):].decode(): v.decode() for k, v in h.items() if k.startswith(LABEL)}


def node_view(node_id: str, h: Mapping[bytes, bytes], lease: float | None, tasks: int) -> NodeView:
    """A node hash as users read it; one this version cannot read shows as state ``unreadable (why)``."""
    lease_at = lease / 1000 if lease is not None else None
    try:
        shape = node_shape(h)
        count, memory = shape.gpus, shape.gpu_memory_mb
        gpus = [GpuView(index=i, memory_mb=memory, free_milli=_count(h, b"g%d_milli" % i),
                        free_memory_mb=_count(h, b"g%d_mem" % i)) for i in range(count)]
        cpu_m, mem, slots = shape.capacity
        return NodeView(
            id=node_id, state=h.get(b"state", b"").decode() or "unknown", lease_expires_at=lease_at,
            gpus=gpus, gpu_memory_mb=memory, cpus=cpu_m / MILLI, memory_mb=mem, slots=slots, labels=shape.labels,
            free_cpus=_count(h, b"free_cpu_m") / MILLI, free_memory_mb=_count(h, b"free_mem"),
            free_slots=_count(h, b"free_slots"), tasks=tasks,
            serves=None if shape.serves is None else sorted(shape.serves), draining=b"draining" in h,
            down_since=_count(h, b"down_at") / 1000 or None,
        )
    except UnreadableRecord as exc:
        return NodeView(id=node_id, state=f"unreadable ({exc})", lease_expires_at=lease_at, gpus=[], gpu_memory_mb=0,
                        cpus=0, memory_mb=0, slots=0, labels={}, free_cpus=0, free_memory_mb=0, free_slots=0,
                        tasks=tasks)


@dataclass(frozen=True, slots=True)
class NodeShape:
    """What a node registered with, fixed until it registers afresh (register.lua rewrites the
    whole hash, with a new ``registered_at``): the dispatcher then reads only what changes."""

    registration: tuple[bytes | None, ...]  # incarnation, registered_at, cap_gpus, gpu_mem
    gpus: int
    gpu_memory_mb: int
    labels: dict[str, str]
    capacity: tuple[int, int, int]  # cpu milli, RAM MiB, slots
    fields: tuple[bytes, ...]  # what changes: FREE_FIELDS, then per GPU milli, then per GPU mem
    serves: frozenset[str] | None  # the task names it runs (None: any)


#: The node hash fields that change, read per cycle; ``registration`` is fields 1-4. ``draining``
#: (drain.lua): who drained it, "operator" or "shutdown"; absent when it takes new tasks.
FREE_FIELDS = (b"state", b"incarnation", b"registered_at", b"cap_gpus", b"gpu_mem", b"free_cpu_m", b"free_mem",
               b"free_slots", b"draining")
_GPUS_AT = len(FREE_FIELDS)  # where the per-GPU fields start


def node_serves(h: Mapping[bytes, bytes]) -> frozenset[str] | None:
    """The task names a node runs: its ``task:<name>`` fields when it listed them, else None (any)."""
    if h.get(b"serves") != b"listed":
        return None
    return frozenset(k[len(SERVED):].decode() for k in h if k.startswith(SERVED))


SERVED = b"task:"  # node hash fields task:<name> name the task names it runs


#: Largest GPU count a node hash may give (Resources' limit): a bigger one is not read.
MAX_NODE_GPUS = 1024


def _count(h: Mapping[bytes, bytes], name: bytes, top: int | None = None) -> int:
    """An integer field of a node hash (0 when absent); UnreadableRecord names a bad one."""
    raw = h.get(name)
    if raw is None:
        return 0
    try:
        value = int(raw)
    except ValueError:
        raise UnreadableRecord(name.decode(), f"must be an integer (got {raw[:40]!r})") from None
    if top is not None and not 0 <= value <= top:
        raise UnreadableRecord(name.decode(), f"must be from 0 to {top} (got {value})")
    return value


def node_shape(h: Mapping[bytes, bytes]) -> NodeShape:
    """What a node registered with; UnreadableRecord names a field this version cannot read."""
    gpus = _count(h, b"cap_gpus", MAX_NODE_GPUS)
    try:
        labels, serves = node_labels(h), node_serves(h)
    except UnicodeDecodeError as exc:
        raise UnreadableRecord("label or task name", f"not UTF-8 ({exc.object[:40]!r})") from None
    return NodeShape(
        tuple(h.get(field) for field in FREE_FIELDS[1:5]), gpus, _count(h, b"gpu_mem"), labels,
        (_count(h, b"cap_cpu_m"), _count(h, b"cap_mem"), _count(h, b"cap_slots")),
        FREE_FIELDS + tuple(b"g%d_milli" % i for i in range(gpus)) + tuple(b"g%d_mem" % i for i in range(gpus)),
        serves)


def same_registration(shape: NodeShape, values: list[bytes | None]) -> bool:
    return tuple(values[1:5]) == shape.registration


def node_is_up(values: list[bytes | None]) -> bool:
    return values[0] == b"up"


def node_free(node_id: str, shape: NodeShape, values: list[bytes | None]) -> NodeFree:
    """What is free on a node, from ``shape.fields`` read in order."""
    n, at = shape.gpus, _GPUS_AT
    try:
        return NodeFree(node_id, shape.gpu_memory_mb, [int(v or 0) for v in values[at:at + n]],
                        [int(v or 0) for v in values[at + n:]], int(values[5] or 0), int(values[6] or 0),
                        int(values[7] or 0), dict(shape.labels), *shape.capacity, shape.serves, values[8] is not None)
    except ValueError:  # name the field: a hand-written or foreign value (``draining`` is any text)
        for name, value in zip(shape.fields[5:], values[5:], strict=True):
            if name != b"draining":
                _count({name: value} if value is not None else {}, name)
        raise


def labels_arg(labels: Mapping[str, str]) -> str:
    """A node's labels as register.lua takes them (it writes ``label:<key>`` fields)."""
    return json.dumps(dict(labels), sort_keys=True) if labels else "{}"


def gpus_arg(indices: Iterable[int]) -> str:
    """GPU indices as the task hash ``gpus`` field and reserve.lua take them: "0,3", "" for none."""
    return ",".join(map(str, indices))


def parse_gpus(text: str | None) -> list[int]:
    return [int(g) for g in text.split(",")] if text else []
