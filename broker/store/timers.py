"""The dispatcher's per-cycle upkeep in one round trip: reap.lua (nodes whose lease ran out),
promote.lua (delayed tasks whose time came), expire.lua (tasks past their expiry) and the ids of
the reserved gangs (``gangs.settle_all``).

Sent one by one they were four round trips in every cycle, a cycle per task on a busy small
node; none of them reads what another writes before it runs (each script re-reads its own
keys), so they go out together, in the same order as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from broker.store.codes import SIGNATURES
from broker.store.connection import encode_command, raw_pipeline
from broker.store.scripts import Scripts, as_text, script_source

SCRIPTS = (("reap", 100), ("promote", 1000), ("expire", 1000))  # (script, most it handles per cycle)


@dataclass
class Upkeep:
    reaped: list[str] = field(default_factory=list)  # nodes whose lease ran out
    promoted: int = 0  # delayed tasks moved to the queue
    expired: list[str] = field(default_factory=list)  # tasks cancelled past their expiry
    gangs: list[str] = field(default_factory=list)  # reserved gangs (each settled by settle_gang.lua)
    after: list[Any] = field(default_factory=list)  # the replies to the caller's ``after`` commands


def evalsha(scripts: Scripts, name: str, *args: int) -> bytes:
    """EVALSHA of script ``name`` on the pool's keys its signature names, with ``args``, encoded
    for a caller that sends it with other commands (``raw_pipeline``)."""
    names = SIGNATURES[name][1]
    return encode_command(b"EVALSHA", scripts.sha(name).encode(), b"%d" % len(names),
                          *(getattr(scripts.keys, key).encode() for key in names), *(b"%d" % a for a in args))


def upkeep(scripts: Scripts, after: Sequence[bytes] = ()) -> Upkeep:
    """Run the three scripts and read the gang ids, then the caller's encoded ``after`` commands
    (which see what the scripts did), in one round trip."""
    keys, now = scripts.keys, scripts.clock()
    commands = [evalsha(scripts, name, now, limit) for name, limit in SCRIPTS]
    commands += [encode_command(b"SMEMBERS", keys.gangs.encode()), *after]
    try:
        reap, promote, expire, gangs, *rest = raw_pipeline(scripts.redis, commands)
    except redis.exceptions.NoScriptError:
        # A restarted or failed-over Redis without them (or a script in ``after``): load them
        # all and send again. What the first send ran is done (each is safe to run again: it
        # finds nothing more due).
        for name in SIGNATURES:
            scripts.redis.script_load(script_source(name))
        reap, promote, expire, gangs, *rest = raw_pipeline(scripts.redis, commands)
    return Upkeep([as_text(n) for n in reap[1:]], int(promote[1]), [as_text(i) for i in expire[1:]],
                  sorted(as_text(g) for g in gangs), rest)
