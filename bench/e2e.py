"""End to end: no-op tasks through gpubroker beside plain Celery, on one redis-server, one node,
the same worker concurrency, in one run.

Each side is started (its worker, and for gpubroker its dispatcher), warmed with one task, then
measured: ``--tasks`` no-op tasks submitted at once and timed until the last has a result
(tasks/s; Redis commands per task from ``INFO commandstats``, less the bench's own polling; CPU
per task of redis-server, the dispatcher, the worker's main process, its pool processes and the
bench itself, from /proc),
then ``--samples`` tasks submitted one at a time on the idle node, each waited for, for submit ->
start latency (the task returns the time its body started). Then it is stopped. Sides run in
interleaved repeats (A, B, C, A, B, C...) and the medians are printed with their ratios.

Every process logs at WARNING (Celery's default; plain Celery's worker with ``-l WARNING``,
gpubroker's dispatcher and worker with ``--log-level WARNING``): at INFO each side writes lines per
task, gpubroker more of them.

Sides: plain Celery with processes reused (Celery's default) and with ``max_tasks_per_child=1``;
gpubroker with CPU tasks (``gpus=0``) and with GPU-share tasks on a simulated GPU (``--gpus 1``),
with ``reuse=True`` and without (a fresh process per task). A fresh-process side runs
``--fresh-tasks`` tasks (it is slow by design) and takes no latency samples. gpubroker submits
with ``Client.submit_many``; plain Celery with ``apply_async`` in a loop (it has no batch submit).

    python -m bench.e2e [--tasks 2000] [--fresh-tasks 200] [--samples 200] [--repeats 3]
                        [--sides celery,celery-fresh,cpu,gpu-reuse,gpu-fresh]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from bench.dispatch import start_redis
from broker import Client
from broker.client import Submit
from broker.models import Resources
from broker.settings import Settings
from workers.unit import children

ROOT = Path(__file__).resolve().parent.parent
TASK = "bench.e2e.noop"
POOL = "bench"
CONCURRENCY = 2
GPU_SHARE = Resources(gpus=0.25)  # a share of the simulated GPU: both slots fit on it


TICK_S = 1 / os.sysconf("SC_CLK_TCK")
ROLES = ("redis-server", "dispatcher", "worker main", "pool processes", "bench")


def cpu_s(pid: int) -> float:
    """CPU seconds (user and system) a live process has used, from /proc (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) * TICK_S  # utime, stime


def commands(server: redis.Redis) -> int:
    """Commands the server has run so far (every database, every client)."""
    return sum(int(stats["calls"]) for name, stats in server.info("commandstats").items()
               if name.startswith("cmdstat_"))


@dataclass
class Side:
    """One system under test, as the bench drives it."""

    name: str
    port: int
    logdir: Path
    fresh: bool = False
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    polls: int = 0  # Redis commands the bench itself sent while waiting for results

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log = (self.logdir / f"{self.name}-{name}.log").open("ab")
        self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                           env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                                           start_new_session=True))

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
        self.procs.clear()

    def cpu(self, server_pid: int) -> dict[str, float]:
        """CPU seconds so far by role. The pool processes are those alive now (they are reused on
        these sides; a fresh-process side's ended ones are not counted)."""
        *rest, worker = self.procs
        return {"redis-server": cpu_s(server_pid), "dispatcher": sum(cpu_s(p.pid) for p in rest),
                "worker main": cpu_s(worker.pid), "pool processes": sum(map(cpu_s, children(worker.pid))),
                "bench": time.process_time()}

    def start(self) -> None: ...
    def submit(self, n: int) -> list[Any]: ...
    def done(self, handles: list[Any]) -> bool: ...
    def latency(self) -> float: ...

    def wait_all(self, handles: list[Any], timeout: float = 1800) -> None:
        deadline = time.monotonic() + timeout
        while not self.done(handles):
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.name}: tasks not done after {timeout}s (logs in {self.logdir})")
            time.sleep(0.01)


