"""What the metrics read from Redis besides the dispatcher's own cycle: the pending queue counted
by tenant and priority class, the outcome counters and histograms the scripts keep
(``P outcomes``, _release.lua ``tally``), rejected messages per node, the registered nodes, and
the warm hits and misses workers publish (``P warmstarts``).

Counting the queue reads all of it, so the dispatcher calls ``read_stats`` at most once per
``explain_interval_s`` (broker.metrics), in one round trip.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import cast

import redis

from broker.store import warm_map
from broker.store.keys import SEQ_BITS, PoolKeys

#: Upper bounds (s) of the wait and run histogram buckets, as _release.lua's BUCKETS_S; +Inf follows.
BUCKETS_S = (1, 5, 15, 60, 300, 900, 3600, 14400, 86400)
OUTCOMES = ("succeeded", "failed", "cancelled", "preempted", "requeued")
PRIORITY_CLASSES = ("high", "normal", "low")


def priority_class(priority: int) -> str:
    """``high`` above 0, ``normal`` at 0 (the default), ``low`` below."""
    return "high" if priority > 0 else "low" if priority < 0 else "normal"


@dataclass
class Histogram:
    buckets: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS_S) + 1))  # per bucket, not cumulative
    sum_s: float = 0.0


@dataclass
class Stats:
    pending: dict[tuple[str, str], int] = field(default_factory=dict)  # (tenant, priority class) -> tasks
    oldest_submitted_ms: dict[str, int] = field(default_factory=dict)  # tenant -> its oldest pending task's submit
    outcomes: dict[tuple[str, str], int] = field(default_factory=dict)  # (tenant, outcome) -> tasks
    wait: dict[str, Histogram] = field(default_factory=dict)  # tenant -> histogram
    run: dict[str, Histogram] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)  # node id -> messages rejected unread
    registered: set[str] = field(default_factory=set)  # node ids in ``P nodes``
    warm_starts: dict[str, tuple[int, int]] = field(default_factory=dict)  # node id -> warm hits, misses

    def tenants(self) -> set[str]:
        return ({t for t, _ in self.pending} | {t for t, _ in self.outcomes} | set(self.wait) | set(self.run)
                | {"default"})


def read_stats(client: redis.Redis, keys: PoolKeys) -> Stats:
    pipe = client.pipeline(transaction=False)
    pipe.zrange(keys.pending, 0, -1, withscores=True)
    pipe.hgetall(keys.requests)
    pipe.hgetall(keys.outcomes)
    pipe.hgetall(keys.rejected)
    pipe.smembers(keys.nodes)
    pipe.hgetall(keys.warmstarts)
    pending, requests, outcomes, rejected, nodes, warm = pipe.execute()
    stats = Stats(rejected={k.decode(): int(v) for k, v in cast(dict[bytes, bytes], rejected).items()},
                  registered={n.decode() for n in cast(set[bytes], nodes)},
                  warm_starts=warm_map.decode_starts(cast(dict[bytes, bytes], warm)))
    _count_pending(client, keys, stats, cast(list[tuple[bytes, float]], pending), cast(dict[bytes, bytes], requests))
    _read_outcomes(stats, cast(dict[bytes, bytes], outcomes))
    return stats


def _count_pending(client: redis.Redis, keys: PoolKeys, stats: Stats, pending: list[tuple[bytes, float]],
                   requests: dict[bytes, bytes]) -> None:
    """Count by tenant and class; the score ``-priority * 2**SEQ_BITS + seq`` gives both priority
    and submit order, so only each tenant's first-submitted task's hash is read (its submit time)."""
    counts: dict[tuple[str, str], int] = defaultdict(int)
    first: dict[str, tuple[float, bytes]] = {}  # tenant -> (seq, task id)
    for task_id, score in pending:
        high = math.floor(score / 2 ** SEQ_BITS)
        try:
            tenant = str(json.loads(requests.get(task_id) or b"{}").get("t", "default"))
        except (ValueError, AttributeError):
            continue  # unreadable: the dispatcher quarantines it
        counts[(tenant, priority_class(-high))] += 1
        seq = score - high * 2 ** SEQ_BITS
        if tenant not in first or seq < first[tenant][0]:
            first[tenant] = (seq, task_id)
    stats.pending = dict(counts)
    pipe = client.pipeline(transaction=False)
    for _seq, task_id in first.values():
        pipe.hget(keys.task(task_id.decode()), "submitted_at")
    for tenant, at in zip(first, pipe.execute(), strict=True):
        if at is not None:
            stats.oldest_submitted_ms[tenant] = int(at)


def _read_outcomes(stats: Stats, raw: dict[bytes, bytes]) -> None:
    for name, value in raw.items():
        what, _, tenant_b = name.decode().partition("|")
        tenant = tenant_b or "default"
        if what in OUTCOMES:
            stats.outcomes[(tenant, what)] = int(value)
        elif what in ("wait_sum", "run_sum"):
            hists = stats.wait if what == "wait_sum" else stats.run
            hists.setdefault(tenant, Histogram()).sum_s = float(value)
        elif what.startswith(("wait:", "run:")):
            kind, _, index = what.partition(":")
            hists = stats.wait if kind == "wait" else stats.run
            i = int(index) - 1  # Lua counts from 1
            if 0 <= i <= len(BUCKETS_S):
                hists.setdefault(tenant, Histogram()).buckets[i] = int(value)
