"""The request: encoded, checked and decoded here.

Part of ``store/records.py`` (which re-exports these names): split off to keep each module small.

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
| k   | a gang's members (only when more than 1)             | count, 2 to 1024               |
| sp  | a gang: one member per node (only in a gang's)       | true or false                  |
| sl  | a gang: members on nodes sharing this label key      | label key, or absent           |
| mg  | elastic: the fewest whole GPUs it runs with (g: most) | count, 1 to g, or absent       |
| mk  | an elastic gang: the fewest members (k: most)        | count, 1 to k, or absent       |
 The checks are the ones ``lua/_request.lua`` makes before submit.lua
stores a request; the dispatcher makes them again for records written by hand or by an older
version.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields
from typing import Any, cast

from broker.models import MAX_PRIORITY, MAX_REPLICAS, MILLI, Resources, SubmitRequest, split_selector
from broker.scheduling.model import TaskRequest


class UnreadableRecord(ValueError):
    """A stored record this version cannot use (hand-written, or by an older version): names
    the field and why. Readers skip or quarantine such a record; it never stops a process."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"field {field!r}: {reason}")
        self.field, self.reason = field, reason


# ---- the request -------------------------------------------------------------------------

Wire = dict[str, Any]  # a decoded request


_compact = json.JSONEncoder(separators=(",", ":")).encode  # json.dumps(..., separators=...), less building one


def encode_request(req: SubmitRequest, member: bool = False) -> str:
    """The stored request; a gang's carries its shape (k, sp, sl), unless ``member``: what one
    of its members asks for (reserve.lua places a request with ``k`` nowhere: only
    reserve_gang.lua commits a gang, all members in one call)."""
    r = req.resources
    wire = {"g": r.whole_gpus, "m": r.gpu_milli, "gm": r.gpu_memory_mb or 0, "c": r.cpu_milli,
            "r": r.memory_mb, "l": dict(sorted(r.labels.items())), "p": req.priority,
            "n": req.task_name, "t": req.tenant, "e": req.estimated_runtime_s, "x": req.preemptible}
    if r.min_gpus is not None:
        wire["mg"] = r.min_gpus
    if req.replicas > 1 and not member:
        wire.update({"k": req.replicas, "sp": req.spread})
        if req.same_label:
            wire["sl"] = req.same_label
        if req.min_replicas is not None:
            wire["mk"] = req.min_replicas
    return _compact(wire)


#: Request keys -> the submit field each one stores (what InvalidRequest names).
REQUEST_FIELDS = {"g": "resources.gpus", "m": "resources.gpus", "gm": "resources.gpu_memory_mb",
                  "c": "resources.cpus", "r": "resources.memory_mb", "l": "resources.labels", "p": "priority",
                  "n": "task_name", "t": "tenant", "e": "estimated_runtime_s", "x": "preemptible", "req": "request",
                  "k": "replicas", "sp": "spread", "sl": "same_label", "mg": "resources.min_gpus",
                  "mk": "min_replicas"}
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
    if "k" in wire:
        _check_gang(wire)
    _check_least(wire, "mg", "g")
    _check_least(wire, "mk", "k")
    return wire


def _check_least(wire: Wire, key: str, most: str) -> None:
    """An elastic request's fewest (``mg`` GPUs, ``mk`` members): absent, or 1 to its most."""
    if key not in wire:
        return
    value, top = wire[key], wire.get(most, 1)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
        raise UnreadableRecord(key, f"must be an integer from 1 to {most} ({top}) (got {_json_what(value)})")


def _check_gang(wire: Wire) -> None:
    k = wire["k"]
    if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= MAX_REPLICAS:
        raise UnreadableRecord("k", f"must be an integer from 2 to {MAX_REPLICAS} (got {_json_what(k)})")
    if not isinstance(wire.get("sp", False), bool):
        raise UnreadableRecord("sp", f"must be true or false (got {_json_what(wire['sp'])})")
    if "sl" in wire and not isinstance(wire["sl"], str):
        raise UnreadableRecord("sl", f"must be a label key (got {_json_what(wire['sl'])})")


def resources_of(wire: Wire) -> Resources:
    gpus = wire["g"] if wire["g"] else wire["m"] / MILLI
    return Resources(gpus=float(gpus), gpu_memory_mb=wire["gm"] or None, cpus=wire["c"] / MILLI,
                     memory_mb=wire["r"], labels=wire["l"], min_gpus=wire.get("mg"))


def task_request(task_id: str, wire: Wire, seq: int = 0, preemptible_default: bool = False) -> TaskRequest:
    exact, prefer = split_selector(wire["l"])
    x = wire.get("x")
    return TaskRequest(task_id, wire["g"], wire["m"], wire["gm"], wire["c"], wire["r"], exact, wire["p"], seq,
                       wire.get("t", "default"), wire.get("n", ""), wire.get("e"), 0.0,
                       preemptible_default if x is None else bool(x), prefer, wire.get("k", 1),
                       bool(wire.get("sp", False)), wire.get("sl"), wire.get("mg", 0), wire.get("mk", 0))


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