class Celery_(Side):
    def start(self) -> None:
        from bench.e2e_tasks import plain, plain_noop

        self.url = f"redis://127.0.0.1:{self.port}/1"
        plain.conf.broker_url = plain.conf.result_backend = self.url
        self.task, self.db = plain_noop, redis.Redis(port=self.port, db=1)
        argv = [sys.executable, "-m", "celery", "-A", "bench.e2e_tasks:plain", "worker", "-c", str(CONCURRENCY),
                "-P", "prefork", "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "WARNING"]
        self.spawn("worker", argv + (["--max-tasks-per-child", "1"] if self.fresh else []),
                   {"BENCH_PLAIN_URL": self.url})
        self.task.apply_async(args=[-1]).get(timeout=60)

    def submit(self, n: int) -> list[Any]:
        return [self.task.apply_async(args=[i]) for i in range(n)]

    def done(self, handles: list[Any]) -> bool:
        self.polls += 1
        if not self.db.exists(f"celery-task-meta-{handles[-1].id}"):
            return False
        self.polls += 1
        return bool(self.db.exists(*[f"celery-task-meta-{h.id}" for h in handles]) == len(handles))

    def latency(self) -> float:
        sent = time.time()
        return float(self.task.apply_async(args=[0]).get(timeout=60)) - sent


class Broker(Side):
    resources: Resources | None = None
    reuse: bool | None = None
    worker_args: tuple[str, ...] = ("--gpus", "0")
    handoff = "auto"  # GPUBROKER_HANDOFF: an ended task passes its place to a like head of the queue
    express = "true"  # GPUBROKER_EXPRESS: on an idle cluster a submit is placed from its wake-up

    def start(self) -> None:
        url = f"redis://127.0.0.1:{self.port}/0"
        env = {"GPUBROKER_REDIS_URL": url, "GPUBROKER_POOL": POOL, "GPUBROKER_HANDOFF": self.handoff,
               "GPUBROKER_EXPRESS": self.express}
        gpubroker = [sys.executable, "-m", "workers"]
        quiet = ["--log-level", "WARNING"]  # as plain Celery's worker runs here (and by default): -l WARNING
        self.spawn("dispatcher", [*gpubroker, "dispatcher", *quiet], env)
        self.spawn("worker", [*gpubroker, "worker", "--node", "bench-1", "--slots", str(CONCURRENCY), "--cpus", "2",
                              "--tasks", "bench.e2e_tasks", *quiet, *self.worker_args], env)
        self.client = Client(settings=Settings(redis_url=url, pool=POOL))
        deadline = time.monotonic() + 60
        while not [n for n in self.client.nodes() if n.state == "up"] and time.monotonic() < deadline:
            time.sleep(0.1)
        self.client.wait(self.client.submit(TASK, args=[-1], resources=self.resources, **self.options).id, 60)

    @property
    def options(self) -> dict[str, Any]:
        return {} if self.reuse is None else {"reuse": self.reuse}

    def submit(self, n: int) -> list[Any]:
        return self.client.submit_many([Submit(task_name=TASK, args=[i], resources=self.resources, **self.options)
                                        for i in range(n)])

    def done(self, handles: list[Any]) -> bool:
        keys, r = self.client.keys, self.client.redis
        self.polls += 1
        if r.hget(keys.task(handles[-1].id), "state") != b"SUCCEEDED":
            return False
        pipe = r.pipeline(transaction=False)
        for h in handles:
            pipe.hget(keys.task(h.id), "state")
        self.polls += len(handles)
        return all(state == b"SUCCEEDED" for state in pipe.execute())

    def latency(self) -> float:
        sent = time.time()
        status = self.client.wait(self.client.submit(TASK, args=[0], resources=self.resources,
                                                     **self.options).id, 60)
        return float(status.result) - sent

    def stop(self) -> None:
        self.client.close()
        super().stop()


class BrokerGpu(Broker):
    resources = GPU_SHARE
    worker_args = ("--gpus", "1", "--gpu-memory-mb", "80000")


class BrokerGpuReuse(BrokerGpu):
    reuse = True


class BrokerNever(Broker):
    handoff = "never"  # the dispatcher makes every placement


class BrokerGpuReuseNever(BrokerGpuReuse):
    handoff = "never"


class BrokerNoExpress(Broker):
    express = "false"  # every placement in a cycle, as before stop 27


SIDES: dict[str, tuple[type[Side], bool]] = {
    "celery": (Celery_, False), "celery-fresh": (Celery_, True),
    "cpu": (Broker, False), "gpu-reuse": (BrokerGpuReuse, False), "gpu-fresh": (BrokerGpu, True),
    "cpu-never": (BrokerNever, False), "gpu-reuse-never": (BrokerGpuReuseNever, False),
    "cpu-no-express": (BrokerNoExpress, False),
}
LABELS = {"celery": "plain Celery (processes reused)", "celery-fresh": "plain Celery, max_tasks_per_child=1",
          "cpu": "gpubroker, CPU tasks", "gpu-reuse": "gpubroker, GPU share, reuse=True",
          "gpu-fresh": "gpubroker, GPU share, fresh process", "cpu-never": "gpubroker, CPU tasks, handoff never",
          "gpu-reuse-never": "gpubroker, GPU share, reuse, handoff never",
          "cpu-no-express": "gpubroker, CPU tasks, express off"}


@dataclass
class Figures:
    rates: list[float] = field(default_factory=list)
    calls: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    cpu: dict[str, list[float]] = field(default_factory=dict)  # role -> ms of CPU per task, per repeat


def measure(side: Side, server: redis.Redis, server_pid: int, n: int, samples: int, figures: Figures) -> None:
    side.start()
    try:
        side.polls = 0
        before, cpu = commands(server), side.cpu(server_pid)
        t0 = time.perf_counter()
        handles = side.submit(n)
        side.wait_all(handles)
        elapsed = time.perf_counter() - t0
        after = side.cpu(server_pid)
        figures.rates.append(n / elapsed)
        figures.calls.append((commands(server) - before - side.polls - 1) / n)
        for role in ROLES:
            figures.cpu.setdefault(role, []).append((after[role] - cpu[role]) / n * 1000)
        for _ in range(samples):
            figures.latencies.append(side.latency())
    finally:
        side.stop()
        server.flushall()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def report(figures: dict[str, Figures], opts: argparse.Namespace, version: str) -> None:
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at the end, "
          f"redis-server {version}; concurrency {CONCURRENCY}, {opts.repeats} interleaved repeats, medians (min-max)")
    rate = {name: statistics.median(f.rates) for name, f in figures.items()}
    print(f"  {'side':<38} {'tasks':>6} {'tasks/s':>18} {'x Celery':>9} {'x fresh':>8} {'cmds/task':>10} "
          f"{'submit->start p50/p95/p99 ms':>30}")
    for name, f in figures.items():
        n = opts.fresh_tasks if SIDES[name][1] else opts.tasks
        lat = (f"{percentile(f.latencies, 50) * 1e3:.1f} / {percentile(f.latencies, 95) * 1e3:.1f} / "
               f"{percentile(f.latencies, 99) * 1e3:.1f}" if f.latencies else "-")
        vs = [f"{rate[name] / rate[b]:.2f}x" if b in rate else "-" for b in ("celery", "celery-fresh")]
        print(f"  {LABELS[name]:<38} {n:>6} {rate[name]:>7,.1f} ({min(f.rates):,.0f}-{max(f.rates):,.0f})"
              f" {vs[0]:>9} {vs[1]:>8} {statistics.median(f.calls):>10.1f} {lat:>30}")
    print("CPU per task during the batch, ms (medians; the bench: submitting and waiting for results):")
    print(f"  {'side':<38} " + " ".join(f"{role:>15}" for role in (*ROLES, "total")))
    for name, f in figures.items():
        ms = [statistics.median(f.cpu[role]) for role in ROLES]
        print(f"  {LABELS[name]:<38} " + " ".join(f"{v:>15.2f}" for v in (*ms, sum(ms))))
    targets(figures, rate)


