"""When finish.lua may pass an ended attempt's place straight to the head of the queue (setting
``handoff``, ``lua/_handoff.lua``), as the dispatcher tells it through ``P handoff``.

- ``auto`` (the default): while tasks are left waiting after the dispatcher's last cycle. The
  head of the queue then waits for capacity: no node had room for it when the dispatcher last
  planned, so the place an attempt asking the same request frees is the only place that fits
  it, and best fit would put it there too. The hand-off makes that placement in the finish,
  without a dispatcher cycle per task; when nothing waits, the dispatcher places every task
  (a freed place then need not be the best one). Capacity freed elsewhere in between (another
  node joining, an unlike task ending) wakes the dispatcher, which switches it off if nothing
  is left waiting: until that cycle a hand-off may still take the place it would have chosen
  second.
- ``always``: whenever the head asks what the ended attempt held, waiting or not. The layout
  stays as it is where best fit would move the next task to a fuller node.
- ``never``: the dispatcher makes every placement.

Only a dispatcher running the spine's scheduling (priority and submit order, best fit, the
lazy planner) turns it on: under another ordering the head of ``P pending`` is not the next
task. Several dispatchers on one pool each say what their last cycle saw; they agree but for a
cycle's race.
"""

from __future__ import annotations

import redis

from broker.store.keys import PoolKeys


class HandoffSwitch:
    def __init__(self, client: redis.Redis, keys: PoolKeys, mode: str) -> None:
        self.redis, self.keys, self.mode = client, keys, mode
        self._on: bool | None = None  # what this dispatcher last wrote (None: nothing yet)

    def publish(self, spine: bool) -> None:
        """At the dispatcher's first cycle, as it runs then (the simulator turns the lazy planner
        off for gangs after making it): ``always`` on, ``never`` off, ``auto`` off until a cycle
        leaves tasks waiting; off whatever the mode without the spine's lazy planner."""
        self._on = None
        self._set(spine and self.mode == "always")

    def after_cycle(self, waiting: bool) -> None:
        """The lazy pass (the spine's) is done: ``waiting`` when it left tasks in the queue."""
        if self.mode == "auto":
            self._set(waiting)

    def _set(self, on: bool) -> None:
        if on is not self._on:
            self.redis.set(self.keys.handoff, "1") if on else self.redis.delete(self.keys.handoff)
            self._on = on
