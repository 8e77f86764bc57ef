"""Every format gpubroker stores in Redis: encoded and decoded here, and nowhere else in Python.

The Lua scripts read and write the same formats (each script's header names the fields it
touches); ``store/keys.py`` lists the keys and the fields of the task and node hashes.

**The request** (task hash ``req``, ``P requests``): compact JSON written once at submit.
Requests of one shape serialise to the same text, which the dispatcher and reserve.lua decode
once per cycle or batch; the keys are short for the same reason.

| key | meaning                                              | unit / values                  |
|-----|------------------------------------------------------|--------------------------------|
| g   | whole GPUs                                           | count                          |
| m   | a share of one GPU (when 0 < gpus < 1), else 0       | thousandths of a GPU           |
| gm  | GPU memory per GPU; 0 = unspecified                  | MiB                            |
| c   | CPU                                                  | thousandths of a CPU           |
| r   | RAM                                                  | MiB                            |
| l   | label selector, sorted by label                      | label -> value, or value list  |
| p   | priority (higher runs first)                         | integer                        |
| n   | Celery task name                                     |                                |
| t   | tenant                                               |                                |
| e   | the task's own runtime estimate                      | seconds, or null               |
| x   | preemptible                                          | true, false, or null (pool default) |

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
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, cast

from broker.errors import InvalidRequest
from broker.models import (
    MAX_PRIORITY,
    MILLI,
    GpuView,
    NodeView,
    Resources,
    SubmitRequest,
    TaskState,
    TaskStatus,
    split_selector,
)
from broker.scheduling.model import GpuKind, NodeFree, RunningTask, TaskRequest

# ---- states and transitions --------------------------------------------------------------

P, R, U, S, F, C = (TaskState.PENDING, TaskState.RESERVED, TaskState.RUNNING, TaskState.SUCCEEDED,
                    TaskState.FAILED, TaskState.CANCELLED)

#: script -> (the states it moves a task from, the states it may leave it in). A script's header
#: says ``Transitions: FROM -> TO`` with the same names.
TRANSITIONS: dict[str, tuple[frozenset[TaskState], frozenset[TaskState]]] = {
    "submit": (frozenset({P}), frozenset({P})),  # (new), or a task awaiting its replacement
    "promote": (frozenset({P}), frozenset({P})),
    "reserve": (frozenset({P}), frozenset({R})),
    "start": (frozenset({R}), frozenset({U})),
    "progress": (frozenset(), frozenset()),
    "finish": (frozenset({R, U}), frozenset({S, F, C, P})),
    "cancel": (frozenset({P, R}), frozenset({C})),
    "expire": (frozenset({P, R}), frozenset({C})),
    "preempt": (frozenset({R}), frozenset({P})),
    "reap": (frozenset({R, U}), frozenset({P, F, C})),
    "register": (frozenset({R, U}), frozenset({P, F, C})),
    "heartbeat": (frozenset(), frozenset()),
    "quarantine": (frozenset({P}), frozenset({F})),
}


class UnreadableRecord(ValueError):
    """A stored record this version cannot use (hand-written, or by an older version): names
    the field and why. Readers skip or quarantine such a record; it never stops a process."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"field {field!r}: {reason}")
        self.field, self.reason = field, reason

# ---- the request --------------------------------------------------------------------------

Wire = dict[str, Any]  # a decoded request


def encode_request(req: SubmitRequest) -> str:
    r = req.resources
    return json.dumps({"g": r.whole_gpus, "m": r.gpu_milli, "gm": r.gpu_memory_mb or 0, "c": r.cpu_milli,
                       "r": r.memory_mb, "l": dict(sorted(r.labels.items())), "p": req.priority,
                       "n": req.task_name, "t": req.tenant, "e": req.estimated_runtime_s, "x": req.preemptible},
                      separators=(",", ":"))


#: Request keys -> the submit field each one stores (what InvalidRequest names).
REQUEST_FIELDS = {"g": "resources.gpus", "m": "resources.gpus", "gm": "resources.gpu_memory_mb",
                  "c": "resources.cpus", "r": "resources.memory_mb", "l": "resources.labels", "p": "priority",
                  "n": "task_name", "t": "tenant", "e": "estimated_runtime_s", "x": "preemptible", "req": "request"}
