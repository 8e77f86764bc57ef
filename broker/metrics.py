"""The dispatcher's Prometheus metrics of the pool's state: queue depth and age, capacity per node,
nodes by state, task outcomes and durations, rejected messages, warm hits and misses per node.

Outcomes are counted in Redis by the scripts that decide them (_release.lua ``tally``, in
finish, cancel, expire, reap, preempt, quarantine), not by workers: a task cancelled while
pending, expired, or requeued by the reaper never reaches a worker, and a worker's counters die
with it. The dispatcher reads those counters (``broker.store.stats``) at most once per
``explain_interval_s`` together with the queue count, and computes the node gauges from the
free-capacity cache its cycle keeps anyway; a scrape reads no Redis.

Every series is present from the start at 0: the three node states, every outcome and priority
class of each tenant seen (and of ``default``), every registered node's rejected count, and the
wanted nodes of every node shape seen up since the dispatcher started (``scheduling.demand``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from broker.scheduling import demand
from broker.scheduling.config import SchedulingConfig
from broker.scheduling.model import NodeFree, Snapshot
from broker.store.stats import BUCKETS_S, OUTCOMES, PRIORITY_CLASSES, Histogram, Stats

log = logging.getLogger(__name__)

NODE_STATES = ("up", "draining", "down")
NODES_EACH = 2000  # wanted nodes are worked out every every_ms for this many nodes times shapes


@dataclass
class PoolView:
    """What one pool's series show, as the dispatcher last computed it."""

    stats: Stats = field(default_factory=Stats)
    now_ms: int = 0
    live: dict[str, NodeFree | None] = field(default_factory=dict)  # lease valid; None: not up or unreadable
    tenants: set[str] = field(default_factory=set)  # every tenant seen since start: its series stay
    wanted: dict[str, int] = field(default_factory=dict)  # node shape label -> more nodes of it wanted


class PoolCollector(Collector):
    """One per process, registered once: each dispatcher (one per pool, several in tests) updates its pool's view."""

    def __init__(self) -> None:
        self.pools: dict[str, PoolView] = {}

    def update(self, pool: str, stats: Stats, now_ms: int, live: Mapping[str, NodeFree | None],
               wanted: Mapping[str, int] | None = None) -> None:
        seen = self.pools[pool].tenants if pool in self.pools else set()
        self.pools[pool] = PoolView(stats, now_ms, dict(live), seen | stats.tenants(), dict(wanted or {}))

    def describe(self) -> Iterable[Metric]:
        return []  # names are checked at collect time (the families are built per scrape)

    def collect(self) -> Iterator[Metric]:
        pending = GaugeMetricFamily("gpubroker_pending_tasks", "Tasks waiting in the pending queue (placeable now; "
                                    "priority_class: high >0, normal 0, low <0)", labels=["pool", "tenant",
                                                                                          "priority_class"])
        oldest = GaugeMetricFamily("gpubroker_oldest_pending_seconds", "Age since submit of the tenant's "
                                   "first-submitted pending task (0: none pending)", labels=["pool", "tenant"])
        nodes = GaugeMetricFamily("gpubroker_nodes", "Registered nodes by state (down: lease expired or not up)",
                                  labels=["pool", "state"])
        resources = {
            "gpus": GaugeMetricFamily("gpubroker_node_gpus", "GPUs per node, allocated or free (fractions "
                                      "for shared GPUs)", labels=["pool", "node", "state"]),
            "gpu_mem": GaugeMetricFamily("gpubroker_node_gpu_memory_mb", "GPU memory per node (MiB, all its "
                                         "GPUs), allocated or free", labels=["pool", "node", "state"]),
            "cpus": GaugeMetricFamily("gpubroker_node_cpus", "CPUs per node, allocated or free",
                                      labels=["pool", "node", "state"]),
            "mem": GaugeMetricFamily("gpubroker_node_memory_mb", "RAM per node (MiB), allocated or free",
                                     labels=["pool", "node", "state"]),
        }
        outcomes = CounterMetricFamily("gpubroker_tasks", "Tasks ended (succeeded, failed, cancelled) or sent "
                                       "back to the queue (preempted, requeued: lost or retried)",
                                       labels=["pool", "tenant", "outcome"])
        wait = HistogramMetricFamily("gpubroker_task_wait_seconds", "Submit to start of the last attempt, of "
                                     "tasks that ran and ended", labels=["pool", "tenant"])
        run = HistogramMetricFamily("gpubroker_task_run_seconds", "Start to end of the last attempt, of tasks "
                                    "that ran and ended", labels=["pool", "tenant"])
        rejected = CounterMetricFamily("gpubroker_rejected_messages", "Queue messages a node's worker dropped "
                                       "unread (not JSON, malformed)", labels=["pool", "node"])
        warm = CounterMetricFamily("gpubroker_warm_starts", "reuse=True GPU tasks a node's worker started in a "
                                   "pool process warm for their task name and GPUs (hit) or not (miss), since it "
                                   "started (warm affinity)", labels=["pool", "node", "result"])
        wanted = GaugeMetricFamily("gpubroker_wanted_nodes", "More nodes of this shape (as registered nodes: "
                                   "GPUs, GPU memory, CPUs, RAM) that would let the pending tasks that nodes can "
                                   "place start now (the planner's answer; each shape alone)", labels=["pool", "shape"])
        for pool, view in sorted(self.pools.items()):
            s = view.stats
            tenants = sorted(view.tenants)
            for tenant in tenants:
                for cls in PRIORITY_CLASSES:
                    pending.add_metric([pool, tenant, cls], s.pending.get((tenant, cls), 0))
                at = s.oldest_submitted_ms.get(tenant)
                oldest.add_metric([pool, tenant], max(0.0, (view.now_ms - at) / 1000) if at is not None else 0.0)
                for outcome in OUTCOMES:
                    outcomes.add_metric([pool, tenant, outcome], s.outcomes.get((tenant, outcome), 0))
                for family, hists in ((wait, s.wait), (run, s.run)):
                    h = hists.get(tenant, Histogram())
                    family.add_metric([pool, tenant], _cumulative(h), h.sum_s)
            states = dict.fromkeys(NODE_STATES, 0)
            for node_id in sorted(s.registered | set(view.live)):
                node = view.live.get(node_id)
                states["down" if node is None else "draining" if node.draining else "up"] += 1
                if node is not None:
                    _add_node(resources, pool, node)
            for state, count in states.items():
                nodes.add_metric([pool, state], count)
            for node_id in sorted(s.registered | set(s.rejected)):
                rejected.add_metric([pool, node_id], s.rejected.get(node_id, 0))
            for node_id in sorted(s.registered | set(s.warm_starts)):
                for result, count in zip(("hit", "miss"), s.warm_starts.get(node_id, (0, 0)), strict=True):
                    warm.add_metric([pool, node_id, result], count)
            for shape, count in sorted(view.wanted.items()):
                wanted.add_metric([pool, shape], count)
        yield from (pending, oldest, nodes, *resources.values(), outcomes, wait, run, rejected, wanted, warm)


