"""Real processes for tests: a private redis-server, dispatchers and workers.

Nothing here fakes Redis or Celery; the suite starts, kills and restarts these
processes itself.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
GPUBROKER = [sys.executable, "-m", "workers"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def descendants(pid: int) -> list[int]:
    """``pid`` and every process under it (through /proc's children lists)."""
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        found.append(current)
        try:
            for thread in Path(f"/proc/{current}/task").iterdir():
                stack.extend(int(child) for child in (thread / "children").read_text().split())
        except OSError:
            pass
    return found


def signal_tree(pid: int, sig: int) -> list[int]:
    """Send ``sig`` to ``pid``'s process group and to every process under it (stopping the parent
    first, so none is started meanwhile); the pids signalled."""
    tree = descendants(pid)
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for member in tree:
        try:
            os.kill(member, sig)
        except ProcessLookupError:
            pass
    return tree


class RedisServer:
    """A redis-server of our own on a free loopback port, in its own directory."""

    def __init__(self, workdir: Path, *extra: str) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: apt-get install redis-server (make test does it)")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
                "--save", "", "--appendonly", "no", "--protected-mode", "no", *self.extra]
        self.proc = subprocess.Popen(args, stdout=(self.workdir / "redis.log").open("ab"), stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        wait_until(lambda: self._pings(client), 10, what="redis-server to accept connections")

    @staticmethod
    def _pings(client: redis.Redis) -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def restart(self) -> None:
        """kill -9, then start again on the same port and directory: it loads what it persisted."""
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class Processes:
    """Starts gpubroker processes with logs in a directory, and stops them all at the end."""

    def __init__(self, logdir: Path, redis_url: str, pool: str, env: dict[str, str] | None = None) -> None:
        self.logdir = logdir
        self.env = {**os.environ, "GPUBROKER_REDIS_URL": redis_url, "GPUBROKER_POOL": pool,
                    "PYTHONPATH": str(ROOT), **(env or {})}
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (self.logdir / f"{name}.log").open("ab")
        proc = subprocess.Popen([*GPUBROKER, *args], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**self.env, **(env or {})}, start_new_session=True)
        self.procs.append(proc)
        return proc

    def dispatcher(self, name: str = "dispatcher") -> subprocess.Popen[bytes]:
        return self.spawn(name, "dispatcher", "--log-level", "INFO")

    def worker(self, node: str, *args: str) -> subprocess.Popen[bytes]:
        return self.spawn(f"worker-{node}", "worker", "--node", node, *args)

    def log(self, name: str) -> str:
        return (self.logdir / f"{name}.log").read_text(errors="replace")

    @staticmethod
    def kill(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        """Signal the process and all it started (a worker, its pool children and their tasks,
        each task in a process group of its own), as a machine that dies or stops would."""
        signal_tree(proc.pid, sig)
        proc.wait(30)

    @staticmethod
    @contextmanager
    def paused(*procs: subprocess.Popen[bytes]) -> Iterator[None]:
        """SIGSTOP these process groups and SIGCONT them afterwards, so that nothing they run
        changes Redis while a test reads several keys (each Lua script ran wholly or not at all)."""
        stopped = []
        try:
            for proc in procs:
                stopped.extend(signal_tree(proc.pid, signal.SIGSTOP))
            yield
        finally:
            for pid in stopped:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                signal_tree(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill(proc)


@contextmanager
def processes(logdir: Path, redis_url: str, pool: str, env: dict[str, str] | None = None) -> Iterator[Processes]:
    procs = Processes(logdir, redis_url, pool, env)
    try:
        yield procs
    finally:
        procs.stop_all()


class StallingProxy:
    """A TCP proxy to ``port`` on loopback that can stop moving bytes without closing anything:
    a network partition as a worker sees it (no reset, no error; replies just never come)."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.port = free_port()
        self.moving = threading.Event()
        self.moving.set()
        self.closed = threading.Event()
        self.server = socket.create_server(("127.0.0.1", self.port))
        self.server.settimeout(0.2)
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def stall(self) -> None:
        self.moving.clear()

    def resume(self) -> None:
        self.moving.set()

    def close(self) -> None:
        self.closed.set()
        self.moving.set()
        self.server.close()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        src.settimeout(0.2)
        try:
            while not self.closed.is_set():
                self.moving.wait()
                try:
                    data = src.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                self.moving.wait()  # what was read while stalling is held back too
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.close()
                except OSError:
                    pass
