"""gpubroker: a GPU-aware task broker on Redis and Celery."""

from broker.client import Client, TaskHandle
from broker.errors import (
    BrokerUnavailable,
    GpuBrokerError,
    InvalidRequest,
    ReplicasNotConfirmed,
    TaskNotFound,
    Unsatisfiable,
    WaitTimeout,
)
from broker.models import NodeView, QueueEntry, Resources, TaskState, TaskStatus
from broker.settings import Settings

__all__ = [
    "BrokerUnavailable",
    "Client",
    "GpuBrokerError",
    "InvalidRequest",
    "NodeView",
    "QueueEntry",
    "ReplicasNotConfirmed",
    "Resources",
    "Settings",
    "TaskHandle",
    "TaskNotFound",
    "TaskState",
    "TaskStatus",
    "Unsatisfiable",
    "WaitTimeout",
]
