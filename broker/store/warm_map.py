"""The warm map (issue 14, warm affinity): which pool process of which node is warm for which GPU
set, and the task name it ran last; and how many ``reuse=True`` GPU tasks started warm.

Workers publish it (``workers.affinity``: the node agent, from the warm board, only when it
changed); the dispatcher reads it (``store.free_view.FreeView``) and its placers prefer, for a task
of that name, the node and exact GPU set of such a process when that set is free
(``scheduling.placement.warm``). It is advice, never a reservation: a set that is no longer warm
when the task arrives costs a fresh process, as before; reserve.lua still checks capacity.

``P warm``: node id -> JSON ``[["<gpus>", "<task name>"], ...]`` (``<gpus>``: the indices as
reserved, "1" or "0,2"), and ``#v`` -> a version every change bumps, so that a dispatcher reads the
hash again only when it moved (node ids cannot contain ``#``: ``models.NAME_PATTERN``).
``P warmstarts``: node id -> ``<hits>,<misses>`` since its worker started.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import cast

import redis

from broker.scheduling.model import WarmMap
from broker.store.keys import PoolKeys

VERSION = "#v"
Entries = Sequence[tuple[str, str]]  # (GPU indices as reserved, task name last run)


def publish(client: redis.Redis, keys: PoolKeys, node_id: str, entries: Entries | None,
            starts: tuple[int, int] | None = None) -> None:
    """Set the node's warm entries (None: unchanged; empty: none) and its warm start counts
    (None: unchanged), in one transaction."""
    pipe = client.pipeline(transaction=True)
    if entries is not None:
        if entries:
            pipe.hset(keys.warm, node_id, json.dumps(sorted(entries), separators=(",", ":")))
        else:
            pipe.hdel(keys.warm, node_id)
        pipe.hincrby(keys.warm, VERSION, 1)
    if starts is not None:
        pipe.hset(keys.warmstarts, node_id, f"{starts[0]},{starts[1]}")
    pipe.execute()


def remove(client: redis.Redis, keys: PoolKeys, node_id: str) -> None:
    """The node left the pool (forget): nothing of it stays warm."""
    pipe = client.pipeline(transaction=True)
    pipe.hdel(keys.warm, node_id)
    pipe.hincrby(keys.warm, VERSION, 1)
    pipe.hdel(keys.warmstarts, node_id)
    pipe.execute()


def decode(raw: Mapping[bytes, bytes]) -> WarmMap:
    """``P warm`` as a WarmMap; an entry this version cannot read is left out (it is advice: a
    task is then placed as if nothing were warm there)."""
    out = WarmMap()
    for field, text in sorted(raw.items()):  # node id order: the placers try warm sets in it
        node_id = field.decode()
        if node_id == VERSION:
            continue
        try:
            entries = [(tuple(int(i) for i in str(gpus).split(",")), str(name)) for gpus, name in json.loads(text)]
        except (ValueError, TypeError):
            continue
        for gpus, name in entries:
            out.add(node_id, gpus, name)
    return out


def read_warm(client: redis.Redis, keys: PoolKeys) -> tuple[bytes | None, WarmMap]:
    """The version and the whole map, in one round trip."""
    pipe = client.pipeline(transaction=True)
    pipe.hget(keys.warm, VERSION)
    pipe.hgetall(keys.warm)
    version, raw = pipe.execute()
    return cast(bytes | None, version), decode(cast(dict[bytes, bytes], raw))


def decode_starts(raw: Mapping[bytes, bytes]) -> dict[str, tuple[int, int]]:
    """``P warmstarts`` as node id -> (hits, misses); unreadable entries left out."""
    out = {}
    for node_id, text in raw.items():
        hits, _, misses = text.decode().partition(",")
        if hits.isdigit() and misses.isdigit():
            out[node_id.decode()] = (int(hits), int(misses))
    return out


def read_starts(client: redis.Redis, keys: PoolKeys) -> dict[str, tuple[int, int]]:
    return decode_starts(cast(dict[bytes, bytes], client.hgetall(keys.warmstarts)))


def hit_rate(hits: int, misses: int) -> str:
    """How ``gpubroker nodes`` shows it: "3/4 (75%)", or "-" before any reuse=True GPU task."""
    total = hits + misses
    return f"{hits}/{total} ({100 * hits // total}%)" if total else "-"
