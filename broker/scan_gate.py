"""When the dispatcher may skip reading the pending window: a cycle that placed nothing need
not be repeated until capacity or the queue changed (issue 14: with 200,000 pending and a full
cluster, every cycle spent 53-79 ms scanning the 10,000-task window to place nothing).

A blocked cycle's inputs are marked by a ``Mark``: the newest node change sequence (``P changes``,
which every script that frees, takes or adds capacity bumps in the same EVAL), the submit
counter (``P seq``) and the pending count (a task cancelled or quarantined out of a full window
lets one behind it in, unread). A task comes back to the pending queue only by a script that also frees
its capacity on a node (a requeue: finish, preempt, drain, reap, cancel) and so bumps the
change sequence, or by promote.lua / the Celery ingest (the cycle counts both). Capacity that
only shrinks (a lease running out) cannot make a task fit. The lazy planner depends on
nothing else but the rate limits' tokens, which refill with time: a cycle that a rate limit
held back is not counted as blocked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from broker.store import reads, timers
from broker.store.connection import encode_command, raw_pipeline
from broker.store.scripts import Scripts, script_source


@dataclass(frozen=True, slots=True)
class Mark:
    changes: int  # newest node change sequence seen
    submitted: int  # the submit counter
    pending: int  # tasks in the pending queue


@dataclass(frozen=True, slots=True)
class Head:
    """What the dispatcher reads with the mark, in the same round trip (used or not): the first
    ``first`` pending ids with their scores and stored requests (head.lua, for
    ``reads.PendingHead``), and when the next timer is due. Read before the cycle places
    anything, the timer may be one a placement ends: then the dispatcher wakes once for nothing,
    never late."""

    scored: list[tuple[bytes, float]]
    wires: list[bytes | None]
    timer: int | None


def mark_commands(scripts: Scripts, first: int) -> list[bytes]:
    """What ``mark_of`` reads: the submit counter, the pending count, the first ``first`` pending
    tasks (head.lua), the first timers. Sent after the cycle's upkeep scripts, in their round
    trip (``timers.upkeep``), or on their own (``read_mark``). Read before the node view, the mark
    is older than it: a change in between makes the next mark differ, never the same."""
    keys = scripts.keys
    return [encode_command(b"GET", keys.seq.encode()), encode_command(b"ZCARD", keys.pending.encode()),
            timers.evalsha(scripts, "head", max(1, first)),
            *reads.timer_commands(keys)]


def mark_of(replies: list[Any], changes: int) -> tuple[Mark, Head]:
    """The mark of a cycle whose node view saw change sequence ``changes``, and its ``Head``."""
    submitted, pending, head, *due = replies
    return Mark(changes, int(submitted or 0), int(pending)), Head(*reads.head_of(head), reads.next_timer(due))


def read_mark(scripts: Scripts, changes: int, first: int = 1) -> tuple[Mark, Head]:
    """``mark_of``, in a round trip of its own."""
    try:
        return mark_of(raw_pipeline(scripts.redis, mark_commands(scripts, first)), changes)
    except redis.exceptions.NoScriptError:  # a restarted Redis: load head.lua, read again
        scripts.redis.script_load(script_source("head"))
        return mark_of(raw_pipeline(scripts.redis, mark_commands(scripts, first)), changes)


class ScanGate:
    def __init__(self) -> None:
        self._blocked: Mark | None = None  # the inputs of the last cycle that placed nothing
        self.skipped = 0  # cycles that did not read the window (tests count them)

    def may_skip(self, mark: Mark, arrived: int) -> bool:
        """True when the last cycle placed nothing and nothing it depended on changed since;
        ``arrived``: tasks this cycle moved into the pending queue (promoted, ingested)."""
        if arrived or self._blocked != mark:
            self._blocked = None
            return False
        self.skipped += 1
        return True

    def after(self, mark: Mark, blocked: bool) -> None:
        """Record the cycle that read the window: ``blocked`` when it placed nothing, refused
        nothing and no rate limit held anything back."""
        self._blocked = mark if blocked else None
