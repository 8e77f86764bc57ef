"""A worker's own /metrics (``gpubroker worker --metrics-port N``, 0: none): its node as Redis
records it and its pool processes as the warm board has them, both read when Prometheus scrapes,
so a figure is never older than the scrape. The dispatcher's /metrics covers the pool as a whole
(``broker.metrics``); this answers "is this worker alive, holding its lease, and what is it
running" from the node itself, and still answers while Redis is down (``..._redis_up`` 0).

Series (labels ``pool``, ``node``): ``gpubroker_worker_redis_up`` (1 when its node record could be
read), ``gpubroker_worker_lease_seconds`` (time left on its lease; negative once run out),
``gpubroker_worker_tasks`` (attempts its node holds), ``gpubroker_worker_gpus{state}`` and
``gpubroker_worker_slots{state}`` (allocated, free), ``gpubroker_worker_draining``, and
``gpubroker_worker_processes{state}`` (busy, warm_cpu, warm_gpu, idle: pool processes by what
they run or are warm for), and ``gpubroker_worker_warm_starts_total{result}`` (hit, miss:
``reuse=True`` GPU tasks started in a process warm for their name and GPUs, or not)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import redis
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from broker.metrics import serve
from broker.models import NodeView
from broker.store import records
from broker.store.keys import PoolKeys
from workers import warm
from workers.unit import alive

log = logging.getLogger(__name__)


class WorkerCollector(Collector):
    def __init__(self, client: redis.Redis, keys: PoolKeys, pool: str, node_id: str) -> None:
        self.client, self.keys, self.labels = client, keys, [pool, node_id]
        self.node_id = node_id

    def _gauge(self, name: str, doc: str, extra: tuple[str, ...] = ()) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, labels=["pool", "node", *extra])

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        up = self._gauge("gpubroker_worker_redis_up", "1 when this worker's node record could be read from Redis")
        processes = self._gauge("gpubroker_worker_processes", "Pool processes by what they run or are warm for",
                                ("state",))
        counts = {"busy": 0, "warm_cpu": 0, "warm_gpu": 0, "idle": 0}
        for _index, pid, _retire, running, held in warm.board().entries():
            if not alive(pid):  # a killed process's slot stays until another process takes its index
                continue
            state = "busy" if running else "idle" if not held else "warm_cpu" if held == warm.CPU else "warm_gpu"
            counts[state] += 1
        for state, count in counts.items():
            processes.add_metric([*self.labels, state], count)
        yield processes
        starts = CounterMetricFamily("gpubroker_worker_warm_starts", "reuse=True GPU tasks started in a pool process "
                                     "warm for their task name and GPUs (hit) or not (miss)",
                                     labels=["pool", "node", "result"])
        for result, count in zip(("hit", "miss"), warm.board().starts(), strict=True):
            starts.add_metric([*self.labels, result], count)
        yield starts
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.hgetall(self.keys.node(self.node_id))
            pipe.zscore(self.keys.leases, self.node_id)
            pipe.scard(self.keys.node_tasks(self.node_id))
            h, lease, tasks = pipe.execute()
        except redis.RedisError as exc:
            log.debug("metrics: node record unreadable: %s", exc)
            up.add_metric(self.labels, 0)
            yield up
            return
        up.add_metric(self.labels, 1 if h else 0)
        yield up
        if not h:
            return
        view = records.node_view(self.node_id, h, lease, tasks)
        yield from self._node(view)

    def _node(self, view: NodeView) -> Iterator[GaugeMetricFamily]:
        lease = self._gauge("gpubroker_worker_lease_seconds", "Seconds left on this node's lease (negative: run out)")
        if view.lease_expires_at is not None:
            lease.add_metric(self.labels, view.lease_expires_at - time.time())
        tasks = self._gauge("gpubroker_worker_tasks", "Attempts this node holds (reserved or running)")
        tasks.add_metric(self.labels, view.tasks)
        draining = self._gauge("gpubroker_worker_draining", "1 while no new tasks are placed on this node")
        draining.add_metric(self.labels, 1 if view.draining else 0)
        gpus = self._gauge("gpubroker_worker_gpus", "This node's GPUs: allocated (any share held) or free",
                           ("state",))
        gpus.add_metric([*self.labels, "free"], view.free_gpus)
        gpus.add_metric([*self.labels, "allocated"], len(view.gpus) - view.free_gpus)
        slots = self._gauge("gpubroker_worker_slots", "This node's task slots: allocated or free", ("state",))
        slots.add_metric([*self.labels, "free"], view.free_slots)
        slots.add_metric([*self.labels, "allocated"], view.slots - view.free_slots)
        yield from (lease, tasks, draining, gpus, slots)


def serve_worker(port: int, client: redis.Redis, keys: PoolKeys, pool: str, node_id: str) -> bool:
    """Serve the worker's series (and its process's CPU and memory) on ``port``: 0, do not; a port
    already taken is a warning, and the worker runs on. Its own registry: not the dispatcher's series."""
    if not port:
        return False
    registry = CollectorRegistry()
    registry.register(WorkerCollector(client, keys, pool, node_id))
    ProcessCollector(registry=registry)
    return serve(port, registry, "worker metrics")
