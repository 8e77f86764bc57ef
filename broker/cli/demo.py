"""``gpubroker demo`` / ``make demo``: a local cluster running a mixed GPU workload, watched live.

1 start     a private redis-server (unless a URL is given), a dispatcher, three simulated
            nodes of different shapes and Flower, each in its own process group
2 ready     wait until the three nodes are registered and Flower answers
3 submit    a mixed workload of ``workers.tasks.probe`` tasks (fixed seed)
4 watch     a live view of the queue, per-GPU use and task states until every task is final
5 summary   final states, waits, runtimes and GPU utilisation
  keep      with --keep: everything stays up, the URLs printed last, until Ctrl-C / SIGTERM
6 stop      every process it started, also on Ctrl-C / SIGTERM (exit code 130)
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from broker.cli import views
from broker.client import Client
from broker.errors import GpuBrokerError
from broker.models import MILLI, NodeView, Resources, TaskState, TaskStatus
from broker.sim.localcluster import LocalCluster, LocalClusterError, Managed, free_port, make_logdir

DEFAULT_POOL = "demo"
DEFAULT_FLOWER_AUTH = "admin:gpubroker"
SEED = 20240601
PROBE = "workers.tasks.probe"

#: node id -> ``gpubroker worker`` options. Slots are generous so tasks run side by side.
NODES: dict[str, list[str]] = {
    "h100x8": ["--gpus", "8", "--gpu-memory-mb", "81920", "--cpus", "64", "--memory-mb", "524288",
               "--slots", "10", "--label", "gpu_model=H100"],
    "a100x4": ["--gpus", "4", "--gpu-memory-mb", "40960", "--cpus", "32", "--memory-mb", "262144",
               "--slots", "6", "--label", "gpu_model=A100"],
    "cpu16": ["--gpus", "0", "--cpus", "16", "--memory-mb", "65536", "--slots", "4", "--label", "gpu_model=none"],
}

#: The workload's shapes, cycled so that even a short run has each kind once (then shuffled).
SHAPES: list[tuple[str, Resources]] = [
    ("1 GPU", Resources(gpus=1, cpus=4, memory_mb=16384)),
    ("0.5 GPU", Resources(gpus=0.5, cpus=2)),
    ("CPU only", Resources(cpus=2, memory_mb=4096)),
    ("2 GPUs", Resources(gpus=2, cpus=8)),
    ("0.25 GPU", Resources(gpus=0.25, cpus=1)),
    ("4 GPUs", Resources(gpus=4, cpus=16)),
    ("1 GPU on A100", Resources(gpus=1, cpus=4, labels={"gpu_model": "A100"})),
    ("8 GPUs", Resources(gpus=8, cpus=32)),
    ("0.25 GPU on H100", Resources(gpus=0.25, cpus=1, labels={"gpu_model": "H100"})),
    ("1 GPU", Resources(gpus=1, cpus=4)),
    ("CPU only", Resources(cpus=1)),
    ("0.5 GPU", Resources(gpus=0.5, cpus=2, labels={"gpu_model": "A100"})),
]
TENANTS = ["research", "inference", "students"]
PRIORITIES = [0, 0, 1, 5, 10]


@dataclass(frozen=True)
class Job:
    """One task of the workload as submitted."""

    kind: str
    resources: Resources
    seconds: float
    priority: int
    tenant: str


def workload(n_tasks: int, seed: int = SEED) -> list[Job]:
    rng = random.Random(seed)
    jobs = []
    for i in range(n_tasks):
        kind, resources = SHAPES[i % len(SHAPES)]
        jobs.append(Job(kind, resources, seconds=round(rng.uniform(0.2, 2.0), 1),
                        priority=rng.choice(PRIORITIES), tenant=rng.choice(TENANTS)))
    rng.shuffle(jobs)
    return jobs


def gpu_amount(resources: Resources) -> float:
    """GPUs a task holds: whole ones, or its share of one."""
    return resources.whole_gpus or resources.gpu_milli / MILLI


# ---- summary (pure) --------------------------------------------------------------------


@dataclass
class Summary:
    by_state: Counter[str]
    wait_s: list[float]  # started_at - submitted_at: queueing plus handoff to the worker
    reserve_wait_s: list[float]  # reserved_at - submitted_at: queueing only
    runtime_s: list[float]  # finished_at - started_at
    makespan_s: float  # first submit to last finish
    gpu_seconds_used: float  # Σ GPUs held (shares by their fraction) x runtime
    gpu_seconds_available: float  # GPUs in the pool x makespan

    @property
    def utilisation(self) -> float:
        return self.gpu_seconds_used / self.gpu_seconds_available if self.gpu_seconds_available else 0.0


def summarize(statuses: Sequence[TaskStatus], total_gpus: int) -> Summary:
    wait, reserve_wait, runtime, gpu_seconds, finishes = [], [], [], 0.0, []
    for s in statuses:
        if s.reserved_at is not None:
            reserve_wait.append(s.reserved_at - s.submitted_at)
        if s.started_at is not None:
            wait.append(s.started_at - s.submitted_at)
            if s.finished_at is not None:
                runtime.append(s.finished_at - s.started_at)
                gpu_seconds += gpu_amount(s.resources) * runtime[-1]
        if s.finished_at is not None:
            finishes.append(s.finished_at)
    makespan = max(finishes) - min(s.submitted_at for s in statuses) if finishes else 0.0
    return Summary(by_state=Counter(s.state.value for s in statuses), wait_s=wait, reserve_wait_s=reserve_wait,
                   runtime_s=runtime, makespan_s=makespan, gpu_seconds_used=gpu_seconds,
                   gpu_seconds_available=total_gpus * makespan)


def summary_table(summary: Summary, n_tasks: int) -> Table:
    def mean(values: list[float]) -> str:
        return f"{statistics.fmean(values):.2f} s" if values else "-"

    table = Table(title="Summary", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    for state in TaskState:
        if summary.by_state[state.value]:
            table.add_row(f"tasks {state.value}", f"{summary.by_state[state.value]}/{n_tasks}")
    unfinished = n_tasks - sum(summary.by_state[s.value] for s in TaskState if s.is_final)
    if unfinished:
        table.add_row("tasks not final at timeout", str(unfinished))
    table.add_row("wait, mean (started_at - submitted_at)", mean(summary.wait_s))
    table.add_row("wait, max", f"{max(summary.wait_s):.2f} s" if summary.wait_s else "-")
    table.add_row("queueing, mean (reserved_at - submitted_at)", mean(summary.reserve_wait_s))
    table.add_row("runtime, mean (finished_at - started_at)", mean(summary.runtime_s))
    table.add_row("makespan (first submit to last finish)", f"{summary.makespan_s:.2f} s")
    table.add_row("GPU utilisation (GPU-s used / GPU-s available)",
                  f"{summary.utilisation:.0%} ({summary.gpu_seconds_used:.1f} / {summary.gpu_seconds_available:.1f})")
    return table


# ---- live view -------------------------------------------------------------------------


def state_counts(states: dict[str, TaskState]) -> str:
    counts = Counter(s.value for s in states.values())
    return "  ".join(f"{state.value} {counts[state.value]}" for state in TaskState if counts[state.value])


def gpus_busy(nodes: Sequence[NodeView]) -> float:
    return sum(1 - g.free_milli / MILLI for n in nodes for g in n.gpus)


def live_view(client: Client, states: dict[str, TaskState], elapsed: float, flower: str | None) -> Group:
    nodes, queue = client.nodes(), client.queue(limit=len(states))
    header = Text.assemble((f"gpubroker demo  {elapsed:5.1f}s  ", "bold"), state_counts(states),
                           f"   GPUs busy {gpus_busy(nodes):g}/{sum(len(n.gpus) for n in nodes)}")
    parts: list[Any] = [header, views.nodes_table(nodes), views.queue_table(queue, limit=10)]
    if flower:
        parts.append(Text(f"Flower: {flower}", style="dim"))
    return Group(*parts)


def progress_line(client: Client, states: dict[str, TaskState], elapsed: float) -> str:
    nodes = client.nodes()
    return (f"[{elapsed:6.1f}s] {state_counts(states)} | pending queue {len(client.queue(limit=len(states)))}"
            f" | GPUs busy {gpus_busy(nodes):g}/{sum(len(n.gpus) for n in nodes)}")


# ---- the run ---------------------------------------------------------------------------


class DemoRun:
    """One run: the processes it started, its deadline, and the console it reports on."""

    def __init__(self, cluster: LocalCluster, console: Console, timeout: float) -> None:
        self.cluster = cluster
        self.console = console
        self.deadline = time.monotonic() + timeout
        self.flower: Managed | None = None
        self.flower_url: str | None = None
        self.auth = ""

    def start(self, redis_url: str | None, with_flower: bool) -> tuple[str, str]:
        """Phase 1: start everything; returns the Redis URL and pool the demo uses."""
        if redis_url is None:
            redis_url = self.cluster.start_redis()
        pool = os.environ.get("GPUBROKER_POOL") or DEFAULT_POOL
        self.cluster.use(redis_url, pool)
        self.cluster.gpubroker("dispatcher", "dispatcher")
        for node_id, options in NODES.items():
            self.cluster.gpubroker(f"worker-{node_id}", "worker", "--node", node_id, *options)
        auth = self.auth = os.environ.get("FLOWER_BASIC_AUTH") or DEFAULT_FLOWER_AUTH
        if with_flower:
            port = free_port()
            self.flower, self.flower_url = self.cluster.flower(port, auth), f"http://127.0.0.1:{port}"
        self.plain(f"Redis {redis_url}, pool {pool!r}; logs in {self.cluster.logdir}")
        for managed in self.cluster.procs:
            self.plain(f"  started {managed.name:<16} pid {managed.pid:<8} log {managed.log}")
        if self.flower_url:
            self.plain(f"Flower: {self.flower_url}  (basic auth {auth})")
        return redis_url, pool

    def plain(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def check_alive(self) -> None:
        """A dead dispatcher or worker would stall the run until the timeout: fail now instead."""
        for managed in self.cluster.dead():
            if managed is not self.flower:
                raise LocalClusterError(f"{managed.name} exited with code {managed.proc.returncode}; "
                                        f"last lines of {managed.log}:\n{managed.log_tail()}")

    def wait_ready(self, client: Client) -> None:
        """Phase 2: the three nodes must register; Flower gets up to a minute, then the demo goes on without."""
        flower_deadline = min(self.deadline, time.monotonic() + 60)
        with self.console.status("waiting for the dispatcher, three nodes and Flower ..."):
            while True:
                self.check_alive()
                up = {n.id for n in client.nodes() if n.state == "up"}
                flower_ready = self.flower_url is None or self.cluster.http_up(f"{self.flower_url}/healthcheck")
                flower_gone = self.flower is not None and self.flower.proc.poll() is not None
                if set(NODES) <= up and (flower_ready or flower_gone or time.monotonic() > flower_deadline):
                    break
                if time.monotonic() > self.deadline:
                    raise LocalClusterError(f"nodes not up before the timeout (up: {sorted(up) or 'none'})")
                time.sleep(0.2)
        if not flower_ready and self.flower is not None:
            self.plain(f"Flower did not come up; going on without it (see {self.flower.log})")
            self.flower_url = None

    def submit(self, client: Client, n_tasks: int) -> list[str]:
        """Phase 3."""
        jobs = workload(n_tasks)
        ids = [client.submit(PROBE, kwargs={"seconds": job.seconds}, resources=job.resources, priority=job.priority,
                             tenant=job.tenant, estimated_runtime_s=job.seconds).id for job in jobs]
        kinds = Counter(job.kind for job in jobs)
        self.plain(f"submitted {n_tasks} probe tasks: " + ", ".join(f"{c}x {k}" for k, c in kinds.items()))
        return ids

    def watch(self, client: Client, ids: list[str], live: bool) -> None:
        """Phase 4: poll ~4 times a second until every task is final or the deadline passes."""
        states: dict[str, TaskState] = dict.fromkeys(ids, TaskState.PENDING)
        t0 = time.monotonic()

        def poll() -> bool:
            self.check_alive()
            for task_id, state in states.items():
                if not state.is_final:
                    states[task_id] = client.status(task_id).state
            return all(s.is_final for s in states.values()) or time.monotonic() > self.deadline

        if live:
            with Live(console=self.console, refresh_per_second=4) as view:
                while True:
                    done = poll()
                    view.update(live_view(client, states, time.monotonic() - t0, self.flower_url))
                    if done:
                        return
                    time.sleep(0.25)
        last_line = 0.0
        while True:
            done = poll()
            if done or time.monotonic() - last_line >= 1:
                self.plain(progress_line(client, states, time.monotonic() - t0))
                last_line = time.monotonic()
            if done:
                return
            time.sleep(0.25)

    def finish(self, client: Client, ids: list[str]) -> int:
        """Phase 5: cancel what timed out, print the summary; 0 if every task SUCCEEDED."""
        statuses = [client.status(task_id) for task_id in ids]
        for status in statuses:
            if not status.state.is_final:  # leave nothing queued behind in a shared Redis
                client.cancel(status.id)
        total_gpus = sum(len(n.gpus) for n in client.nodes() if n.id in NODES)
        summary = summarize(statuses, total_gpus)
        self.console.print(summary_table(summary, len(ids)))
        succeeded = summary.by_state[TaskState.SUCCEEDED.value]
        self.plain(f"{succeeded}/{len(ids)} tasks succeeded")
        return 0 if succeeded == len(ids) else 1

    def keep_up(self, redis_url: str, pool: str) -> None:
        """With --keep: leave the cluster and Flower up to look at, until Ctrl-C or SIGTERM. The
        URLs come last, where the user looks (the issue: they were dead by the time they were read)."""
        self.plain(f"Keeping the cluster up; Ctrl-C stops it. Try: GPUBROKER_REDIS_URL={redis_url} "
                   f"GPUBROKER_POOL={pool} gpubroker nodes")
        self.plain(f"Redis: {redis_url}  pool {pool!r}")
        if self.flower_url:
            self.plain(f"Flower: {self.flower_url}  (basic auth {self.auth})")
        while True:
            signal.pause()  # SIGINT / SIGTERM raise KeyboardInterrupt here


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Let SIGTERM unwind like Ctrl-C, so the cleanup in ``run_demo`` runs for both; and Ctrl-C
    itself, also when the demo was started with SIGINT ignored (a shell's background job inherits
    it so, and Python then leaves it ignored: the kept cluster never stopped)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    previous: Callable[..., Any] | int | None = signal.signal(signal.SIGTERM, interrupt)
    previous_int: Callable[..., Any] | int | None = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def run_demo(redis_url: str | None, n_tasks: int, with_flower: bool, live: bool, timeout: float,
             keep: bool = False) -> int:
    """Run the demo; 0 if every task SUCCEEDED, 1 otherwise, 130 if interrupted (with ``keep``:
    only before the summary; the Ctrl-C that ends a kept cluster is its normal end)."""
    console = Console()
    if n_tasks < 1:
        console.print("[red]error:[/] --tasks must be at least 1")
        return 2
    cluster = LocalCluster(make_logdir())
    with sigterm_as_interrupt():
        try:
            demo = DemoRun(cluster, console, timeout)
            url, pool = demo.start(redis_url, with_flower)
            with Client(url, pool=pool) as client:
                demo.wait_ready(client)
                ids = demo.submit(client, n_tasks)
                demo.watch(client, ids, live)
                code = demo.finish(client, ids)
            if keep:
                try:
                    demo.keep_up(url, pool)
                except KeyboardInterrupt:
                    console.print()
            return code
        except KeyboardInterrupt:
            console.print("\n[yellow]interrupted[/]: stopping every process the demo started")
            return 130
        except GpuBrokerError as exc:
            console.print(f"[red]demo failed:[/] {exc}", highlight=False)
            return 1
        finally:
            cluster.stop()
            console.print(f"stopped {len(cluster.procs)} processes; logs in {cluster.logdir}",
                          markup=False, highlight=False, soft_wrap=True)
