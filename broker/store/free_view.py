"""The dispatcher's view of what is free on each node, kept from cycle to cycle: a read takes
only the nodes that changed since the last one (issue 14: read whole at 10,000 nodes, the
snapshot was 4.2 s of a 9.3 s benchmark).

Why it cannot fall behind unnoticed: every script that changes a node's free capacity, state,
registration or lease membership (reserve, finish, cancel, expire, preempt, drain, register,
reap, forget) scores the node in ``P changes`` by a pool-wide sequence in the same EVAL
(_lib.lua ``touch``), so a change and its marker are one atomic step. A read takes the nodes
scored above the last sequence it saw, and leaves out leases that ran out since (heartbeat.lua
renews a lease without a marker: a lease not renewed is found by its score). Were the view
behind anyway, the cost is a refusal, never an over-commit: reserve.lua re-checks every
placement against the node hash inside its own EVAL, and the dispatcher re-reads a node whose
placement was refused (``forget``).

Everything is read afresh when the sequence goes back (Redis lost its data) or the count of
leases is not the view's (a change the markers did not carry).
"""

from __future__ import annotations

from typing import Any, cast

import redis

from broker.scheduling.model import NodeFree, WarmMap
from broker.scheduling.placement.free_index import FreeIndex
from broker.store.connection import encode_command, raw_pipeline
from broker.store.keys import PoolKeys
from broker.store.reads import Shapes, forget_gone, node_commands, nodes_free, with_scores
from broker.store.warm_map import VERSION, read_warm


class FreeView:
    """What ``read`` read last, and ``index``: the schedulable nodes by free shape (the lazy
    planner's). The NodeFree objects are shared from cycle to cycle: readers must
    copy, not change them."""

    def __init__(self) -> None:
        self.seen = 0  # the newest change sequence read
        self.nodes: dict[str, NodeFree | None] = {}  # None: registered but not up, or unreadable
        self.unreadable: dict[str, str] = {}  # node id -> why its hash could not be read
        self.shapes: Shapes = {}  # what each node registered with (reads.read_nodes_free)
        self.leased: set[str] = set()  # nodes holding a lease, run out or not, at the last read
        self.order: list[str] = []  # ``leased``, sorted: the order planners rank nodes in
        self.changed: set[str] = set()  # nodes the last read read anew
        self.expired: set[str] = set()  # leased nodes whose lease had run out at the last read
        self.node_reads = 0  # node hashes read so far (tests count them)
        self.index = FreeIndex()  # the schedulable nodes by free shape, updated on each refresh
        self._dirty: set[str] = set()  # nodes to read again whatever the markers say
        # Task name -> node -> GPU sets warm for it (store.warm_map), read again when its version moves:
        # the version rides on the refresh's round trip, so an unchanged map costs no extra one.
        self.warm = WarmMap()
        self._warm_version: bytes | None = b"never read"
        self._synced = False

    def forget(self, node_id: str) -> None:
        """Read the node again next time (reserve.lua found it other than the view has it)."""
        self._dirty.add(node_id)

    def read(self, client: redis.Redis, keys: PoolKeys, now_ms: int, draining: bool = False) -> list[NodeFree]:
        """What is free on each schedulable node (up, lease valid, not draining; ``draining=True``:
        draining ones too), in node id order, as ``reads.read_free`` reads it."""
        self.refresh(client, keys, now_ms)
        out = []
        for node_id in self.order:
            node = self.nodes.get(node_id)
            if node is not None and (draining or not node.draining) and node_id not in self.expired:
                out.append(node)
        return out

    def refresh_commands(self, keys: PoolKeys, now_ms: int) -> list[bytes]:
        """What ``refresh`` reads first, for a caller that sends it with other commands."""
        return [encode_command(b"ZRANGE", keys.changes.encode(), b"(%d" % self.seen, b"+inf", b"BYSCORE"),
                encode_command(b"ZRANGE", keys.changes.encode(), b"-1", b"-1", b"WITHSCORES"),
                encode_command(b"ZRANGE", keys.leases.encode(), b"-inf", b"(%d" % now_ms, b"BYSCORE"),
                encode_command(b"ZCARD", keys.leases.encode()),
                encode_command(b"HGET", keys.warm.encode(), VERSION.encode())]

    def refresh(self, client: redis.Redis, keys: PoolKeys, now_ms: int,
                replies: list[Any] | None = None) -> dict[str, NodeFree | None]:
        """Read what changed; returns each node that may be other than at the last refresh: what is
        free on it now, None when it is not up or its lease ran out (draining ones as they are).
        ``replies``: those to ``refresh_commands(keys, now_ms)``, when the caller sent them."""
        changes, last, expired, count, warm_version = (
            replies if replies is not None else raw_pipeline(client, self.refresh_commands(keys, now_ms)))
        if warm_version != self._warm_version:
            self._warm_version, self.warm = read_warm(client, keys)
        newest = _newest(last)
        if newest < self.seen:  # the sequence went back: Redis lost its data
            self._synced = False
        if not self._synced:
            self._resync(client, keys)
        else:
            self._update(client, keys, now_ms, {m.decode() for m in changes} | self._dirty)
        self.seen = max(self.seen, newest)
        if len(self.leased) != count and self._synced:
            self._synced = False  # a lease came or went without a marker: read everything next time
        gone = {m.decode() for m in expired}
        changed = self.changed | (gone ^ self.expired)  # leases that ran out, or were renewed in time
        self.expired = gone
        now = {i: None if i in gone else self.nodes.get(i) for i in changed}
        self.index.update(now, now)
        return now

    def _resync(self, client: redis.Redis, keys: PoolKeys) -> None:
        ids = {m.decode() for m in cast(list[bytes], client.zrange(keys.leases, 0, -1))}
        known = set(self.nodes)
        self.nodes, self.unreadable, self.leased, self._synced = {}, {}, set(), True
        self._update(client, keys, 0, ids, ids)
        self.changed = ids | known  # the nodes gone since are changes too

    def _update(self, client: redis.Redis, keys: PoolKeys, now_ms: int, stale: set[str],
                leased: set[str] | None = None) -> None:
        self._dirty.clear()
        self.changed = stale
        if not stale:
            return
        ids = sorted(stale)
        if leased is None:  # which of them hold a lease now, read with the nodes: one round trip
            scores, *replies = raw_pipeline(client, [
                encode_command(b"ZMSCORE", keys.leases.encode(), *(i.encode() for i in ids)),
                *node_commands(keys, ids, self.shapes)])
            leased = {i for i, score in zip(ids, scores, strict=True) if score is not None}
            held = [(i, reply) for i, reply in zip(ids, replies, strict=True) if i in leased]
            reading, replies = [i for i, _ in held], [reply for _, reply in held]
        else:
            reading = [i for i in ids if i in leased]
            replies = raw_pipeline(client, node_commands(keys, reading, self.shapes))
        before = len(self.leased)
        self.leased -= stale
        self.leased |= leased
        for node_id in stale - leased:  # reaped or forgotten: in no planner's view
            self.nodes.pop(node_id, None)
            self.unreadable.pop(node_id, None)
        self.node_reads += len(reading)
        self.nodes.update(nodes_free(client, keys, now_ms, reading, replies, self.shapes, self.unreadable))
        if len(self.leased) != before or leased != stale:
            self.order = sorted(self.leased)
            forget_gone(self.shapes, self.order)


def _newest(reply: list[Any]) -> int:
    """The score of a one-member WITHSCORES reply; 0 when empty."""
    pairs = with_scores(reply)
    return int(pairs[0][1]) if pairs else 0
