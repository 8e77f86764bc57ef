"""The node agent: register the node, keep its lease, run a Celery worker pinned to it.

The worker consumes only its node's queue (worker name = node id, task events on,
late ack, prefetch 1, JSON only) with a prefork pool whose children each run one
task (``max_tasks_per_child=1``), so every task starts in a fresh process where
CUDA_VISIBLE_DEVICES can still decide what CUDA sees.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from urllib.parse import urlsplit

import redis
from celery import Celery, concurrency

from broker.celery_conf import celery_settings
from broker.errors import NodeRejected
from broker.models import NodeSpec
from broker.settings import Settings
from broker.store.connection import connect
from broker.store.keys import PoolKeys
from broker.store.scripts import HeartbeatCode, RegisterCode, Scripts
from workers import context
from workers.recovery import RedeliverUnacked

log = logging.getLogger(__name__)

FRESH_PROCESS_POOL = "workers.pool:FreshProcessPool"
GUARDED_TRANSPORT = "workers.rejects:GuardedTransport"
GUARDED_CONSUMER = "workers.rejects:GuardedConsumer"
PREEMPT_CHECK_S = 0.5  # how often the agent looks for tasks of its own that the scheduler preempted


class NodeAgent:
    """Owns one node id for the life of this worker process (one incarnation)."""

    def __init__(self, settings: Settings, spec: NodeSpec) -> None:
        self.settings = settings
        self.spec = spec
        self.keys = PoolKeys(settings.pool)
        self.incarnation = uuid.uuid4().hex
        self.scripts = Scripts(connect(settings), self.keys)
        self.stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping: dict[str, float] = {}  # preempted task id -> when it was sent SIGTERM (monotonic)

    @property
    def lease_ms(self) -> int:
        return int(self.settings.lease_s * 1000)

    def register(self) -> RegisterCode:
        s = self.spec
        code, reclaimed = self.scripts.register(
            s.node_id, self.incarnation, self.lease_ms, s.gpus, s.gpu_memory_mb, s.cpu_milli,
            s.memory_mb, s.slots, s.labels)
        if code is RegisterCode.SHAPE_CHANGED:
            raise NodeRejected(f"node {s.node_id} is registered with another shape by this process")
        if reclaimed:
            log.warning("node %s: reclaimed %d tasks of its previous incarnation", s.node_id, reclaimed)
        log.info("node %s registered (%s): %d GPUs x %d MiB, %g CPUs, %d MiB, %d slots, labels %s",
                 s.node_id, code.name, s.gpus, s.gpu_memory_mb, s.cpus, s.memory_mb, s.slots, s.labels)
        return code

    def heartbeat_once(self) -> HeartbeatCode:
        code = self.scripts.heartbeat(self.spec.node_id, self.incarnation, self.lease_ms)
        if code is HeartbeatCode.NOT_REGISTERED:
            log.warning("node %s unknown to Redis (data lost?); registering again", self.spec.node_id)
            self.register()
        elif code is HeartbeatCode.REAPED:
            # Our tasks were requeued elsewhere: stop them here so none runs twice at once.
            log.error("node %s was reaped (lease expired); terminating its running tasks", self.spec.node_id)
            terminate_active_tasks()
            self.register()
        elif code is HeartbeatCode.FENCED:
            # The new incarnation has reclaimed our tasks and may be running them already: a
            # warm shutdown alone would let ours run to the end beside them.
            log.error("node %s was taken over by another worker process; terminating its running tasks "
                      "and shutting down", self.spec.node_id)
            self.stop.set()
            terminate_active_tasks()
            os.kill(os.getpid(), signal.SIGTERM)
        return code

    def stop_preempted(self) -> list[str]:
        """SIGTERM the tasks here that the scheduler marked for preemption; SIGKILL those still
        running once their grace period has passed. Returns the ids signalled."""
        from celery.worker import state  # only meaningful inside a running worker

        active = {r.id: r for r in list(state.active_requests) if r.worker_pid}
        if not active:
            self._stopping.clear()
            return []
        ids = list(active)
        pipe = self.scripts.redis.pipeline(transaction=False)
        for task_id in ids:
            pipe.hmget(self.keys.task(task_id), "preempt_at", "preempt_grace")
        marks = pipe.execute()
        now, signalled = time.monotonic(), []
        for task_id, (at, grace) in zip(ids, marks, strict=True):
            if at is None:
                continue
            pid = active[task_id].worker_pid
            first = self._stopping.get(task_id)
            if first is None:
                log.warning("task %s preempted: SIGTERM to pid %d (grace %s ms)", task_id, pid, grace)
                self._stopping[task_id] = now
                _signal(pid, signal.SIGTERM)
                signalled.append(task_id)
            elif now - first >= int(grace or 0) / 1000:
                log.warning("task %s preempted: grace over, SIGKILL to pid %d", task_id, pid)
                _signal(pid, signal.SIGKILL)
                signalled.append(task_id)
        for task_id in [t for t in self._stopping if t not in active]:
            del self._stopping[task_id]
        return signalled

    def _beat(self) -> None:
        # Keep beating every heartbeat_s through a Redis outage (the client itself backs off
        # within each try): the lease must be renewed the moment Redis is back. Between beats,
        # look for preempted tasks every PREEMPT_CHECK_S.
        next_beat = time.monotonic() + self.settings.heartbeat_s
        while not self.stop.wait(min(PREEMPT_CHECK_S, max(0.0, next_beat - time.monotonic()))):
            try:
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self.settings.heartbeat_s
                    self.heartbeat_once()
                self.stop_preempted()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("heartbeat failed: Redis unreachable (%s); retrying", exc)
            except Exception:
                log.warning("heartbeat failed; retrying", exc_info=True)

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="gpubroker-heartbeat", daemon=True)
        self._thread.start()

    def configure(self, app: Celery) -> list[str]:
        """Point ``app`` at this node and return the worker's argv."""
        node = self.spec.node_id
        os.environ[context.NODE_ENV] = node
        os.environ["GPUBROKER_REDIS_URL"] = self.settings.redis_url
        os.environ["GPUBROKER_POOL"] = self.settings.pool
        if "CUDA_VISIBLE_DEVICES" in os.environ and context.DEVICE_MAP_ENV not in os.environ:
            os.environ[context.DEVICE_MAP_ENV] = os.environ["CUDA_VISIBLE_DEVICES"]
        conf = celery_settings(self.settings)
        # This node's own unacked bookkeeping: nodes never restore each other's messages.
        conf["broker_transport_options"].update(
            unacked_key=self.keys.unacked(node), unacked_index_key=self.keys.unacked_index(node),
            unacked_mutex_key=self.keys.unacked_mutex(node))
        conf["worker_max_tasks_per_child"] = 1
        # One poison message on the queue must not stop or wedge the node (workers.rejects).
        conf["worker_consumer"] = GUARDED_CONSUMER
        if urlsplit(self.settings.redis_url).scheme in ("redis", "rediss"):
            # An explicit transport wins over the URL's scheme; other schemes keep kombu's own.
            conf["broker_transport"] = GUARDED_TRANSPORT
        # Celery's documented hook for a pool class of one's own (`--pool custom`).
        os.environ["CELERY_CUSTOM_WORKER_POOL"] = FRESH_PROCESS_POOL
        concurrency.ALIASES["custom"] = FRESH_PROCESS_POOL
        app.conf.update(conf)
        # Messages held when the Redis connection drops go back to the queue on reconnect.
        app.steps["consumer"].add(RedeliverUnacked)
        return ["worker", "--queues", self.keys.queue(node), "--hostname", f"{node}@{socket.gethostname()}",
                "--concurrency", str(self.spec.slots), "--pool", "custom", "--task-events",
                "--without-gossip", "--without-mingle", "--loglevel", "INFO"]


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def terminate_active_tasks() -> None:
    """SIGKILL the pool children of every task this worker is running."""
    from celery.worker import state  # only meaningful inside a running worker

    for request in list(state.active_requests):
        if request.worker_pid:
            _signal(request.worker_pid, signal.SIGKILL)


def run_worker(settings: Settings, spec: NodeSpec, task_modules: Sequence[str] = ()) -> None:
    from workers.app import app  # configure before the app finalizes

    agent = NodeAgent(settings, spec)
    argv = agent.configure(app)
    app.conf.include = ["workers.tasks", *task_modules]
    agent.register()
    agent.start_heartbeat()
    try:
        app.worker_main(argv)
    finally:
        agent.stop.set()
