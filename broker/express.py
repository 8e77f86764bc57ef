"""Express placement (setting ``express``): on an idle cluster the dispatcher places a submitted
task from its wake-up alone, one reserve.lua round trip after waking, instead of a whole cycle
(issue 14: react to a submit within a millisecond; a cycle's upkeep and snapshot round trips
took 2 ms from submit to reservation).

submit.lua publishes ``submit\\n<stored request>\\n<task id>`` for a task it put in the queue
(``submit`` alone for one that waits for its start time). The dispatcher may place such tasks
at once when its last cycle left nothing waiting, and every wake-up it finds on waking is one
of them. Then the tasks they name are the whole queue, and the spine's lazy planner, given them
in queue order (priority, then submit order) over the free capacity and warm processes that
cycle ended with, proposes exactly what its next cycle would (best fit, warm affinity). Python
proposes, Lua commits: reserve.lua re-checks every placement, so a place taken meanwhile only
leaves its task queued for the cycle that follows in any case.

Anything else among the wake-ups (an attempt ended, a node joined or drained, a cancel, a
requeue) may have changed the queue or the capacity in a way the dispatcher has not read: then
its cycle decides, as without express. So does a gang or an elastic task (the full planner's),
a task whose name's rate limit had no start left after the last cycle, and a dispatcher that
does not run the spine's scheduling.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis

from broker.scheduling.model import TaskRequest
from broker.scheduling.ordering import queue_order
from broker.store import records

#: Request texts decoded and kept (most pools see a few shapes; a new one costs one decode).
KEPT = 256


class Express:
    def __init__(self, on: bool) -> None:
        self.on = on
        self.ready = False  # the last cycle left nothing waiting, and the free view includes its placements
        self._wires: dict[bytes, records.Wire | None] = {}  # request text -> decoded (None: not for express)
        self.tokens: dict[str, float] = {}  # rate-limited name -> starts left after the last cycle that read them

    def tasks(self, woken: Sequence[bytes]) -> list[TaskRequest]:
        """What to place now, in queue order: the tasks ``woken`` (the wake-ups' payloads, in the
        order they came) name, when all of them are express submits and the cluster was idle;
        else none. Taken once: the next chance is after the next cycle."""
        ready, self.ready = self.ready, False
        if not (ready and self.on and woken):
            return []
        named: records.Pending = []
        for seq, payload in enumerate(woken):
            kind, _, rest = payload.partition(b"\n")
            text, _, task_id = rest.partition(b"\n")
            wire = self._wire(text) if kind == b"submit" and task_id else None
            if wire is None:
                return []
            named.append((task_id.decode(errors="replace"), seq, wire))
        return queue_order(records.task_requests(named))

    def _wire(self, text: bytes) -> records.Wire | None:
        if text in self._wires:
            return self._wires[text]
        try:
            wire: records.Wire | None = records.decode_request(text)
        except records.UnreadableRecord:
            wire = None  # the cycle reads it from the queue and quarantines it
        if wire is not None and ("k" in wire or wire.get("mg")):
            wire = None  # a gang or an elastic task: the full planner's
        if len(self._wires) >= KEPT:
            self._wires.clear()
        self._wires[text] = wire
        return wire


def drain(pubsub: redis.client.PubSub, wait: float = 0.0) -> list[bytes]:
    """The payloads of the wake-ups on the dispatcher's subscription, in order: those buffered,
    after waiting up to ``wait`` seconds for the first."""
    woken: list[bytes] = []
    while (message := pubsub.get_message(timeout=0.0 if woken else wait)) is not None:
        woken.append(message["data"])
    return woken
