"""The pending count the metrics show (``store.stats``) counts by priority run and request bytes,
page by page (issue 14: decoding every request took seconds at 1M pending): held equal to counting task by
task, with mixed tenants, priorities, sizes, unreadable and missing requests. Against a real Redis."""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict

import pytest
import redis

from broker.models import Resources
from broker.store import stats
from broker.store.keys import SEQ_BITS, PoolKeys
from broker.store.scripts import Scripts
from tests.conftest import Clock
from tests.invariants import submit_task


def _one_by_one(client: redis.Redis, keys: PoolKeys) -> tuple[dict[tuple[str, str], int], dict[str, int]]:
    """The count as it was done before: every task's request decoded, the oldest by sequence."""
    counts: dict[tuple[str, str], int] = defaultdict(int)
    first: dict[str, tuple[float, bytes]] = {}
    requests = client.hgetall(keys.requests)
    for task_id, score in client.zrange(keys.pending, 0, -1, withscores=True):
        high = math.floor(score / 2 ** SEQ_BITS)
        try:
            tenant = str(json.loads(requests.get(task_id) or b"{}").get("t", "default"))
        except (ValueError, AttributeError):
            continue
        counts[(tenant, stats.priority_class(-high))] += 1
        seq = score - high * 2 ** SEQ_BITS
        if tenant not in first or seq < first[tenant][0]:
            first[tenant] = (seq, task_id)
    oldest = {tenant: int(client.hget(keys.task(task_id.decode()), "submitted_at"))
              for tenant, (_seq, task_id) in first.items()}
    return dict(counts), oldest


@pytest.mark.parametrize("seed", range(10))
def test_the_count_by_runs_equals_counting_task_by_task(redis_client: redis.Redis, keys: PoolKeys,
                                                        scripts: Scripts, clock: Clock, seed: int,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    if seed % 2:  # read in many pages
        monkeypatch.setattr(stats, "PAGE", rng.choice([1, 7, 30]))
    tenants = ["default", "a", "b", "c"][: rng.randint(1, 4)]
    ids = []
    for _ in range(rng.randint(1, 120)):
        clock.advance(rng.random())
        ids.append(submit_task(scripts, tenant=rng.choice(tenants), priority=rng.choice([-5, 0, 0, 3, 1000]),
                               resources=Resources(gpus=rng.choice([0, 1, 2]))))
    for task_id in rng.sample(ids, min(len(ids), rng.randint(0, 3))):
        redis_client.hset(keys.requests, task_id, rng.choice([b"not json", b"[1]", b'{"t": 7}']))
    for task_id in rng.sample(ids, min(len(ids), rng.randint(0, 2))):
        redis_client.hdel(keys.requests, task_id)  # counted as the default tenant's
    read = stats.read_stats(redis_client, keys)
    assert (read.pending, read.oldest_submitted_ms) == _one_by_one(redis_client, keys)


def test_an_empty_queue_counts_nothing(redis_client: redis.Redis, keys: PoolKeys) -> None:
    read = stats.read_stats(redis_client, keys)
    assert (read.pending, read.oldest_submitted_ms) == ({}, {})


def test_a_long_queue_is_counted_less_often() -> None:
    assert stats.interval_ms(1000, stats.Stats(pending={("a", "normal"): 10})) == 1000
    assert stats.interval_ms(1000, stats.Stats()) == 1000
    long = stats.Stats(pending={("a", "normal"): 30 * stats.PENDING_EACH, ("b", "high"): 20 * stats.PENDING_EACH})
    assert stats.interval_ms(1000, long) == 50_000  # 1M pending: every 50 s
