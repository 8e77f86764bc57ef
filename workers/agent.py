"""The node agent: register the node, keep its lease, run a Celery worker pinned to it.

The worker consumes only its node's queue (worker name = node id, task events while a
monitor asks for them, late ack, prefetch 1, JSON only) with a prefork pool whose processes are reused for CPU tasks
and ``reuse=True`` GPU tasks, and run one task each otherwise (``workers.warm``), so a GPU
task starts in a fresh process where CUDA_VISIBLE_DEVICES can still decide what CUDA sees.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import cast

import redis
from celery import Celery, concurrency, signals
from celery.utils.time import rate

from broker.celery_conf import celery_settings, transport_for
from broker.errors import ConfigError, NodeRejected
from broker.models import NodeSpec, Resources
from broker.settings import Settings
from broker.store.connection import as_broker_error, connect
from broker.store.keys import PoolKeys
from broker.store.records import catalogue_entry
from broker.store.scripts import HeartbeatCode, RegisterCode, Scripts
from workers import context, fence, gang, log_files, metrics, warm
from workers.affinity import WarmPublisher
from workers.outcome import through_outages
from workers.recovery import RedeliverUnacked
from workers.redeliver import RedeliverReserved
from workers.unit import CGROUP_ROOT_ENV, Unit, alive, cgroup_root, containment, remove_empty_cgroups, sweep_node

log = logging.getLogger(__name__)

FRESH_PROCESS_POOL = "workers.pool:FreshProcessPool"
GUARDED_TRANSPORT = "workers.rejects:GuardedTransport"
GUARDED_SENTINEL_TRANSPORT = "workers.rejects:GuardedSentinelTransport"
GUARDED_CONSUMER = "workers.rejects:GuardedConsumer"
STOP_CHECK_S = 0.5  # how often the agent looks for tasks of its own that must stop (preempted, cancelled)


class NodeAgent:
    """Owns one node id for the life of this worker process (one incarnation)."""

    def __init__(self, settings: Settings, spec: NodeSpec, tasks: Mapping[str, str] | None = None,
                 address: str | None = None) -> None:
        """``tasks``: the task names this node runs, with their catalogue entries (``served_tasks``);
        ``address``: where gang members on other nodes reach this one (default: this host's)."""
        self.address = address or gang.default_address()
        self.settings = settings
        self.spec = spec
        self.tasks = tasks
        self.keys = PoolKeys(settings.pool)
        self.incarnation = uuid.uuid4().hex
        self.scripts = Scripts(connect(settings), self.keys)
        self.warm = WarmPublisher(self.scripts.redis, self.keys, spec.node_id, settings.warm_affinity)
        self.stop = threading.Event()
        self._thread: threading.Thread | None = None
        # An attempt (task id, delivery tag) asked to stop -> when it was sent SIGTERM (monotonic).
        # Keyed by attempt: the next attempt of the same task gets its own SIGTERM and grace.
        self._stopping: dict[tuple[str, str], float] = {}

    @property
    def lease_ms(self) -> int:
        return int(self.settings.lease_s * 1000)

    def register(self) -> RegisterCode:
        s = self.spec
        sent = time.monotonic()
        code, reclaimed = self.scripts.register(
            s.node_id, self.incarnation, self.lease_ms, s.gpus, s.gpu_memory_mb, s.cpu_milli,
            s.memory_mb, s.slots, s.labels, self.tasks)
        if code is not RegisterCode.SHAPE_CHANGED:
            fence.window().renewed(sent, self.settings.lease_s, self.settings.fence_margin_s)
        if code is RegisterCode.SHAPE_CHANGED:
            raise NodeRejected(f"node {s.node_id} is registered with another shape by this process")
        gang.publish_address(self.scripts.redis, self.keys, s.node_id, self.address)
        self.warm.publish(force=True)  # what a previous incarnation published is not this one's
        if reclaimed:
            log.warning("node %s: reclaimed %d tasks of its previous incarnation", s.node_id, reclaimed)
        log.info("node %s registered (%s): %d GPUs x %d MiB, %g CPUs, %d MiB, %d slots, labels %s",
                 s.node_id, code.name, s.gpus, s.gpu_memory_mb, s.cpus, s.memory_mb, s.slots, s.labels)
        return code

    def drain_for_shutdown(self) -> None:
        """The worker is stopping (SIGTERM, a warm shutdown): place nothing new here, and hand back
        what was reserved here and has not started, so another node runs it now rather than after
        this one's running tasks finish (or its lease expires). Runs in Celery's signal handler,
        in the main process before its event loop goes on: a handed-back task's message, taken
        already, then meets start.lua's fence and is dropped."""
        try:
            code, handed = self.scripts.drain(self.spec.node_id, "shutdown", self.incarnation)
        except redis.RedisError as exc:
            log.warning("node %s: could not drain for shutdown (%s); its lease covers it", self.spec.node_id, exc)
            return
        log.info("node %s draining for shutdown (%s): handed back %d task(s) not started", self.spec.node_id,
                 code.name, handed)

    def leave(self) -> None:
        """The worker has stopped: remove the node from the pool. Whatever it still held (a task a
        cold shutdown killed) is requeued at once, as the reaper would do after the lease."""
        if self._thread is not None:  # a beat still under way would register the node again
            self._thread.join(self.settings.socket_timeout_s * 4)
        try:
            code, reclaimed = self.scripts.forget(self.spec.node_id, self.incarnation)
        except redis.RedisError as exc:
            log.warning("node %s: could not leave the pool (%s); it is reaped when its lease expires",
                        self.spec.node_id, exc)
            return
        log.info("node %s left the pool (%s; %d task(s) reclaimed)", self.spec.node_id, code.name, reclaimed)

    def heartbeat_once(self) -> HeartbeatCode:
        sent = time.monotonic()
        code = self.scripts.heartbeat(self.spec.node_id, self.incarnation, self.lease_ms)
        if code is HeartbeatCode.OK:
            fence.window().renewed(sent, self.settings.lease_s, self.settings.fence_margin_s)
        elif code is HeartbeatCode.NOT_REGISTERED:
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
            # Cold shutdown: nothing here is this process's to finish, and a warm one can wait up to
            # 300 s on a pool child that ran one task (billiard's _ensure_messages_consumed).
            os.kill(os.getpid(), signal.SIGQUIT)
        return code

    STOP_FIELDS = ("state", "tag", "pid", "preempt_at", "preempt_grace", "cancel_at", "cancel_grace")

    def stop_marked(self) -> list[str]:
        """SIGTERM the running tasks of this node that must stop (the scheduler preempted them, or
        they were cancelled); SIGKILL those still running once their grace period has passed.
        Returns the ids signalled.

        Read from Redis, not from Celery's list of active requests: Celery's own terminate (a
        revoke) drops a request from that list at once, while a process that ignores SIGTERM runs
        on. Its GPUs are not released until it has ended (finish.lua), so it must be killed."""
        ids = sorted(m.decode() for m in cast(set[bytes], self.scripts.redis.smembers(self.keys.node_tasks(
            self.spec.node_id))))
        pipe = self.scripts.redis.pipeline(transaction=False)
        for task_id in ids:
            pipe.hmget(self.keys.task(task_id), *self.STOP_FIELDS)
        now, signalled, live = time.monotonic(), [], set()
        for task_id, fields in zip(ids, pipe.execute() if ids else [], strict=True):
            state, tag, pid, preempt_at, preempt_grace, cancel_at, cancel_grace = (
                f.decode() if f is not None else None for f in fields)
            if state != "RUNNING" or not pid or not tag or (preempt_at is None and cancel_at is None):
                continue
            attempt = (task_id, tag)
            live.add(attempt)
            why, grace = ("cancelled", cancel_grace) if cancel_at is not None else ("preempted", preempt_grace)
            first = self._stopping.get(attempt)
            unit = Unit(self.spec.node_id, tag)
            if warm.board().runs(int(pid), tag) is False:
                continue  # a warm process that has moved on to another task: this attempt has ended
            if first is None:
                log.warning("task %s %s: SIGTERM to pid %s and its processes (grace %s ms)", task_id, why, pid, grace)
                self._stopping[attempt] = now
                if _is_pool_child(int(pid)):
                    unit.signal(signal.SIGTERM, int(pid))
                signalled.append(task_id)
            elif not alive(int(pid)):
                # Its process is gone and nobody recorded it (a child that died of the signal while
                # Celery had already let go of its request): once nothing of it is left, record it
                # here, fenced by the tag.
                if unit.kill(int(pid), wait_s=1.0):  # not yet: the next look tries again
                    code, after = self.scripts.finish(task_id, self.spec.node_id, tag, "lost",
                                                      f"stopped ({why}): its process ended",
                                                      incarnation=self.incarnation)
                    log.warning("task %s %s: process %s ended -> %s", task_id, why, pid, after or code.name)
            elif now - first >= int(grace or 0) / 1000:
                log.warning("task %s %s: grace over, SIGKILL to pid %s and its processes", task_id, why, pid)
                if _is_pool_child(int(pid)):
                    unit.signal(signal.SIGKILL, int(pid))
                signalled.append(task_id)
        for attempt in [a for a in self._stopping if a not in live]:
            del self._stopping[attempt]
        return signalled

    def _beat(self) -> None:
        # Keep beating every heartbeat_s through a Redis outage (the client itself backs off
        # within each try): the lease must be renewed the moment Redis is back. Between beats,
        # look for tasks that must stop every STOP_CHECK_S.
        next_beat = time.monotonic() + self.settings.heartbeat_s
        while not self.stop.wait(min(STOP_CHECK_S, max(0.0, next_beat - time.monotonic()))):
            try:
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self.settings.heartbeat_s
                    self.heartbeat_once()
                    remove_empty_cgroups(self.spec.node_id)
                self.stop_marked()
                self.warm.publish()
            except Exception as exc:
                # Redis unreachable or full, refused credentials: one line that says so. Anything
                # else is a bug: its traceback.
                error = as_broker_error(exc)
                log.warning("heartbeat failed: %s; retrying", error, exc_info=error is exc)

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="gpubroker-heartbeat", daemon=True)
        self._thread.start()

    def configure(self, app: Celery, log_level: str = "INFO") -> list[str]:
        """Point ``app`` at this node and return the worker's argv (Celery logging at ``log_level``)."""
        node = self.spec.node_id
        os.environ[context.NODE_ENV] = node
        os.environ[context.INCARNATION_ENV] = self.incarnation
        os.environ["GPUBROKER_REDIS_URL"] = self.settings.url
        os.environ["GPUBROKER_POOL"] = self.settings.pool
        if "CUDA_VISIBLE_DEVICES" in os.environ and context.DEVICE_MAP_ENV not in os.environ:
            os.environ[context.DEVICE_MAP_ENV] = os.environ["CUDA_VISIBLE_DEVICES"]
        conf = celery_settings(self.settings)
        # This node's own unacked bookkeeping: nodes never restore each other's messages.
        conf["broker_transport_options"].update(
            unacked_key=self.keys.unacked(node), unacked_index_key=self.keys.unacked_index(node),
            unacked_mutex_key=self.keys.unacked_mutex(node))
        # Warm processes (workers.warm) live until these limits; a fresh-process task's exits after it.
        conf["worker_max_tasks_per_child"] = self.settings.max_tasks_per_process
        conf["worker_max_memory_per_child"] = (self.settings.max_memory_per_process_mb or 0) * 1024 or None
        # One poison message on the queue must not stop or wedge the node (workers.rejects).
        conf["worker_consumer"] = GUARDED_CONSUMER
        transport = transport_for(self.settings.url, GUARDED_TRANSPORT, GUARDED_SENTINEL_TRANSPORT)
        if transport:
            # An explicit transport wins over the URL's scheme; other schemes keep kombu's own.
            conf["broker_transport"] = transport
        # Celery's documented hook for a pool class of one's own (`--pool custom`).
        os.environ["CELERY_CUSTOM_WORKER_POOL"] = FRESH_PROCESS_POOL
        concurrency.ALIASES["custom"] = FRESH_PROCESS_POOL
        app.conf.update(conf)
        # Messages held when the Redis connection drops go back to the queue on reconnect.
        app.steps["consumer"].add(RedeliverUnacked)
        # Reserved tasks whose message a failover lost are queued again, then and every so often.
        app.steps["consumer"].add(RedeliverReserved)
        return ["worker", "--queues", self.keys.queue(node), "--hostname", f"{node}@{socket.gethostname()}",
                "--concurrency", str(self.spec.slots), "--pool", "custom",
                "--without-gossip", "--without-mingle", "--loglevel", log_level.upper()]


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _is_pool_child(pid: int) -> bool:
    """Is ``pid`` a process of this worker's pool (a pid recorded in Redis may have ended and been
    reused by something else since)?"""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return not sys.platform.startswith("linux")  # gone; or no /proc here to check against
    return int(stat.rpartition(")")[2].split()[1]) == os.getpid()  # the field after state: the parent


