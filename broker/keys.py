"""The one place that names Redis keys.

Every key of a pool carries the pool's hash tag, so each script touches a single
slot and the layout already works on Redis Cluster. ``P`` below is
``gpb:{<pool>}:``.

| key                          | type   | members / fields                                                 | TTL  |
|------------------------------|--------|------------------------------------------------------------------|------|
| ``P nodes``                  | set    | node ids ever registered in the pool                             | none |
| ``P node:<id>``              | hash   | capacity (``cap_*``), free amounts (``free_*``, ``g<i>_milli``,  | none |
|                              |        | ``g<i>_mem``), ``label:<k>``, ``state`` up/down, ``incarnation`` |      |
| ``P node:<id>:tasks``        | set    | ids of tasks RESERVED or RUNNING on the node                     | none |
| ``P leases``                 | zset   | node id, scored by lease expiry (ms since epoch)                 | none |
| ``P q:<id>``                 | list   | the node's kombu queue (Celery queue name, priority bucket 0)    | none |
| ``P q:<id>:unacked[_index]`` | hash/z | the node's own kombu unacked bookkeeping (transport options)     | none |
| ``P task:<id>``              | hash   | one task: request, Celery message, state, reservation, outcome  | none |
| ``P pending``                | zset   | PENDING task ids, scored ``-priority * 2**32 + seq``             | none |
| ``P requests``               | hash   | task id -> compact request JSON, for PENDING tasks only          | none |
| ``P idempotency``            | hash   | idempotency key -> task id                                       | none |
| ``P seq``                    | string | submit counter (gives submit order)                              | none |
| ``P rejected``               | hash   | node id -> poison messages its worker dropped unread (counter)   | none |
| ``P mix``                    | hash   | GPU shape (``policy.mix_key``) -> tasks submitted of that shape  | none |
| ``P runtimes``               | hash   | ``n:``/``s:`` + ``<task name>|<shape>`` (or ``|`` alone): count  | none |
|                              |        | and total seconds of succeeded runs (learned runtime estimates)  |      |
| ``P changes``                | zset   | node id, scored by a pool-wide sequence of its last change of    | none |
|                              |        | free capacity, state or registration (dispatchers' node cache)   |      |
| ``P preempting``             | hash   | preemptor task id -> node whose victims it waits for             | none |
| ``P queueinfo``              | hash   | pending task id -> {position, reason, eta} from the last pass    | none |
| ``P scheduling``             | string | the SchedulingConfig JSON the dispatcher runs with               | none |
| ``P wake``                   | pubsub | channel the scripts publish on so dispatchers wake               |  -   |

Lua scripts that act on a dynamic set of tasks or nodes (reap, register) get
``P`` itself as ``KEYS[1]`` and append ``task:<id>`` / ``node:<id>`` /
``q:<id>`` to it; the suffixes are the ones below (``TASK``, ``NODE``, ``QUEUE``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")
NAME_RULE = "1-64 characters from letters, digits, '_', '.' and '-'"

TASK = "task:"
NODE = "node:"
QUEUE = "q:"

# A task's pending score packs priority above the submit sequence number; both
# must stay inside a double's 53-bit mantissa for ZRANGE to keep exact order.
SEQ_BITS = 32
MAX_PRIORITY = 1_000_000


@dataclass(frozen=True, slots=True)
class PoolKeys:
    """Key names of one pool. Build it once with the pool name and pass it down."""

    pool: str
    prefix: str = field(init=False)

    def __post_init__(self) -> None:
        if not NAME_PATTERN.match(self.pool):
            raise ValueError(f"pool: {self.pool!r} is not a valid pool name ({NAME_RULE})")
        # Built once: every key below starts with it, and the dispatcher builds thousands per cycle.
        object.__setattr__(self, "prefix", f"gpb:{{{self.pool}}}:")

    @property
    def nodes(self) -> str:
        return self.prefix + "nodes"

    @property
    def leases(self) -> str:
        return self.prefix + "leases"

    @property
    def pending(self) -> str:
        return self.prefix + "pending"

    @property
    def requests(self) -> str:
        return self.prefix + "requests"

    @property
    def idempotency(self) -> str:
        return self.prefix + "idempotency"

    @property
    def seq(self) -> str:
        return self.prefix + "seq"

    @property
    def rejected(self) -> str:
        """Counter per node of queue messages its worker refused without running them."""
        return self.prefix + "rejected"

    @property
    def wake(self) -> str:
        return self.prefix + "wake"

    @property
    def mix(self) -> str:
        return self.prefix + "mix"

    @property
    def runtimes(self) -> str:
        return self.prefix + "runtimes"

    @property
    def changes(self) -> str:
        return self.prefix + "changes"

    @property
    def preempting(self) -> str:
        return self.prefix + "preempting"

    @property
    def queueinfo(self) -> str:
        return self.prefix + "queueinfo"

    @property
    def scheduling(self) -> str:
        return self.prefix + "scheduling"

    def node(self, node_id: str) -> str:
        return self.prefix + NODE + node_id

    def node_tasks(self, node_id: str) -> str:
        return self.prefix + NODE + node_id + ":tasks"

    def queue(self, node_id: str) -> str:
        """The node's Celery queue name, which kombu also uses as its list key."""
        return self.prefix + QUEUE + node_id

    def unacked(self, node_id: str) -> str:
        return self.queue(node_id) + ":unacked"

    def unacked_index(self, node_id: str) -> str:
        return self.queue(node_id) + ":unacked_index"

    def unacked_mutex(self, node_id: str) -> str:
        return self.queue(node_id) + ":unacked_mutex"

    def task(self, task_id: str) -> str:
        return self.prefix + TASK + task_id
