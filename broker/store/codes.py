"""Return codes of the Lua transition scripts, one IntEnum per script, mirroring the ``Returns:``
block of its header, and each script's signature (``tests/store/test_lua_headers.py`` checks that
they agree). Re-exported by ``broker.store.scripts``, where the wrappers that return them live."""

from __future__ import annotations

import enum


class RegisterCode(enum.IntEnum):
    CREATED = 0
    REFRESHED = 1
    REPLACED = 2
    SHAPE_CHANGED = 3


class HeartbeatCode(enum.IntEnum):
    OK = 0
    NOT_REGISTERED = 1
    FENCED = 2
    REAPED = 3


class SubmitCode(enum.IntEnum):
    CREATED = 0
    DUPLICATE = 1
    ID_TAKEN = 2
    BAD_REQUEST = 3


class ReserveCode(enum.IntEnum):
    OK = 0
    NOT_PENDING = 1
    NODE_DOWN = 2
    LABEL_MISMATCH = 3
    NO_CAPACITY = 4
    BAD_PLACEMENT = 5
    NOT_SERVED = 6
    RATE_LIMITED = 7


class StartCode(enum.IntEnum):
    OK = 0
    NOT_FOUND = 1
    CANCELLED = 2
    STALE = 3
    ALREADY_RUNNING = 4
    FENCED = 5


class FinishCode(enum.IntEnum):
    OK = 0
    NOT_FOUND = 1
    STALE = 2
    BAD_OUTCOME = 3


class CancelCode(enum.IntEnum):
    CANCELLED = 0
    NOT_FOUND = 1
    ALREADY_FINAL = 2
    MOVED = 3
    STOPPING = 4
    REVOKED = 5
    REQUESTED = 6


class PromoteCode(enum.IntEnum):
    OK = 0


class ExpireCode(enum.IntEnum):
    OK = 0


class HeadCode(enum.IntEnum):
    OK = 0


class ProgressCode(enum.IntEnum):
    OK = 0
    NOT_FOUND = 1
    STALE = 2


class LogCode(enum.IntEnum):
    OK = 0
    NOT_FOUND = 1
    STALE = 2


class ReapCode(enum.IntEnum):
    OK = 0


class RedeliverCode(enum.IntEnum):
    OK = 0


class DrainCode(enum.IntEnum):
    OK = 0
    NOT_FOUND = 1
    FENCED = 2


class ForgetCode(enum.IntEnum):
    REMOVED = 0
    NOT_FOUND = 1
    UP = 2
    FENCED = 3


class QuarantineCode(enum.IntEnum):
    FAILED = 0
    DEAD_LETTERED = 1
    NOT_PENDING = 2


class PreemptCode(enum.IntEnum):
    REQUEUED = 0
    STOPPING = 1
    NOT_FOUND = 2
    NOT_HELD = 3
    ALREADY = 4


class GangReserveCode(enum.IntEnum):
    """reserve_gang.lua: ReserveCode's meanings for a whole gang (no rate limit: a gang is one start)."""

    OK = 0
    NOT_PENDING = 1
    NODE_DOWN = 2
    LABEL_MISMATCH = 3
    NO_CAPACITY = 4
    BAD_PLACEMENT = 5
    NOT_SERVED = 6


class SettleCode(enum.IntEnum):
    """settle_gang.lua: what one fate did for a reserved gang this cycle."""

    RUNNING = 0
    STOPPING = 1
    REQUEUED = 2
    FAILED = 3
    SUCCEEDED = 4
    NOT_LIVE = 5


#: script name -> (its return-code enum, the KEYS it takes in order, the ARGV it takes in order).
#: The names must match the script headers; a batch script lists its fixed prefix only.
SIGNATURES: dict[str, tuple[type[enum.IntEnum], tuple[str, ...], tuple[str, ...]]] = {
    "register": (
        RegisterCode,
        ("prefix", "node", "nodes", "leases", "pending", "requests", "wake", "changes", "tasks"),
        ("node_id", "incarnation", "now", "lease_ms", "gpus", "gpu_mem", "cpu_m", "mem", "slots", "labels", "serves"),
    ),
    "heartbeat": (HeartbeatCode, ("node", "leases"), ("node_id", "incarnation", "now", "lease_ms")),
    "submit": (
        SubmitCode,
        ("task", "pending", "requests", "idempotency", "seq", "wake", "mix", "delayed", "expiring"),
        ("task_id", "idempotency_key", "priority", "now", "request", "message", "name", "tenant", "max_retries",
         "gpu_kind", "not_before", "expires_at", "result_ttl", "event_channel", "event"),
    ),
    "reserve": (ReserveCode, ("pending", "requests", "leases", "changes", "tasks", "ratelimit"), ("now",)),
    "start": (StartCode, ("task", "node"), ("node_id", "tag", "now", "pid", "incarnation", "log_file")),
    "finish": (
        FinishCode,
        ("task", "node", "node_tasks", "pending", "requests", "wake", "runtimes", "changes", "prefix"),
        ("task_id", "node_id", "tag", "outcome", "payload", "now", "detail", "not_before", "incarnation"),
    ),
    "cancel": (
        CancelCode,
        ("task", "node", "node_tasks", "pending", "requests", "wake", "changes", "prefix"),
        ("task_id", "node_id", "now", "mode", "grace_ms", "ask"),
    ),
    "reap": (ReapCode, ("prefix", "leases", "pending", "requests", "wake", "changes"), ("now", "limit")),
    "redeliver": (RedeliverCode, ("prefix", "node_tasks", "queue", "unacked"), ("node_id", "confirm")),
    "drain": (DrainCode, ("prefix", "node", "node_tasks", "pending", "requests", "wake", "changes"),
              ("node_id", "now", "by", "incarnation")),
    "forget": (ForgetCode, ("prefix", "node", "nodes", "leases", "pending", "requests", "wake", "changes"),
               ("node_id", "now", "incarnation")),
    "preempt": (
        PreemptCode,
        ("task", "node", "node_tasks", "pending", "requests", "preempting", "wake", "changes"),
        ("task_id", "node_id", "preemptor", "grace_ms", "now"),
    ),
    "promote": (PromoteCode, ("prefix", "delayed", "pending", "requests", "wake"), ("now", "limit")),
    "expire": (ExpireCode, ("prefix", "expiring", "pending", "requests", "wake", "changes"), ("now", "limit")),
    "head": (HeadCode, ("pending", "requests"), ("first",)),
    "progress": (ProgressCode, ("task",), ("tag", "state", "meta", "now", "checkpoint")),
    "log": (LogCode, ("task",), ("tag", "attempt", "tail", "size", "file")),
    "quarantine": (QuarantineCode, ("task", "pending", "requests", "deadletter", "prefix"),
                   ("task_id", "request", "reason", "now")),
    # Gangs (issue 13); their wrappers are in broker.store.gangs.
    "submit_gang": (SubmitCode, ("task", "pending", "requests", "idempotency", "seq", "wake", "mix"),
                    ("task_id", "idempotency_key", "priority", "now", "request", "member_request", "name", "tenant",
                     "max_retries", "gpu_kind", "result_ttl")),
    "reserve_gang": (GangReserveCode, ("pending", "requests", "leases", "changes", "tasks", "gang", "gangs"),
                     ("now", "gang_id")),
    "settle_gang": (SettleCode, ("gang", "gangs", "pending", "requests", "wake", "prefix"),
                    ("gang_id", "now", "grace_ms")),
}
