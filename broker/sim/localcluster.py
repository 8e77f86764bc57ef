"""A throwaway local cluster for the demo: redis-server, dispatcher, workers and Flower as subprocesses.

Every process starts in its own session, so it is the leader of its own process
group: a Celery worker's pool children share its group, and stopping the group
stops them too. Ctrl-C in the terminal reaches only the demo (the children are
in other groups), and the demo then stops everything it started through here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis

from broker.errors import GpuBrokerError

# Where ``python -m workers`` and ``-m broker...`` resolve when the project is not installed.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class LocalClusterError(GpuBrokerError):
    """A local process could not be started or died."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_logdir(base: Path = Path(".demo")) -> Path:
    """A fresh ``.demo/<time>-<pid>`` directory, or a temp directory if the working directory is read-only."""
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    try:
        path = base / name
        path.mkdir(parents=True)
        return path.resolve()
    except OSError:
        return Path(tempfile.mkdtemp(prefix=f"gpubroker-demo-{name}-"))


@dataclass
class Managed:
    """One started process; ``pid`` is also its process group id."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# util-linux's setpriv (Linux): a child started through it gets SIGTERM when the thread that
# started it dies, so a demo or simulation killed with SIGKILL leaves no redis-server behind.
_SETPRIV = shutil.which("setpriv") if sys.platform.startswith("linux") else None


def _dies_with_parent(argv: list[str]) -> list[str]:
    return [_SETPRIV, "--pdeathsig", "TERM", "--", *argv] if _SETPRIV else argv


class LocalCluster:
    """Starts processes with logs in ``logdir`` and stops all of them, whatever happened."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.redis: Managed | None = None
        self.procs: list[Managed] = []
        python_path = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)
        self.env = {**os.environ, "PYTHONPATH": python_path}

    # ---- starting -------------------------------------------------------------

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Managed:
        log = self.logdir / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(_dies_with_parent(argv), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env={**self.env, **(env or {})}, start_new_session=True)
        managed = Managed(name, proc, log)
        self.procs.append(managed)
        return managed

    def start_redis(self, timeout: float = 10.0) -> str:
        """A private redis-server on a free loopback port, without persistence; returns its URL."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise LocalClusterError("redis-server is not installed: apt-get install redis-server "
                                    "(or pass --redis-url to use a running Redis)")
        port = free_port()
        workdir = self.logdir / "redis"
        workdir.mkdir(exist_ok=True)
        self.redis = self.spawn("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
                                          "--save", "", "--appendonly", "no", "--protected-mode", "no"])
        url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(url, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    client.ping()
                    return url
                except redis.ConnectionError:
                    if self.redis.proc.poll() is not None or time.monotonic() > deadline:
                        raise LocalClusterError(f"redis-server did not start:\n{self.redis.log_tail()}") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def use(self, redis_url: str, pool: str) -> None:
        """Point every process started from now on at this Redis and pool."""
        self.env.update(GPUBROKER_REDIS_URL=redis_url, GPUBROKER_POOL=pool)

    def gpubroker(self, name: str, *args: str) -> Managed:
        """``gpubroker <args>`` (``python -m workers`` is the full CLI, worker included)."""
        return self.spawn(name, [sys.executable, "-m", "workers", *args])

    def flower(self, port: int, basic_auth: str) -> Managed:
        return self.spawn("flower", [sys.executable, "-m", "celery", "-A", "broker.celery_conf:app", "flower",
                                     f"--port={port}", "--address=127.0.0.1", f"--basic-auth={basic_auth}"])

    # ---- watching -------------------------------------------------------------

    def dead(self) -> list[Managed]:
        """Started processes that have exited (none should before ``stop``)."""
        return [m for m in self.procs if m.proc.poll() is not None]

    @staticmethod
    def http_up(url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=0.5) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    # ---- stopping -------------------------------------------------------------

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM every group, SIGKILL what is left after ``grace``; Redis goes last.

        Ctrl-C and SIGTERM are ignored meanwhile, so a second one cannot leave orphans behind.
        """
        main = threading.current_thread() is threading.main_thread()
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
        try:
            others = [m for m in self.procs if m is not self.redis]
            self._stop_groups(others, grace)
            if self.redis is not None:
                self._stop_groups([self.redis], grace)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    @staticmethod
    def _stop_groups(procs: list[Managed], grace: float) -> None:
        for m in procs:
            _killpg(m.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for m in procs:
            try:
                m.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        # Also when the leader is gone: pool children it left behind are still in its group.
        for m in procs:
            _killpg(m.pid, signal.SIGKILL)
            try:
                m.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@contextlib.contextmanager
def private_redis() -> Iterator[str]:
    """A redis-server of the simulation's own, without persistence; yields its URL."""
    workdir = Path(tempfile.mkdtemp(prefix="gpubroker-sim-"))
    cluster = LocalCluster(workdir)
    try:
        yield cluster.start_redis()
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