def _cumulative(h: Histogram) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    total = 0
    for bound, count in zip([*(str(float(b)) for b in BUCKETS_S), "+Inf"], h.buckets, strict=True):
        total += count
        out.append((bound, total))
    return out


def _add_node(families: dict[str, GaugeMetricFamily], pool: str, node: NodeFree) -> None:
    gpus = len(node.free_milli)
    amounts = {  # (capacity, free)
        "gpus": (float(gpus), sum(node.free_milli) / 1000),
        "gpu_mem": (node.gpu_memory_mb * gpus, sum(node.free_mem)),
        "cpus": (node.cap_cpu_milli / 1000, node.free_cpu_milli / 1000),
        "mem": (node.cap_memory_mb, node.free_memory_mb),
    }
    for key, (capacity, free) in amounts.items():
        families[key].add_metric([pool, node.id, "allocated"], capacity - free)
        families[key].add_metric([pool, node.id, "free"], free)


class WantedNodes:
    """One dispatcher's ``gpubroker_wanted_nodes`` (``scheduling.demand``): every node shape seen up
    since it started, and how many more of each its last full pass's waiting tasks want, worked
    out again at most every ``every_ms`` (a planner pass per shape; a scaler polls slower)."""

    def __init__(self, config: SchedulingConfig, every_ms: int) -> None:
        self.config, self.every_ms = config, every_ms
        self.shapes: dict[demand.NodeShape, NodeFree] = {}
        self.wanted: dict[demand.NodeShape, int] = {}
        self.next_ms = 0

    def figures(self, now_ms: int, waiting: Snapshot | None, nodes: Iterable[NodeFree | None]) -> dict[str, int]:
        self.shapes = {**demand.templates(n for n in nodes if n is not None), **self.shapes}
        if waiting is None:
            self.wanted = {}
        elif now_ms >= self.next_ms:
            self.wanted = demand.wanted_nodes(self.config, waiting, self.shapes)
            # A planner pass per shape over every node: at 10,000 nodes, every every_ms, a sixth of
            # the dispatcher's time (issue 14). Past NODES_EACH nodes-times-shapes, less often.
            work = len(waiting.nodes) * len(self.shapes)
            self.next_ms = now_ms + self.every_ms * max(1, work // NODES_EACH)
        return {demand.shape_label(shape): self.wanted.get(shape, 0) for shape in self.shapes}


COLLECTOR = PoolCollector()
REGISTRY.register(COLLECTOR)


def serve(port: int, registry: CollectorRegistry = REGISTRY, what: str = "metrics") -> bool:
    """Serve ``registry`` on ``port`` (0: do not); a port already taken is logged, and the process runs on."""
    if not port:
        return False
    try:
        start_http_server(port, registry=registry)
    except OSError as exc:
        log.warning("%s not served: port %d is not available (%s); use --metrics-port to move them, "
                    "0 to turn them off", what, port, exc.strerror or exc)
        return False
    log.info("%s on http://0.0.0.0:%d/metrics", what, port)
    return True
