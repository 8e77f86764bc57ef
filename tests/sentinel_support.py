"""A Redis master, replicas and three sentinels on loopback, for the failover tests.

All are real ``redis-server`` processes (a sentinel is ``redis-server sentinel.conf --sentinel``,
the same Debian package). The master can sit behind a ``StallingProxy``: everyone (replicas,
sentinels, gpubroker) reaches it through the proxy, so stalling the proxy partitions it from
the rest while it keeps running and accepting what it already received.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from tests.support import RedisServer, StallingProxy, free_port, wait_until

SERVICE = "gpb"
DOWN_AFTER_MS = 1000  # how long the sentinels wait before they call a silent master down
FAILOVER_TIMEOUT_MS = 3000


class Sentinel:
    """``redis-server sentinel.conf --sentinel`` on a free port, watching the master at ``master_port``."""

    def __init__(self, workdir: Path, master_port: int) -> None:
        self.workdir, self.port = workdir, free_port()
        self.master_port = master_port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "sentinel.conf"  # the sentinel rewrites it as it learns
        conf.write_text("\n".join([
            f"port {self.port}", "bind 127.0.0.1", "protected-mode no", f"dir {self.workdir}",
            f"sentinel monitor {SERVICE} 127.0.0.1 {self.master_port} 2",
            f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}",
            f"sentinel parallel-syncs {SERVICE} 2", ""]))
        binary = shutil.which("redis-server") or "redis-server"
        log = (self.workdir / "sentinel.log").open("ab")
        self.proc = subprocess.Popen([binary, str(conf), "--sentinel"], stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        wait_until(lambda: RedisServer._pings(client), 10, what="redis sentinel to accept connections")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class SentinelCluster:
    """A master (optionally behind a proxy), ``replicas`` replicas and three sentinels."""

    def __init__(self, workdir: Path, replicas: int = 2, proxied: bool = False) -> None:
        self.workdir = workdir
        self.servers = [RedisServer(workdir / "redis-0")]
        self.proxy: StallingProxy | None = StallingProxy(self.servers[0].port) if proxied else None
        self.master_address = self.proxy.port if self.proxy else self.servers[0].port
        self.servers += [RedisServer(workdir / f"redis-{i + 1}", "--replicaof", "127.0.0.1", str(self.master_address))
                         for i in range(replicas)]
        self.sentinels = [Sentinel(workdir / f"sentinel-{i}", self.master_address) for i in range(3)]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def start(self) -> None:
        for server in self.servers:
            server.start()
        wait_until(lambda: self.replicas_online(self.servers[0]) == len(self.servers) - 1, 20,
                   what="the replicas to sync")
        for sentinel in self.sentinels:
            sentinel.start()
        wait_until(lambda: self.sentinels_agree() == self.master_address, 20, what="the sentinels to find the master")

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        if self.proxy:
            self.proxy.close()
        for server in self.servers:  # no persistence to flush; SIGTERM would wait for lagging replicas
            server.kill()

    @staticmethod
    def replicas_online(server: RedisServer) -> int:
        try:
            info = redis.Redis(port=server.port, socket_timeout=1).info("replication")
        except redis.RedisError:
            return -1
        return sum(1 for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)
                   and v.get("state") == "online")

    def sentinels_agree(self) -> int | None:
        """The master port every sentinel names, or None while they differ (or one is unreachable)."""
        ports = set()
        for sentinel in self.sentinels:
            try:
                _host, port = redis.Redis(port=sentinel.port, socket_timeout=1).execute_command(
                    "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
            except (redis.RedisError, TypeError, ValueError):
                return None
            ports.add(int(port))
        return ports.pop() if len(ports) == 1 else None

    def master(self, timeout: float = 30) -> RedisServer:
        """The server the sentinels name master now (the proxied one by its own port); waits while
        they differ (a sentinel that has not yet heard of a promotion, or a restarted server)."""
        port = wait_until(self.sentinels_agree, timeout, what="the sentinels to agree on the master")
        if port == self.master_address:
            return self.servers[0]
        return next(s for s in self.servers if s.port == port)

    def wait_new_master(self, old: int, timeout: float = 30) -> tuple[int, float]:
        """Wait until the sentinels agree on a master other than port ``old``; (its port, seconds)."""
        t0 = time.monotonic()
        port = wait_until(lambda: (p := self.sentinels_agree()) not in (None, old) and p, timeout,
                          what="the sentinels to promote a replica")
        return int(port), time.monotonic() - t0


@contextmanager
def sentinel_cluster(workdir: Path, replicas: int = 2, proxied: bool = False) -> Iterator[SentinelCluster]:
    cluster = SentinelCluster(workdir, replicas, proxied)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


__all__ = ["DOWN_AFTER_MS", "SERVICE", "SentinelCluster", "free_port", "sentinel_cluster"]
