"""Redis Sentinel failover under load: nothing acknowledged is lost, nothing runs twice.

A master, two replicas and three sentinels (tests/sentinel_support.py), a real dispatcher and
worker on the ``redis+sentinel://`` URL with ``min_replicas_ack=1``, and a feeder submitting
probes all along. The master is SIGKILLed (then the new one, so the pool fails over twice),
or partitioned behind a proxy that stops moving bytes and later comes back as a replica.
Every acknowledged submit must reach SUCCEEDED, its code must have run exactly once (Celery's
own log line per execution), and every node's capacity must be whole again. The window in
which submits were not acknowledged is printed (docs/reliability.md has the figures).
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from broker import Client, Resources, TaskState
from broker.errors import BrokerUnavailable
from broker.settings import Settings
from broker.store.connection import connect
from broker.store.keys import PoolKeys
from tests.e2e.test_faults import (
    DROPPED,
    FAST_LEASE,
    assert_node_free,
    executions,
    wait_all,
    wait_nodes_up,
    worker_logs,
)
from tests.invariants import assert_capacity_invariant
from tests.sentinel_support import SentinelCluster, sentinel_cluster
from tests.support import Processes, processes, wait_until

pytestmark = pytest.mark.e2e

NODES = ("node-a", "node-b")
REQUEUED = re.compile(r"queued again the message of (\d+) reserved task")
HA_ENV = {**FAST_LEASE, "GPUBROKER_MIN_REPLICAS_ACK": "1", "GPUBROKER_REPLICAS_ACK_TIMEOUT_S": "1"}


class TimedFeeder(threading.Thread):
    """Submits short probes until stopped; when each was acknowledged, and what was refused."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="feeder", daemon=True)
        self.settings = settings
        self.halt = threading.Event()
        self.acked: list[tuple[float, str]] = []
        self.refused: list[tuple[float, str]] = []

    def run(self) -> None:
        with Client(settings=self.settings) as client:
            while not self.halt.wait(0.1):
                try:
                    handle = client.submit("workers.tasks.probe", kwargs={"seconds": 0.2},
                                           resources=Resources(cpus=1))
                    self.acked.append((time.monotonic(), handle.id))
                except BrokerUnavailable as exc:
                    self.refused.append((time.monotonic(), str(exc)[:200]))

    def ids(self) -> list[str]:
        return [task_id for _, task_id in self.acked]

    def acked_after(self, t: float) -> int:
        return sum(1 for at, _ in self.acked if at > t)

    def window(self, t: float) -> float:
        """The longest wait between two acknowledged submits, from the last one before ``t`` to the
        fifth after it (an ack is timed when its submit returned: one may be stamped just past ``t``)."""
        times = [at for at, _ in self.acked]
        first = max((i for i, at in enumerate(times) if at <= t), default=0)
        span = times[first:first + 7]
        return max((b - a for a, b in itertools.pairwise(span)), default=0.0)

    def stop(self) -> None:
        self.halt.set()
        self.join(60)


def _settings(cluster: SentinelCluster, pool: str) -> Settings:
    return Settings(redis_url=cluster.url, pool=pool, min_replicas_ack=1, replicas_ack_timeout_s=1.0)


def _check_nothing_lost(client: Client, feeder: TimedFeeder, procs: Processes, settings: Settings) -> dict[str, int]:
    done = wait_all(client, feeder.ids(), 180, procs, NODES)
    states = Counter(s.state for s in done)
    ran = executions(procs, NODES)
    twice = [t for t in feeder.ids() if ran[t] > 1]
    assert states == Counter({TaskState.SUCCEEDED: len(done)}), states
    assert not twice, f"ran more than once: {twice}"
    unrun = [t for t in feeder.ids() if ran[t] == 0]
    assert not unrun, [(client.status(t).node, client.status(t).attempts, [line for line in worker_logs(
        procs, NODES).splitlines() if t in line]) for t in unrun[:3]]
    wait_until(lambda: all(n.tasks == 0 for n in client.nodes()), 30, what="every node to be idle")
    for node in NODES:
        assert_node_free(client, node)
    assert_capacity_invariant(connect(settings), PoolKeys(settings.pool))
    logs = worker_logs(procs, NODES)
    return {"acknowledged": len(done), "lost": len(feeder.ids()) - states[TaskState.SUCCEEDED],
            "ran twice": len(twice), "refused": len(feeder.refused),
            # messages a failover lost, queued again by workers.redeliver, and duplicates start.lua dropped
            "messages queued again": sum(int(n) for n in REQUEUED.findall(logs)),
            "duplicates dropped": len(DROPPED.findall(logs))}


