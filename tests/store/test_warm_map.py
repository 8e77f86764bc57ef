"""The warm map (issue 14, warm affinity) against a real Redis: what workers publish is what the
dispatcher's view reads, only when it changed; forget removes a node's part; ``gpubroker nodes``
shows the hit rate."""

from __future__ import annotations

import redis
from rich.console import Console

from broker.cli.views import nodes_table
from broker.store import warm_map
from broker.store.free_view import FreeView
from broker.store.keys import PoolKeys
from broker.store.reads import read_nodes
from broker.store.scripts import ForgetCode, Scripts


def test_published_sets_reach_the_view_and_an_unchanged_map_is_not_read_again(
        redis_client: redis.Redis, keys: PoolKeys) -> None:
    view = FreeView()
    view.refresh(redis_client, keys, 0)
    assert not view.warm
    warm_map.publish(redis_client, keys, "n1", [("1", "A"), ("0,2", "B")], (3, 1))
    warm_map.publish(redis_client, keys, "n2", [("0", "A")])
    view.refresh(redis_client, keys, 0)
    assert view.warm.by_name == {"A": {"n1": [(1,)], "n2": [(0,)]}, "B": {"n1": [(0, 2)]}}
    assert view.warm.held == {"n1": {0, 1, 2}, "n2": {0}} and view.warm.processes == {"n1": 2, "n2": 1}
    assert warm_map.read_starts(redis_client, keys) == {"n1": (3, 1)}
    redis_client.hset(keys.warm, "n3", "not json")  # unreadable, without a version bump: not read yet
    before = view.warm
    view.refresh(redis_client, keys, 0)
    assert view.warm is before
    warm_map.publish(redis_client, keys, "n2", [])  # n2's process exited
    view.refresh(redis_client, keys, 0)
    assert view.warm.by_name == {"A": {"n1": [(1,)]}, "B": {"n1": [(0, 2)]}}  # n3 left out


def test_forget_removes_the_nodes_warm_sets_and_counts(scripts: Scripts, redis_client: redis.Redis,
                                                       keys: PoolKeys) -> None:
    scripts.register("n1", "inc-1", 1000, 2, 1000, 1000, 1000, 2, {})
    warm_map.publish(redis_client, keys, "n1", [("1", "A")], (1, 1))
    assert scripts.forget("n1", "inc-1")[0] is ForgetCode.REMOVED
    assert warm_map.read_warm(redis_client, keys)[1].by_name == {}
    assert warm_map.read_starts(redis_client, keys) == {}


def test_gpubroker_nodes_shows_the_hit_rate(scripts: Scripts, redis_client: redis.Redis, keys: PoolKeys) -> None:
    scripts.register("n1", "inc-1", 60_000, 2, 1000, 1000, 1000, 2, {})
    scripts.register("n2", "inc-2", 60_000, 2, 1000, 1000, 1000, 2, {})
    warm_map.publish(redis_client, keys, "n1", None, (3, 1))
    nodes = read_nodes(redis_client, keys)
    assert [n.warm_starts for n in nodes] == [(3, 1), (0, 0)]
    console = Console(width=200, record=True)
    console.print(nodes_table(nodes))
    text = console.export_text()
    assert "warm hits" in text and "3/4 (75%)" in text
    assert warm_map.hit_rate(0, 0) == "-"
