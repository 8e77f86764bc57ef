"""Publishing this node's warm processes for the dispatcher's warm affinity (issue 14).

The node agent calls ``publish`` every ``agent.STOP_CHECK_S`` (its heartbeat thread's look): it
reads the warm board (``workers.warm.Board``: shared memory, no Redis) and writes ``P warm`` /
``P warmstarts`` (``broker.store.warm_map``) only when what it would write changed. A process
that exited, or was told to exit because its GPUs were reserved for another task, leaves the map
at the next look. A pool process that becomes warm for a set or name it was not warm for
publishes at once (``publish_now``, before its task's body runs), so that a request sent right
after this one finds it: one transaction per miss, none per hit. The map is advice, never a
reservation: late or lost, it costs a cold start, never correctness.
"""

from __future__ import annotations

import logging

import redis

from broker.store import warm_map
from broker.store.keys import PoolKeys
from workers import context, warm

log = logging.getLogger(__name__)


class WarmPublisher:
    def __init__(self, client: redis.Redis, keys: PoolKeys, node_id: str, sets: bool = True) -> None:
        """``sets=False`` (setting ``warm_affinity``): publish the counts only, no warm set."""
        self.client, self.keys, self.node_id, self.sets = client, keys, node_id, sets
        self._sets: list[tuple[str, str]] | None = None  # as last published; None: publish them
        self._starts: tuple[int, int] | None = None

    def publish(self, force: bool = False) -> bool:
        """Write what changed since the last call (``force``: write it all, as after registering);
        whether anything was written."""
        board = warm.board()
        sets, starts = board.warm_sets() if self.sets else [], board.starts()
        new_sets = sets if force or sets != self._sets else None
        new_starts = starts if force or starts != self._starts else None
        if new_sets is None and new_starts is None:
            return False
        warm_map.publish(self.client, self.keys, self.node_id, new_sets, new_starts)
        self._sets, self._starts = sets, starts
        return True


def publish_now() -> None:
    """From a pool process whose warm entry just changed: the node's whole map, as the board has it."""
    scripts = context.scripts()
    try:
        WarmPublisher(scripts.redis, scripts.keys, context.node_id(), context.settings().warm_affinity).publish(True)
    except redis.RedisError as exc:  # the agent publishes it at its next look
        log.debug("warm map not published now: %s", exc)