#: Sides with processes reused: issue 14's end-to-end and latency targets are theirs.
REUSED = ("cpu", "gpu-reuse", "cpu-never", "gpu-reuse-never")


def targets(figures: dict[str, Figures], rate: dict[str, float]) -> None:
    def say(what: str, ok: bool, detail: str) -> None:
        print(f"  target {what}: {'met' if ok else 'NOT met'} ({detail})")

    print("issue 14 targets:")
    if "celery" in rate:
        for side in REUSED:
            if side in rate:
                ratio = rate[side] / rate["celery"]
                say(f"{side} end to end >= 0.9x Celery (reused)", ratio >= 0.9, f"{ratio:.2f}x")
    if "celery-fresh" in rate and "gpu-fresh" in rate:
        ratio = rate["gpu-fresh"] / rate["celery-fresh"]
        say("fresh-process GPU >= 2x Celery max_tasks_per_child=1", ratio >= 2, f"{ratio:.2f}x")
    if "celery" in figures and figures["celery"].latencies:
        base = figures["celery"].latencies
        for side in REUSED:
            if side in figures and figures[side].latencies:
                lat = figures[side].latencies
                p50 = (percentile(lat, 50) - percentile(base, 50)) * 1e3
                p99 = (percentile(lat, 99) - percentile(base, 99)) * 1e3
                say(f"{side} submit->start p50 <= Celery + 3 ms", p50 <= 3, f"{p50:+.1f} ms")
                say(f"{side} submit->start p99 <= Celery p99 + 10 ms", p99 <= 10, f"{p99:+.1f} ms")


def main(argv: list[str] | None = None, extra: dict[str, tuple[type[Side], bool]] | None = None,
         emit: Callable[[dict[str, Figures], argparse.Namespace, str], None] = report) -> None:
    SIDES.update(extra or {})
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--fresh-tasks", type=int, default=200)
    parser.add_argument("--samples", type=int, default=200, help="latency samples per repeat (reused sides)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sides", default=",".join(SIDES))
    opts = parser.parse_args(argv)
    chosen = [s for s in opts.sides.split(",") if s]
    unknown = [s for s in chosen if s not in SIDES]
    if unknown:
        raise SystemExit(f"--sides: unknown {unknown}; choose from {sorted(SIDES)}")
    figures = {name: Figures() for name in chosen}
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        proc, port = start_redis(Path(tmp))
        server = redis.Redis(port=port)
        try:
            for _ in range(opts.repeats):
                for name in chosen:
                    cls, fresh = SIDES[name]
                    side = cls(name=name, port=port, logdir=Path(tmp), fresh=fresh)
                    measure(side, server, proc.pid, opts.fresh_tasks if fresh else opts.tasks,
                            0 if fresh else opts.samples, figures[name])
            version = server.info("server")["redis_version"]
        finally:
            proc.terminate()
            proc.wait()
    emit(figures, opts, version)


if __name__ == "__main__":
    main()