def terminate_active_tasks() -> None:
    """SIGKILL every process of every task this worker is running (its pool child and what it started)."""
    from celery.worker import state  # only meaningful inside a running worker

    for request in list(state.active_requests):
        tag = (request.request_dict.get("properties") or {}).get("delivery_tag")
        if request.worker_pid:
            _signal(request.worker_pid, signal.SIGKILL)
        if tag:
            Unit(context.node_id(), tag).signal(signal.SIGKILL, request.worker_pid)


def served_tasks(app: Celery) -> dict[str, str]:
    """Every task name ``app`` has loaded, with its catalogue entry: the defaults its decorator
    declared and its rate limit (what a submit by name alone takes)."""
    served = {}
    for name, task in app.tasks.items():
        declared = getattr(task, "declared", None)
        defaults = {k: v.model_dump() if isinstance(v, Resources) else v
                    for k, v in (declared() if declared else {}).items()}
        limit = getattr(task, "rate_limit", None)
        served[name] = catalogue_entry(defaults, limit, rate(limit) if limit else 0.0)
    return served


def run_worker(settings: Settings, spec: NodeSpec, task_modules: Sequence[str] = (), address: str | None = None,
               metrics_port: int = 0, log_level: str = "INFO") -> None:
    from workers import control  # noqa: F401  (registers the broker's revoke with Celery's remote control)
    from workers.app import app  # configure before the app finalizes

    app.conf.include = ["workers.tasks", *task_modules]
    try:
        app.loader.import_default_modules()  # the task modules: the node registers what it runs
    except ImportError as exc:
        raise ConfigError({"tasks": f"cannot import a task module: {exc}"}) from None
    agent = NodeAgent(settings, spec, served_tasks(app), address)
    argv = agent.configure(app, log_level)
    os.environ[CGROUP_ROOT_ENV] = str(cgroup_root() or "")  # found once, for every pool process
    log.info("node %s: task processes are contained by %s", spec.node_id, containment())
    left = sweep_node(spec.node_id)  # what a previous worker of this node left running here
    log_files.sweep_spares(spec.node_id)  # and the spare log files of its pool processes
    if left:
        log.warning("node %s: killed %d processes a previous worker process of this node left running", spec.node_id,
                    left)
    fence.window()  # shared with the pool's processes: created before Celery forks them
    warm.board(spec.slots)  # likewise
    # Redis not up yet, or full: wait for it. Refused credentials: exit (workers.cli says why).
    through_outages(agent.register, f"registering node {spec.node_id}", None)
    agent.start_heartbeat()
    metrics.serve_worker(metrics_port, agent.scripts.redis, agent.keys, settings.pool, spec.node_id)
    signals.worker_shutting_down.connect(lambda **_: agent.drain_for_shutdown(), weak=False)
    try:
        app.worker_main(argv)
    finally:
        agent.stop.set()
        agent.leave()