#: The counts of a request and their largest values (Resources' limits); lua/_request.lua has the same.
REQUEST_COUNTS = {"g": 1024, "m": MILLI, "gm": 16 * 1024 * 1024, "c": 100_000 * MILLI, "r": 1 << 40}


def _json_what(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int | float):
        return repr(value)
    names: dict[type, str] = {str: "a string", dict: "an object", list: "an array"}
    return names.get(type(value), type(value).__name__)


def decode_request(text: bytes | str) -> Wire:
    """A stored request, checked as submit.lua checks it (lua/_request.lua) before storing one:
    UnreadableRecord names the first key that is missing, of the wrong type or out of range."""
    try:
        wire = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise UnreadableRecord("req", f"not JSON ({type(exc).__name__}: {str(exc)[:80]})") from None
    if not isinstance(wire, dict):
        raise UnreadableRecord("req", f"must be a JSON object (got {_json_what(wire)})")
    for key, top in REQUEST_COUNTS.items():
        value = wire.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
            got = "nothing" if key not in wire else _json_what(value)
            raise UnreadableRecord(key, f"must be an integer from 0 to {top} (got {got})")
    if wire["g"] and wire["m"]:
        raise UnreadableRecord("m", "a share of one GPU goes with 0 whole GPUs (g)")
    p = wire.get("p")
    if isinstance(p, bool) or not isinstance(p, int) or abs(p) > MAX_PRIORITY:
        got = "nothing" if "p" not in wire else _json_what(p)
        raise UnreadableRecord("p", f"must be an integer from -{MAX_PRIORITY} to {MAX_PRIORITY} (got {got})")
    labels = wire.get("l")
    if labels == []:  # Lua's cjson writes an empty object as an empty array
        labels = wire["l"] = {}
    if not isinstance(labels, dict):
        raise UnreadableRecord("l", f"must be an object of label -> value (got {_json_what(labels)})")
    for label, value in labels.items():
        if not isinstance(value, str) and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise UnreadableRecord("l", f"label {label[:80]!r} must be a string or a list of strings "
                                        f"(got {_json_what(value)})")
    for key in ("n", "t"):  # reserve.lua needs the name (rate limits, what a node runs); the tenant may be absent
        if (key in wire or key == "n") and not isinstance(wire.get(key), str):
            got = "nothing" if key not in wire else _json_what(wire[key])
            raise UnreadableRecord(key, f"must be a string (got {got})")
    e = wire.get("e")
    if e is not None and (isinstance(e, bool) or not isinstance(e, int | float) or not 0 <= e < math.inf):
        raise UnreadableRecord("e", f"must be null or a number of seconds >= 0 (got {_json_what(e)})")
    if wire.get("x") is not None and not isinstance(wire["x"], bool):
        raise UnreadableRecord("x", f"must be true, false or null (got {_json_what(wire['x'])})")
    return wire


def resources_of(wire: Wire) -> Resources:
    gpus = wire["g"] if wire["g"] else wire["m"] / MILLI
    return Resources(gpus=float(gpus), gpu_memory_mb=wire["gm"] or None, cpus=wire["c"] / MILLI,
                     memory_mb=wire["r"], labels=wire["l"])


def task_request(task_id: str, wire: Wire, seq: int = 0, preemptible_default: bool = False) -> TaskRequest:
    exact, prefer = split_selector(wire["l"])
    x = wire.get("x")
    return TaskRequest(task_id, wire["g"], wire["m"], wire["gm"], wire["c"], wire["r"], exact, wire["p"], seq,
                       wire.get("t", "default"), wire.get("n", ""), wire.get("e"), 0.0,
                       preemptible_default if x is None else bool(x), prefer)


@dataclass(frozen=True, slots=True)
class StoredRequest:
    """What submit.lua stores of a validated request besides its message."""

    text: str  # the request JSON
    gpu_kind: str  # its GPU kind, counted in P mix

    @classmethod
    def of(cls, req: SubmitRequest) -> StoredRequest:
        return cls(encode_request(req), gpu_kind_of(req.resources))


