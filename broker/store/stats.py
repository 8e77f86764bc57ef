"""What the metrics read from Redis besides the dispatcher's own cycle: the pending queue counted
by tenant and priority class, the outcome counters and histograms the scripts keep
(``P outcomes``, _release.lua ``tally``), rejected messages per node, the registered nodes, and
the warm hits and misses workers publish (``P warmstarts``).

Counting the queue reads all of it, so the dispatcher calls ``read_stats`` at most once per
``explain_interval_s`` (broker.metrics), in one round trip, and once per ``PENDING_EACH``
pending tasks as many intervals (``interval_ms``): at 1M pending a count takes about 1.5 s on the
2-core VM, and once a second it was most of the dispatcher's time (issue 14); counting stays
near 5 % of it, and the gauges are that much older.
"""

from __future__ import annotations

import json
import math
from bisect import bisect_left
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import redis

from broker.store import warm_map
from broker.store.connection import encode_command, raw_pipeline
from broker.store.keys import SEQ_BITS, PoolKeys

#: Upper bounds (s) of the wait and run histogram buckets, as _release.lua's BUCKETS_S; +Inf follows.
BUCKETS_S = (1, 5, 15, 60, 300, 900, 3600, 14400, 86400)
OUTCOMES = ("succeeded", "failed", "cancelled", "preempted", "requeued")
PRIORITY_CLASSES = ("high", "normal", "low")
PENDING_EACH = 20_000  # pending tasks counted per explain_interval_s (about 60 ms of counting)
PAGE = 50_000  # pending tasks read per round trip when counting


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
    # Raw replies: redis-py's callbacks (a float and a tuple per zset entry, a dict of every
    # request) cost more than the count itself at 1M pending (issue 14).
    outcomes, rejected, nodes, warm = raw_pipeline(client, [
        encode_command(b"HGETALL", keys.outcomes.encode()),
        encode_command(b"HGETALL", keys.rejected.encode()),
        encode_command(b"SMEMBERS", keys.nodes.encode()),
        encode_command(b"HGETALL", keys.warmstarts.encode())])
    stats = Stats(rejected={k.decode(): int(v) for k, v in _mapping(rejected).items()},
                  registered={n.decode() for n in nodes},
                  warm_starts=warm_map.decode_starts(_mapping(warm)))
    _count_pending(client, keys, stats)
    _read_outcomes(stats, _mapping(outcomes))
    return stats


def interval_ms(every_ms: int, read: Stats) -> int:
    """How long to wait before counting again, after a count that found ``read``."""
    return every_ms * max(1, sum(read.pending.values()) // PENDING_EACH)


def _mapping(reply: Any) -> dict[bytes, bytes]:
    """A hash as read raw: RESP3 sends a map, RESP2 a flat list."""
    return reply if isinstance(reply, dict) else dict(zip(reply[::2], reply[1::2], strict=True))


class _Count:
    """Pending tasks by (tenant, priority class), and each tenant's first submitted (seq, task id)."""

    def __init__(self) -> None:
        self.tenant_of: dict[bytes | None, str | None] = {}  # request bytes -> its tenant (None: unreadable)
        self.counts: dict[tuple[str, str], int] = defaultdict(int)
        self.first: dict[str, tuple[float, bytes]] = {}

    def add(self, ids: list[bytes], scores: list[Any], requests: dict[bytes, bytes | None]) -> None:
        """A page of the queue, in score order: one run of entries per priority. Each run is found
        by bisection and counted by its requests' bytes (tasks alike share them, so each distinct
        request is decoded once), and walked only until each of its tenants was met once: its
        first task of each tenant is that tenant's oldest in the run."""
        band, start = 2 ** SEQ_BITS, 0
        while start < len(ids):
            high = math.floor(float(scores[start]) / band)
            end = bisect_left(scores, (high + 1) * band, lo=start, key=float)
            run = ids[start:end]
            tenants: set[str] = set()
            for request, count in Counter(map(requests.get, run)).items():
                tenant = _tenant(self.tenant_of, request)
                if tenant is not None:
                    self.counts[(tenant, priority_class(-high))] += count
                    tenants.add(tenant)
            for i, task_id in enumerate(run, start=start):
                if not tenants:
                    break
                tenant = self.tenant_of[requests.get(task_id)]
                if tenant in tenants:
                    tenants.discard(tenant)
                    seq = float(scores[i]) - high * band
                    if tenant not in self.first or seq < self.first[tenant][0]:
                        self.first[tenant] = (seq, task_id)
            start = end


def _count_pending(client: redis.Redis, keys: PoolKeys, stats: Stats) -> None:
    """Count by tenant and class; the score ``-priority * 2**SEQ_BITS + seq`` gives both priority
    and submit order, so only each tenant's first-submitted task's hash is read (its submit time).

    Read in pages of ``PAGE`` by score, each with its requests: at 1M pending one reply of the
    whole queue and one of every request (~100 MB) ran past the socket timeout on a loaded
    machine, and held Redis for that long; decoding every request and walking every entry in
    Python took seconds a count (issue 14). A page starts past the last score read, so tasks
    placed meanwhile shift nothing; a count is of the queue as the pages found it."""
    count, after = _Count(), b"-inf"
    while True:
        (page,) = raw_pipeline(client, [encode_command(
            b"ZRANGE", keys.pending.encode(), after, b"+inf", b"BYSCORE", b"LIMIT", b"0", b"%d" % PAGE, b"WITHSCORES")])
        if page and isinstance(page[0], list):  # RESP3: [member, score] pairs
            ids, scores = [p[0] for p in page], [p[1] for p in page]
        else:
            ids, scores = page[::2], page[1::2]
        if not ids:
            break
        (wires,) = raw_pipeline(client, [encode_command(b"HMGET", keys.requests.encode(), *ids)])
        count.add(ids, scores, dict(zip(ids, wires, strict=True)))
        if len(ids) < PAGE:
            break
        after = b"(" + repr(float(scores[-1])).encode()
    stats.pending = dict(count.counts)
    pipe = client.pipeline(transaction=False)
    for _seq, task_id in count.first.values():
        pipe.hget(keys.task(task_id.decode()), "submitted_at")
    for tenant, at in zip(count.first, pipe.execute(), strict=True):
        if at is not None:
            stats.oldest_submitted_ms[tenant] = int(at)


def _tenant(known: dict[bytes | None, str | None], request: bytes | None) -> str | None:
    """The tenant a stored request names (``default`` when missing), None when it cannot be read."""
    if request not in known:
        try:
            known[request] = str(json.loads(request or b"{}").get("t", "default"))
        except (ValueError, AttributeError):
            known[request] = None  # unreadable: the dispatcher quarantines it
    return known[request]


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
