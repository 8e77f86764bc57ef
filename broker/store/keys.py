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
| ``P mix``                    | hash   | GPU kind (records) -> tasks submitted of that kind               | none |
| ``P runtimes``               | hash   | ``n:``/``s:`` + ``<task name>|<GPU kind>`` (or ``|`` alone): count | none |
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

Fields of ``P task:<id>`` (formats in ``store/records.py``):

| field                        | written by        | meaning                                               |
|------------------------------|-------------------|-------------------------------------------------------|
| ``id name tenant priority``  | submit            | as submitted                                          |
| ``req``                      | submit            | the request JSON (records: the request)               |
| ``message``                  | submit            | the Celery message Celery built, minus routing and tag |
| ``gpu_kind``                 | submit            | its GPU kind (records), for the mix and runtimes      |
| ``seq score``                | submit            | submit sequence; pending score ``-priority*2**32+seq`` |
| ``submitted_at``             | submit            | ms since epoch                                        |
| ``max_retries retries``      | submit, recover   | lost attempts allowed / charged so far                |
| ``attempts``                 | submit, reserve   | reservations so far; the delivery tag is ``<id>.<attempts>`` |
| ``state``                    | every transition  | a ``TaskState``                                       |
| ``node gpus tag alloc``      | reserve           | the reservation (``alloc``: records); gone when it ends |
| ``reserved_at started_at``   | reserve, start    | ms since epoch, of the current attempt                |
| ``finished_at result error`` | finish, cancel    | the outcome                                           |
| ``preempt_at preempt_by preempt_grace`` | preempt | a running victim is being stopped                    |
| ``preemptions requeued_at``  | preempt, finish   | times stopped for a more urgent task; last requeue    |

Fields of ``P node:<id>``: ``id``, ``incarnation``, ``registered_at``, ``heartbeat_at``, ``state``
(up/down), capacity ``cap_gpus gpu_mem cap_cpu_m cap_mem cap_slots``, free amounts
``free_cpu_m free_mem free_slots`` and per GPU ``g<i>_milli g<i>_mem``, labels ``label:<key>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from broker.models import NAME_PATTERN, NAME_RULE

TASK = "task:"
NODE = "node:"
QUEUE = "q:"

# A task's pending score packs priority (models.MAX_PRIORITY) above the submit sequence number;
# both must stay inside a double's 53-bit mantissa for ZRANGE to keep exact order.
SEQ_BITS = 32


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
