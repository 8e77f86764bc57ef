"""Who this worker process is: read from the environment the node agent sets.

The agent exports the node id and settings before Celery starts, so pool
children get them whether they were forked or spawned.
"""

from __future__ import annotations

import functools
import os
from typing import cast

from broker.settings import Settings
from broker.store.connection import connect
from broker.store.keys import PoolKeys
from broker.store.scripts import Scripts

NODE_ENV = "GPUBROKER_NODE_ID"
INCARNATION_ENV = "GPUBROKER_INCARNATION"  # the worker process the node id belongs to now
# The CUDA_VISIBLE_DEVICES the worker itself was started with: node GPU index i is
# the i-th entry of it (a node may be a subset of a machine's GPUs).
DEVICE_MAP_ENV = "GPUBROKER_DEVICE_MAP"


def node_id() -> str:
    try:
        return os.environ[NODE_ENV]
    except KeyError:
        raise RuntimeError(f"{NODE_ENV} is not set: start workers with `gpubroker worker --node ID`") from None


def incarnation() -> str:
    return os.environ.get(INCARNATION_ENV, "")


def replaced() -> bool:
    """Has another worker process registered under this node id since this one did?"""
    scripts_ = scripts()
    current = cast(bytes | None, scripts_.redis.hget(scripts_.keys.node(node_id()), "incarnation"))
    return bool(incarnation()) and current is not None and current.decode() != incarnation()


@functools.cache
def _settings(pid: int) -> Settings:
    return Settings()


def settings() -> Settings:
    """This worker's settings (the agent exports them to the environment before Celery starts)."""
    return _settings(os.getpid())


@functools.cache
def _scripts(pid: int) -> Scripts:
    return Scripts(connect(settings()), PoolKeys(settings().pool))


def scripts() -> Scripts:
    """The transition scripts for this process (one connection per process, fork-safe)."""
    return _scripts(os.getpid())


def visible_devices(indices: str) -> str:
    """CUDA_VISIBLE_DEVICES for reserved node GPU indices like "0,3" ("" for none)."""
    mapping = [d for d in os.environ.get(DEVICE_MAP_ENV, "").split(",") if d]
    if not indices:
        return ""
    return ",".join(mapping[int(i)] if mapping else i for i in indices.split(","))