def _kill_master(cluster: SentinelCluster, feeder: TimedFeeder) -> tuple[float, float, float]:
    """SIGKILL the master under load; (seconds to promotion, submit window, when it was killed)."""
    wait_until(lambda: feeder.acked_after(time.monotonic() - 2) >= 3, 30, what="submits to flow")
    old = cluster.master()
    old_port = cluster.sentinels_agree()
    assert old_port is not None
    killed_at = time.monotonic()
    old.kill()
    _port, promoted_s = cluster.wait_new_master(old_port)
    wait_until(lambda: feeder.acked_after(killed_at) >= 5, 60, what="submits to be acknowledged again")
    return promoted_s, feeder.window(killed_at), killed_at


@contextmanager
def under_load(tmp_path: Path, pool: str, proxied: bool = False) -> Iterator[tuple[SentinelCluster, Settings,
                                                                                  Processes, Client, TimedFeeder]]:
    """A Sentinel cluster, a dispatcher and two workers on it, and a feeder submitting all along."""
    with sentinel_cluster(tmp_path / "redis", proxied=proxied) as cluster:
        settings = _settings(cluster, pool)
        with processes(tmp_path, settings.redis_url, settings.pool, HA_ENV) as procs, \
                Client(settings=settings) as client:
            procs.dispatcher()
            for node in NODES:
                procs.worker(node, "--cpus", "4", "--slots", "3")
            wait_nodes_up(client, NODES)
            feeder = TimedFeeder(settings)
            feeder.start()
            wait_until(lambda: feeder.acked_after(time.monotonic() - 2) >= 3, 30, what="submits to flow")
            try:
                yield cluster, settings, procs, client, feeder
            finally:
                feeder.stop()


def test_master_killed_twice_under_load_loses_nothing(tmp_path: Path) -> None:
    with under_load(tmp_path, "ha-kill") as (cluster, settings, procs, client, feeder):
        figures = []
        for round_ in (1, 2):  # the second failover moves the pool off the first one's winner
            first = cluster.servers[0]
            promoted_s, window_s, _ = _kill_master(cluster, feeder)
            figures.append((round_, promoted_s, window_s))
            if round_ == 1:  # the killed master comes back (empty, no persistence) as a replica
                first.start()
                wait_until(lambda: cluster.replicas_online(cluster.master()) == 2, 30,
                           what="the old master to rejoin as a replica")
        time.sleep(1.0)
        feeder.stop()
        counts = _check_nothing_lost(client, feeder, procs, settings)
        for round_, promoted_s, window_s in figures:
            print(f"failover {round_}: sentinels promoted a replica after {promoted_s:.2f}s; "
                  f"no submit acknowledged for {window_s:.2f}s")
        print(f"failover counts: {counts}")
        assert counts["acknowledged"] > 20


def test_partitioned_master_comes_back_as_a_replica_and_loses_nothing(tmp_path: Path) -> None:
    """The master is cut off (the proxy in front of it stops moving bytes) but keeps running: what
    it still took can reach no replica, so WAIT fails and nothing it took is acknowledged. When
    the partition heals, the sentinels make it a replica of the new master."""
    with under_load(tmp_path, "ha-part", proxied=True) as (cluster, settings, procs, client, feeder):
        assert cluster.proxy is not None
        cut_at = time.monotonic()
        cluster.proxy.stall()
        _port, promoted_s = cluster.wait_new_master(cluster.master_address)
        wait_until(lambda: feeder.acked_after(cut_at) >= 5, 60, what="submits to be acknowledged again")
        window_s = feeder.window(cut_at)
        cluster.proxy.resume()
        old = cluster.servers[0]
        wait_until(lambda: old_role(old.port) == "slave", 30, what="the old master to become a replica")
        time.sleep(1.0)
        feeder.stop()
        counts = _check_nothing_lost(client, feeder, procs, settings)
        print(f"partition: sentinels promoted a replica after {promoted_s:.2f}s; no submit acknowledged "
              f"for {window_s:.2f}s; {counts}")


def old_role(port: int) -> str:
    """What the server on ``port`` says it is (master, slave), or "" when it does not answer."""
    try:
        role = redis.Redis(port=port, socket_timeout=1).role()[0]
    except redis.RedisError:
        return ""
    return role.decode() if isinstance(role, bytes) else str(role)