Pending = list[tuple[str, int, Wire]]  # (task id, rank in the pending queue, its decoded request)
Poisoned = dict[str, tuple[bytes, UnreadableRecord]]  # task id -> its unreadable request text, and why


def decode_pending(ids: list[bytes], texts: list[bytes | None], first_rank: int,
                   poisoned: Poisoned | None = None) -> Pending:
    """Pending ids with their request texts, decoded; each distinct text once (tasks of one
    shape share it), so the returned dicts may be shared and must not be mutated. A task whose
    request is gone (placed or cancelled between two reads) is left out, and so is one whose
    request cannot be read: it goes into ``poisoned``, for the dispatcher to quarantine."""
    parsed: dict[bytes, Wire | UnreadableRecord] = {}
    out = []
    for rank, (task_id, text) in enumerate(zip(ids, texts, strict=True), first_rank):
        if text is None:
            continue
        wire = parsed.get(text)
        if wire is None:
            try:
                wire = parsed[text] = decode_request(text)
            except UnreadableRecord as exc:
                wire = parsed[text] = exc
        if isinstance(wire, UnreadableRecord):
            if poisoned is not None:
                poisoned[task_id.decode(errors="replace")] = (text, wire)
            continue
        out.append((task_id.decode(), rank, wire))
    return out


def quarantine_reason(problem: UnreadableRecord) -> str:
    """The error a quarantined task ends FAILED with (quarantine.lua)."""
    return f"unreadable request, quarantined: {problem}"


_new_request = cast(Any, TaskRequest)  # called with the fields spread from a tuple
_REQUEST_FIELDS = tuple(f.name for f in fields(TaskRequest))


def task_requests(pending: Pending, preemptible_default: bool = False) -> list[TaskRequest]:
    """The planner's view of ``pending``; ``seq`` is the rank. The fields shared by every task of
    one request are worked out once per request (the dispatcher builds tens of thousands)."""
    shapes: dict[int, tuple[tuple[Any, ...], tuple[Any, ...]]] = {}  # id of a shared wire -> fields around seq
    out = []
    for task_id, rank, wire in pending:
        shape = shapes.get(id(wire))
        if shape is None:
            request = task_request("", wire, 0, preemptible_default)
            values = tuple(getattr(request, name) for name in _REQUEST_FIELDS)  # astuple would deep-copy
            shape = shapes[id(wire)] = (values[1:8], values[9:])
        out.append(_new_request(task_id, *shape[0], rank, *shape[1]))
    return out


# ---- the task hash ------------------------------------------------------------------------------


def task_status(task_id: str, h: Mapping[bytes, bytes], waiting: Mapping[str, Any] | None) -> TaskStatus:
    """A task hash (``keys``' task fields) as users read it; ``waiting``: the dispatcher's last
    word on a pending task (position, reason, eta)."""
    t = {k.decode(): v.decode(errors="replace") for k, v in h.items() if k != b"message"}
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
    )


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


def _s(value: bytes | None) -> str:
    return value.decode() if value is not None else ""


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
            id=node_id, state=_s(h.get(b"state")) or "unknown", lease_expires_at=lease_at,
            gpus=gpus, gpu_memory_mb=memory, cpus=cpu_m / MILLI, memory_mb=mem, slots=slots, labels=shape.labels,
            free_cpus=_count(h, b"free_cpu_m") / MILLI, free_memory_mb=_count(h, b"free_mem"),
            free_slots=_count(h, b"free_slots"), tasks=tasks,
            serves=None if shape.serves is None else sorted(shape.serves),
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


#: The node hash fields that change, read per cycle; ``registration`` is fields 1-4.
FREE_FIELDS = (b"state", b"incarnation", b"registered_at", b"cap_gpus", b"gpu_mem", b"free_cpu_m", b"free_mem",
               b"free_slots")


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
    n = shape.gpus
    try:
        return NodeFree(node_id, shape.gpu_memory_mb, [int(v or 0) for v in values[8:8 + n]],
                        [int(v or 0) for v in values[8 + n:]], int(values[5] or 0), int(values[6] or 0),
                        int(values[7] or 0), dict(shape.labels), *shape.capacity, shape.serves)
    except ValueError:  # name the field: a hand-written or foreign value
        for name, value in zip(shape.fields[5:], values[5:], strict=True):
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
