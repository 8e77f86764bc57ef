"""One exception hierarchy for everything gpubroker raises on purpose."""

from __future__ import annotations


class GpuBrokerError(Exception):
    """Base class: every error gpubroker raises deliberately derives from it."""


class InvalidRequest(GpuBrokerError, ValueError):
    """Input was refused before anything was written. ``problems`` maps field -> reason."""

    def __init__(self, problems: dict[str, str]) -> None:
        self.problems = dict(problems)
        text = "; ".join(f"{field}: {reason}" for field, reason in self.problems.items())
        super().__init__(f"invalid request: {text}")

    @property
    def fields(self) -> list[str]:
        return list(self.problems)


class Unsatisfiable(InvalidRequest):
    """No registered node could ever run the request, whatever else finishes."""


class NotRegistered(InvalidRequest):
    """No registered node runs this task name (Celery's NotRegistered, at submit instead of on a node)."""

    def __init__(self, task_name: str) -> None:
        super().__init__({"task_name": f"no registered node runs task {task_name!r}: check the name, or start a "
                                       "worker with its module (gpubroker worker --tasks MODULE)"})
        self.task_name = task_name


class TaskNotFound(GpuBrokerError, KeyError):
    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        super().__init__(f"no task with id {task_id!r} in this pool")

    def __str__(self) -> str:
        return str(self.args[0])


class NodeRejected(GpuBrokerError):
    """A node registration or heartbeat, or an operation on a node, was refused by the pool's state."""


class NodeNotFound(GpuBrokerError, KeyError):
    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        super().__init__(f"no node {node_id!r} in this pool (gpubroker nodes lists them)")

    def __str__(self) -> str:
        return str(self.args[0])


class BrokerUnavailable(GpuBrokerError, ConnectionError):
    """Redis could not be reached; the failed call changed nothing unless the connection dropped
    after Redis received it (every call is safe to retry)."""


class RedisOutOfMemory(BrokerUnavailable):
    """Redis reached ``maxmemory`` (policy ``noeviction``) and refused a write; nothing was written.
    It passes once memory is freed: retry later, or raise ``maxmemory``."""


class ReplicasNotConfirmed(BrokerUnavailable):
    """A write reached the Redis master, but fewer replicas than ``min_replicas_ack`` confirmed it in
    time: a failover now could lose it. Retrying is safe (scripts are fenced, submits idempotent by key)."""


class AuthenticationFailed(BrokerUnavailable):
    """Redis refused the user or password in the Redis URL; nothing was changed."""


class AccessDenied(GpuBrokerError, PermissionError):
    """The Redis user in the URL lacks an ACL permission this call needs (NOPERM)."""


class ConfigError(GpuBrokerError, ValueError):
    """A setting or option of this process is wrong (``GPUBROKER_*``, a command-line option); nothing
    was started. ``problems`` maps field -> reason."""

    def __init__(self, problems: dict[str, str]) -> None:
        self.problems = dict(problems)
        super().__init__("invalid configuration: " + "; ".join(f"{k}: {v}" for k, v in self.problems.items()))


class WaitTimeout(GpuBrokerError, TimeoutError):
    def __init__(self, task_id: str, timeout: float, state: str) -> None:
        super().__init__(f"task {task_id} still {state} after waiting {timeout:g}s")
        self.task_id = task_id
        self.state = state
