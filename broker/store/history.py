"""Task history and usage (``gpubroker tasks`` / ``usage``, ``Client.tasks`` / ``usage``), like
Slurm's squeue and sacct: live tasks from the pending queues and the nodes' task sets, final ones
from the history index ``P finished`` that ``conclude`` (lua/_release.lua) writes in the same
script as the final transition. An index entry outlives its record by at most one trim (the
dispatcher's ``trim_finished``); readers skip it meanwhile, so what they show expires with the
records."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any, cast

import redis
from pydantic import BaseModel

from broker.errors import InvalidRequest
from broker.models import TaskState
from broker.store.keys import PoolKeys
from broker.store.records import UnreadableRecord, parse_gpus
from broker.store.request_records import decode_request, resources_of

#: ``--state`` names: ``running`` is RESERVED or RUNNING, ``finished`` SUCCEEDED.
STATES: dict[str, frozenset[TaskState]] = {
    "pending": frozenset({TaskState.PENDING}),
    "running": frozenset({TaskState.RESERVED, TaskState.RUNNING}),
    "finished": frozenset({TaskState.SUCCEEDED}),
    "failed": frozenset({TaskState.FAILED}),
    "cancelled": frozenset({TaskState.CANCELLED}),
}
USAGE_BY = ("tenant", "node", "task")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_FIELDS = ("name", "state", "tenant", "priority", "node", "gpus", "req", "submitted_at", "started_at",
           "finished_at", "error")
_CHUNK = 500


class TaskRow(BaseModel):
    """One task as ``gpubroker tasks`` lists it (times in seconds since the epoch)."""

    id: str
    name: str
    state: TaskState
    tenant: str
    priority: int
    node: str | None = None
    gpus: list[int] = []  # the GPU indices it holds or held
    gpu_share: float = 0.0  # GPUs requested: whole ones, or a share of one
    cpus: float = 0.0
    submitted_at: float
    started_at: float | None = None
    finished_at: float | None = None
    wait_s: float | None = None  # submit to the start of its last attempt
    run_s: float | None = None  # that start to its end (or to now, while running)
    error: str | None = None


class UsageRow(BaseModel):
    """What the final tasks of one tenant, node or task name used (like sacct's totals)."""

    key: str
    tasks: int
    succeeded: int
    failed: int
    cancelled: int
    gpu_hours: float
    cpu_hours: float
    wait_p50_s: float | None = None
    wait_p95_s: float | None = None


def parse_since(since: str | float | timedelta | datetime | None, now_s: float, name: str = "since") -> float | None:
    """The start of a window in seconds since the epoch: "90s", "15m", "1h", "2d", "1w" or a
    number of seconds ago, a timedelta ago, or a datetime. InvalidRequest names ``name``."""
    if since is None:
        return None
    if isinstance(since, datetime):
        return since.timestamp()
    if isinstance(since, timedelta):
        seconds = since.total_seconds()
    elif isinstance(since, int | float) and not isinstance(since, bool):
        seconds = float(since)
    else:
        match = _DURATION.match(str(since))
        if not match:
            raise InvalidRequest({name: f"{since!r} is not a duration: a number with s, m, h, d or w (e.g. 1h, 30m)"})
        seconds = float(match[1]) * _UNITS[match[2] or "s"]
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidRequest({name: f"{since!r} must be a duration of 0 or more"})
    return now_s - seconds


def parse_states(states: str | Iterable[str] | None, name: str = "state") -> frozenset[TaskState]:
    """The task states of ``--state`` names (none given: every state)."""
    if states is None:
        return frozenset(TaskState)
    chosen: set[TaskState] = set()
    for state in [states] if isinstance(states, str) else states:
        if state.lower() not in STATES:
            raise InvalidRequest({name: f"{state!r} is not a state; use one of {', '.join(STATES)}"})
        chosen |= STATES[state.lower()]
    return frozenset(chosen) or frozenset(TaskState)


def parse_by(by: str, name: str = "by") -> str:
    if by not in USAGE_BY:
        raise InvalidRequest({name: f"{by!r} is not a grouping; use one of {', '.join(USAGE_BY)}"})
    return by


def parse_limit(limit: int | None, name: str = "limit") -> int | None:
    if limit is not None and limit < 1:
        raise InvalidRequest({name: f"must be 1 or more (got {limit})"})
    return limit


def _row(task_id: str, values: Sequence[bytes | None], now_s: float) -> TaskRow | None:
    """A row from the HMGET of ``_FIELDS``; None when the record is gone (expired) or unreadable."""
    t = dict(zip(_FIELDS, (v.decode(errors="replace") if v is not None else None for v in values), strict=True))
    if t["state"] is None or t["name"] is None:
        return None
    try:
        resources = resources_of(decode_request(t["req"] or ""))
        gpu_share, cpus = resources.gpus, resources.cpus
    except UnreadableRecord:  # a quarantined task: it held nothing
        gpu_share, cpus = 0.0, 0.0

    def seconds(name: str) -> float | None:
        value = t[name]
        return int(value) / 1000 if value else None

    submitted, started, finished = seconds("submitted_at") or 0.0, seconds("started_at"), seconds("finished_at")
    state = TaskState(t["state"])
    end = finished if state.is_final else now_s
    return TaskRow(
        id=task_id, name=t["name"], state=state, tenant=t["tenant"] or "default", priority=int(t["priority"] or 0),
        node=t["node"] or None, gpus=parse_gpus(t["gpus"]), gpu_share=gpu_share, cpus=cpus, submitted_at=submitted,
        started_at=started, finished_at=finished if state.is_final else None,
        wait_s=None if started is None else max(0.0, started - submitted),
        run_s=None if started is None or end is None else max(0.0, end - started), error=t["error"],
    )


def _read_rows(client: redis.Redis, keys: PoolKeys, ids: list[str], now_s: float) -> list[TaskRow | None]:
    pipe = client.pipeline(transaction=False)
    for task_id in ids:
        pipe.hmget(keys.task(task_id), _FIELDS)
    return [_row(task_id, values, now_s) for task_id, values in zip(ids, pipe.execute(), strict=True)]


def _live_ids(client: redis.Redis, keys: PoolKeys, states: frozenset[TaskState], node: str | None) -> list[str]:
    """Pending ids (dispatch queue, then delayed), then the ids on each node (sorted by node)."""
    ids: list[str] = []
    if TaskState.PENDING in states and node is None:
        for key in (keys.pending, keys.delayed):
            ids += [m.decode() for m in cast(list[bytes], client.zrange(key, 0, -1))]
    if states & STATES["running"]:
        registered = cast(set[bytes], client.smembers(keys.nodes))
        nodes = [node] if node is not None else sorted(m.decode() for m in registered)
        for node_id in nodes:
            ids += sorted(m.decode() for m in cast(set[bytes], client.smembers(keys.node_tasks(node_id))))
    return ids


def _finished_ids(client: redis.Redis, keys: PoolKeys, since_ms: int | None, until_ms: int | None = None
                  ) -> Iterator[list[str]]:
    """Final task ids, newest first, in chunks (ZRANGE BYSCORE REV: the monitor role's +zrange)."""
    top: str = "+inf" if until_ms is None else str(until_ms)
    bottom = "-inf" if since_ms is None else str(since_ms)
    offset = 0
    while True:
        chunk = cast(list[bytes], client.zrange(keys.finished, top, bottom, desc=True, byscore=True,
                                                offset=offset, num=_CHUNK))
        if not chunk:
            return
        yield [m.decode() for m in chunk]
        offset += len(chunk)


def read_tasks(client: redis.Redis, keys: PoolKeys, now_ms: int, states: frozenset[TaskState] | None = None,
               tenant: str | None = None, node: str | None = None, since_s: float | None = None,
               limit: int | None = None) -> list[TaskRow]:
    """Pending tasks (queue order), running ones (by node), then final ones finished since
    ``since_s`` (newest first), filtered by tenant and node, at most ``limit``."""
    states = states or frozenset(TaskState)
    now_s, rows = now_ms / 1000, list[TaskRow]()

    def kept(found: list[TaskRow | None]) -> list[TaskRow]:
        return [r for r in found if r is not None and r.state in states and (tenant is None or r.tenant == tenant)
                and (node is None or r.node == node)]

    live = _live_ids(client, keys, states, node)
    for start in range(0, len(live), _CHUNK):
        rows += kept(_read_rows(client, keys, live[start:start + _CHUNK], now_s))
        if limit is not None and len(rows) >= limit:
            return rows[:limit]
    if states & {TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED}:
        since_ms = None if since_s is None else int(since_s * 1000)
        for ids in _finished_ids(client, keys, since_ms):
            rows += kept(_read_rows(client, keys, ids, now_s))
            if limit is not None and len(rows) >= limit:
                return rows[:limit]
    return rows


def _percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (what sacct-style reports use): None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def usage(rows: Iterable[TaskRow], by: str) -> list[UsageRow]:
    """Totals per ``by`` (tenant, node or task name) of final task rows, most GPU-hours first."""
    groups: dict[str, list[TaskRow]] = {}
    for row in rows:
        key = {"tenant": row.tenant, "node": row.node or "-", "task": row.name}[by]
        groups.setdefault(key, []).append(row)
    out = []
    for key, members in groups.items():
        counts = {s: sum(1 for r in members if r.state is s) for s in (TaskState.SUCCEEDED, TaskState.FAILED,
                                                                      TaskState.CANCELLED)}
        waits = [r.wait_s for r in members if r.wait_s is not None]
        out.append(UsageRow(
            key=key, tasks=len(members), succeeded=counts[TaskState.SUCCEEDED], failed=counts[TaskState.FAILED],
            cancelled=counts[TaskState.CANCELLED],
            gpu_hours=sum(r.gpu_share * (r.run_s or 0) for r in members) / 3600,
            cpu_hours=sum(r.cpus * (r.run_s or 0) for r in members) / 3600,
            wait_p50_s=_percentile(waits, 0.5), wait_p95_s=_percentile(waits, 0.95)))
    return sorted(out, key=lambda u: (-u.gpu_hours, u.key))


def read_usage(client: redis.Redis, keys: PoolKeys, now_ms: int, since_s: float | None, by: str) -> list[UsageRow]:
    final = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED})
    return usage(read_tasks(client, keys, now_ms, final, since_s=since_s), by)


def trim_finished(client: redis.Redis, keys: PoolKeys, limit: int = _CHUNK) -> int:
    """Drop index entries whose task record has expired, looking at the oldest ``limit``: records
    expire about in the order they finished. Returns how many were dropped."""
    oldest = [m.decode() for m in cast(list[bytes], client.zrange(keys.finished, 0, limit - 1))]
    if not oldest:
        return 0
    pipe = client.pipeline(transaction=False)
    for task_id in oldest:
        pipe.exists(keys.task(task_id))
    gone = [task_id for task_id, there in zip(oldest, pipe.execute(), strict=True) if not there]
    if gone:
        client.zrem(keys.finished, *gone)
    return len(gone)


def as_dicts(rows: Iterable[BaseModel]) -> list[dict[str, Any]]:
    return [row.model_dump(mode="json") for row in rows]
