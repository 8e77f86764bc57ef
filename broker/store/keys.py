"""The one place that names Redis keys.

Every key of a pool carries the pool's hash tag, so each script touches a single
slot and the layout already works on Redis Cluster. ``P`` below is
``gpb:{<pool>}:``.

| key                          | type   | members / fields                           | TTL                   |
|------------------------------|--------|--------------------------------------------|-----------------------|
| ``P nodes``                  | set    | node ids registered in the pool, until     | none                  |
|                              |        | forget.lua removes one (it left, or was    |                       |
|                              |        | down for ``node_forget_after_s``)          |                       |
| ``P node:<id>``              | hash   | capacity (``cap_*``), free amounts         | none                  |
|                              |        | (``free_*``, ``g<i>_milli``,               |                       |
|                              |        | ``g<i>_mem``), ``label:<k>``, ``state``    |                       |
|                              |        | up/down, ``draining``, ``incarnation``,    |                       |
|                              |        | ``serves`` and                             |                       |
|                              |        | ``task:<name>`` (the task names it runs)   |                       |
| ``P node:<id>:tasks``        | set    | ids of tasks RESERVED or RUNNING on the    | none                  |
|                              |        | node                                       |                       |
| ``P leases``                 | zset   | node id, scored by lease expiry (ms since  | none                  |
|                              |        | epoch)                                     |                       |
| ``P q:<id>``                 | list   | the node's kombu queue (Celery queue name, | none                  |
|                              |        | priority bucket 0)                         |                       |
| ``P q:<id>:unacked[_index]`` | hash/z | the node's own kombu unacked bookkeeping   | none                  |
|                              |        | (transport options)                        |                       |
| ``P task:<id>``              | hash   | one task: request, Celery message, state,  | result_ttl once final |
|                              |        | reservation, outcome                       |                       |
| ``P pending``                | zset   | PENDING task ids ready to place, scored    | none                  |
|                              |        | ``-priority * 2**32 + seq``                |                       |
| ``P requests``               | hash   | task id -> compact request JSON, for tasks | none                  |
|                              |        | in ``pending`` only                        |                       |
| ``P delayed``                | zset   | PENDING task ids not to start before their | none                  |
|                              |        | score (ms): countdown, ETA, a retry's      |                       |
|                              |        | wait; promote.lua moves them to            |                       |
|                              |        | ``pending``                                |                       |
| ``P expiring``               | zset   | ids of tasks submitted with ``expires``,   | none                  |
|                              |        | scored by it (ms), and of reserved tasks a |                       |
|                              |        | producer asked to cancel (``cancel_req``), |                       |
|                              |        | scored by the request: expire.lua ends     |                       |
|                              |        | both                                       |                       |
| ``P idem:<key>``             | string | the task id an idempotency key stands for  | its task's            |
| ``P tasks``                  | hash   | task name -> what workers registered of it | none                  |
|                              |        | (records: the catalogue)                   |                       |
| ``P ratelimit``              | hash   | task name -> its token bucket              | none                  |
|                              |        | ``tokens,last_ms`` (rate limits)           |                       |
| ``P celery:<key>``           | any    | the result backend's own keys: group       | result                |
|                              |        | results, chord counters, outcomes of ids   |                       |
|                              |        | the broker never held                      |                       |
| ``P seq``                    | string | submit counter (gives submit order)        | none                  |
| ``P rejected``               | hash   | node id -> poison messages its worker      | none                  |
|                              |        | dropped unread (counter)                   |                       |
| ``P outcomes``               | hash   | ``<outcome>|<tenant>`` -> tasks ended or   | none                  |
|                              |        | sent back so (succeeded failed cancelled   |                       |
|                              |        | preempted requeued); ``wait:<i>|``/``run:``|                       |
|                              |        | ``<i>|<tenant>`` -> histogram bucket i     |                       |
|                              |        | counts, ``wait_sum|``/``run_sum|<tenant>`` |                       |
|                              |        | seconds (metrics; _release.lua ``tally``)  |                       |
| ``P finished``               | zset   | ids of tasks that reached a final state,   | none; the dispatcher  |
|                              |        | scored by finished_at (ms): the history    | trims ids whose task  |
|                              |        | index (_release.lua ``conclude``)          | record expired        |
| ``P cycle``                  | string | ms since epoch of a dispatcher's last      | none                  |
|                              |        | cycle, written at most once a second       |                       |
|                              |        | (``gpubroker health dispatcher``)          |                       |
| ``P deadletter``             | hash   | task id -> JSON {reason, at, request,      | none                  |
|                              |        | found}: a pending entry whose request was  |                       |
|                              |        | unreadable and whose task hash could not   |                       |
|                              |        | be ended FAILED (quarantine.lua)           |                       |
| ``P mix``                    | hash   | GPU kind (records) -> tasks submitted of   | none                  |
|                              |        | that kind                                  |                       |
| ``P runtimes``               | hash   | ``n:``/``s:`` + ``<task name>|<GPU kind>`` | none                  |
|                              |        | (or ``|`` alone): count and total seconds  |                       |
|                              |        | of succeeded runs (learned runtime         |                       |
|                              |        | estimates)                                 |                       |
| ``P changes``                | zset   | node id, scored by a pool-wide sequence of | none                  |
|                              |        | its last change of free capacity, state or |                       |
|                              |        | registration (dispatchers' node cache)     |                       |
| ``P preempting``             | hash   | preemptor task id -> node whose victims it | none                  |
|                              |        | waits for (victims on several: "n1,n2",    |                       |
|                              |        | its own node last)                         |                       |
| ``P gangs``                  | set    | ids of reserved gangs (issue 13), for      | none                  |
|                              |        | settle_gang.lua's one fate each cycle      |                       |
| ``P warm``                   | hash   | node id -> JSON ``[[gpus, task name],..]``:| none; forget removes  |
|                              |        | its pool processes warm for GPU sets       | a node's field        |
|                              |        | (reuse=True) and the name each ran last;   |                       |
|                              |        | ``#v`` -> version, bumped on each change   |                       |
|                              |        | (store/warm_map.py; the dispatcher re-reads|                       |
|                              |        | the hash when it moves)                    |                       |
| ``P warmstarts``             | hash   | node id -> ``hits,misses``: reuse=True GPU | none; forget removes  |
|                              |        | tasks its worker started in a process warm | a node's field        |
|                              |        | for their name and GPUs, or not            |                       |
| ``P queueinfo``              | hash   | pending task id -> {position, reason, eta} | none                  |
|                              |        | from the last pass                         |                       |
| ``P scheduling``             | string | the SchedulingConfig JSON the dispatcher   | none                  |
|                              |        | runs with                                  |                       |
| ``P handoff``                | string | "1" while finish.lua may pass an ended     | none                  |
|                              |        | attempt's place to the head of the queue   |                       |
|                              |        | (set by the dispatcher: broker.handoff)    |                       |
| ``P wake``                   | pubsub | channel the scripts publish on so          | -                     |
|                              |        | dispatchers wake                           |                       |

Lua scripts that act on a dynamic set of tasks or nodes (reap, register) get
``P`` itself as ``KEYS[1]`` and append ``task:<id>`` / ``node:<id>`` /
``q:<id>`` to it; the suffixes are the ones below (``TASK``, ``NODE``, ``QUEUE``).

Fields of ``P task:<id>`` (formats in ``store/records.py``):

| field                                   | written by       | meaning                                       |
|-----------------------------------------|------------------|-----------------------------------------------|
| ``id name tenant priority``             | submit           | as submitted                                  |
| ``req``                                 | submit           | the request JSON (records: the request)       |
| ``message``                             | submit, finish   | the Celery message Celery built, minus        |
|                                         |                  | routing and tag (a retry's replaces it)       |
| ``gpu_kind``                            | submit           | its GPU kind (records), for the mix and       |
|                                         |                  | learned runtimes                              |
| ``seq score``                           | submit           | submit sequence; pending score ``-priority *  |
|                                         |                  | 2**32 + seq``                                 |
| ``submitted_at``                        | submit           | ms since epoch                                |
| ``max_retries retries``                 | submit, recover  | lost attempts allowed / charged so far        |
| ``not_before``                          | submit, finish   | ms: not placed before then (countdown, ETA, a |
|                                         |                  | retry's wait)                                 |
| ``expires_at``                          | submit           | ms: cancelled if it has not started by then   |
| ``idempotency_key result_ttl``          | submit           | what a final transition expires, and after    |
|                                         |                  | how long (ms; 0: kept)                        |
| ``attempts``                            | submit, reserve  | reservations so far; the delivery tag is      |
|                                         |                  | ``<id>.<attempts>``                           |
| ``state``                               | every transition | a ``TaskState``                               |
| ``node gpus tag alloc``                 | reserve          | the reservation (``alloc``: records); gone    |
|                                         |                  | when it ends                                  |
| ``reserved_at started_at``              | reserve, start   | ms since epoch, of the current attempt        |
| ``progress_state progress``             | progress         | what the running attempt said of itself       |
|                                         |                  | (``update_state``)                            |
| ``log:<n> log_size:<n> log_file:<n>``   | log              | attempt n's last output (at most              |
|                                         |                  | ``task_log_tail_bytes``), the bytes it wrote  |
|                                         |                  | in all, ``<node>:<path>`` of its whole log    |
| ``retried retry_reason``                | finish           | it asked Celery to retry and waits to run     |
|                                         |                  | again                                         |
| ``awaiting replaced_by``                | finish, submit   | it replaced itself (``Task.replace``) and     |
|                                         |                  | waits, in no queue, for the message sent      |
|                                         |                  | under its id                                  |
| ``finished_at result error``            | finish, cancel,  | the outcome (quarantine: why its request      |
|                                         | quarantine       | could not be read)                            |
| ``exc``                                 | finish           | a failure's exception as JSON: type, module,  |
|                                         |                  | message, traceback                            |
| ``preempt_at preempt_by preempt_grace`` | preempt          | a running victim is being stopped             |
| ``cancel_at cancel_grace``              | cancel           | a running task is being stopped for a cancel  |
| ``cancel_req``                          | cancel           | a producer (no node access) asked to cancel   |
|                                         |                  | it, mode cancel/revoke: expire.lua does it    |
| ``revoked``                             | cancel           | this attempt may finish; the task runs no     |
|                                         |                  | more                                          |
| ``preemptions requeued_at``             | preempt, finish  | times stopped for a more urgent task; last    |
|                                         |                  | requeue                                       |

Fields of ``P node:<id>``: ``id``, ``incarnation``, ``registered_at``, ``heartbeat_at``, ``state``
(up/down), ``down_at`` (ms, set by reap.lua), ``draining`` (who drained it: ``operator`` or ``shutdown``;
absent when it takes tasks) and ``draining_at`` (drain.lua), capacity
``cap_gpus gpu_mem cap_cpu_m cap_mem cap_slots``, free amounts
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

    def idempotency(self, key: str) -> str:
        return self.prefix + "idem:" + key

    @property
    def delayed(self) -> str:
        return self.prefix + "delayed"

    @property
    def expiring(self) -> str:
        return self.prefix + "expiring"

    @property
    def tasks(self) -> str:
        """The pool's task catalogue: what workers registered of each task name."""
        return self.prefix + "tasks"

    @property
    def ratelimit(self) -> str:
        return self.prefix + "ratelimit"

    def celery(self, key: str) -> str:
        """A key of the Celery result backend's own (group results, chord counters)."""
        return self.prefix + "celery:" + key

    @property
    def seq(self) -> str:
        return self.prefix + "seq"

    @property
    def rejected(self) -> str:
        """Counter per node of queue messages its worker refused without running them."""
        return self.prefix + "rejected"

    @property
    def outcomes(self) -> str:
        """Per-tenant outcome counters and wait/run histograms the scripts keep for the metrics."""
        return self.prefix + "outcomes"

    @property
    def finished(self) -> str:
        """The history index: final task ids scored by finished_at (ms)."""
        return self.prefix + "finished"

    @property
    def cycle(self) -> str:
        """When a dispatcher last cycled (ms), for its health check."""
        return self.prefix + "cycle"

    @property
    def deadletter(self) -> str:
        """Pending entries quarantine.lua dropped without a task hash it could end FAILED."""
        return self.prefix + "deadletter"

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
    def gangs(self) -> str:
        return self.prefix + "gangs"

    @property
    def preempting(self) -> str:
        return self.prefix + "preempting"

    @property
    def warm(self) -> str:
        """Node id -> its warm GPU sets and the task name each last ran (store/warm_map.py)."""
        return self.prefix + "warm"

    @property
    def warmstarts(self) -> str:
        return self.prefix + "warmstarts"

    @property
    def queueinfo(self) -> str:
        return self.prefix + "queueinfo"

    @property
    def scheduling(self) -> str:
        return self.prefix + "scheduling"

    @property
    def handoff(self) -> str:
        return self.prefix + "handoff"

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
