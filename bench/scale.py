"""How dispatch scales (issue 14): placements/s over a matrix of (pending tasks, nodes), the
time ``gpubroker queue --json`` takes for 10,000 rows, and Redis memory per pending task.

Each dispatch case runs ``bench.dispatch``'s measurement on a fresh redis-server: every task
is a 1-GPU task, every node has 8 GPUs; cycles place until the cluster is full, everything
reserved is finished, and so on until nothing is pending. Cost per placement is cycle time
(and CPU: Python and redis-server) over placements; the ratio is to the first case (1k tasks
x 10 nodes), issue 14's target being within 1.5x at 10,000 nodes and with 1M pending. Each
case runs ``--repeats`` times and the medians are printed: the figures are wall time on a
machine that may be shared.

Each case is measured twice. The dispatcher's periodic work (a full pass for preemption and
the queue view at most every explain_interval_s and 10x its own last cost, the queue count for
the metrics every few seconds) is due by its clock. On the wall clock ("wall clock") it falls
due at this bench's pace: finishing every reserved task between two cycles takes seconds, so
a full pass runs every other cycle. With ``bench.dispatch.BusyClock`` ("back to back") the
clock runs only during cycles, so that work comes as often as for a dispatcher that cycles
back to back, as it does while workers finish tasks as fast as it places them: the rate it
holds.

    python -m bench.scale [--cases 1k/10,10k/100,100k/1k,100k/10k,1M/1k] [--repeats 3] [--skip-queue]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

from bench.dispatch import BusyClock, bench_settings, dispatch_all, start_redis, submit_all
from broker.dispatcher import Dispatcher
from broker.settings import Settings
from broker.store.keys import PoolKeys
from broker.store.scripts import Scripts, wall_clock_ms

CASES = {"1k/10": (1_000, 10), "10k/100": (10_000, 100), "100k/1k": (100_000, 1_000),
         "100k/10k": (100_000, 10_000), "1M/1k": (1_000_000, 1_000)}
GPUS = 8
#: How the periodic work (full pass, queue count) is timed: on the wall clock, it falls due at
#: this bench's pace (seconds of finishing between cycles); on a BusyClock, at the cadence of a
#: dispatcher cycling back to back, as it does while tasks finish as fast as it places them.
CADENCE = {False: "wall clock", True: "back to back"}


def _fresh(tmp: Path) -> tuple[subprocess.Popen[bytes], int, redis.Redis, Scripts, Settings]:
    proc, port = start_redis(tmp)
    client = redis.Redis(port=port)
    settings = bench_settings(port)
    return proc, port, client, Scripts(client, PoolKeys("bench")), settings


def _register(scripts: Scripts, n_nodes: int) -> list[str]:
    nodes = [f"n{i:05d}" for i in range(n_nodes)]
    for node in nodes:
        scripts.register(node, "bench", 24 * 3600 * 1000, GPUS, 81920, 128_000, 1 << 20, GPUS, {})
    return nodes


def dispatch_case(tasks: int, n_nodes: int, busy: bool = False) -> dict[str, float]:
    """One dispatch run: per-placement wall and CPU cost, and the snapshot/plan/commit split.
    ``busy``: the dispatcher's clock runs only during its cycles (``BusyClock``)."""
    with tempfile.TemporaryDirectory() as tmp:
        proc, _port, client, scripts, settings = _fresh(Path(tmp))
        try:
            nodes = _register(scripts, n_nodes)
            submit_all(scripts, tasks)
            clock = BusyClock() if busy else None
            dispatcher = Dispatcher(settings, clock or wall_clock_ms, client)
            run = dispatch_all(dispatcher, client, scripts, nodes, tasks, clock)
        finally:
            proc.terminate()
            proc.wait()
    first_placed, first_s = run.first_cycle  # the first also reads every node's registration (FreeView)
    held = (run.placed - first_placed) / (run.dispatch_s - first_s) if run.cycles > 1 else run.placed / run.dispatch_s
    out = {"rate": run.placed / run.dispatch_s, "held": held, "us": run.dispatch_s / run.placed * 1e6,
           "py_us": run.python_cpu_s / run.placed * 1e6, "redis_us": run.redis_cpu_s / run.placed * 1e6,
           "cycles": run.cycles}
    out.update({phase[2:]: s / run.placed * 1e6 for phase, s in run.phases.items()})
    return out


def _cycle_ms(dispatcher: Dispatcher, cycles: int, before: Callable[[], object] = lambda: None) -> float:
    """Median wall milliseconds of ``cycles`` dispatcher cycles, ``before`` run ahead of each."""
    times = []
    for _ in range(cycles):
        before()
        t0 = time.perf_counter()
        dispatcher.run_cycle()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def cycle_costs(n_nodes: int = 10_000, blocked: int = 10_000, cycles: int = 15) -> dict[str, float]:
    """Milliseconds per cycle at ``n_nodes`` idle 8-GPU nodes: nothing changed; one task submitted
    (placed); and, on a cluster whose GPUs are all taken, ``blocked`` GPU tasks waiting."""
    with tempfile.TemporaryDirectory() as tmp:
        proc, _port, client, scripts, settings = _fresh(Path(tmp))
        try:
            _register(scripts, n_nodes)
            dispatcher = Dispatcher(settings, client=client)
            dispatcher.run_cycle()
            out = {"idle": _cycle_ms(dispatcher, cycles), "one": _cycle_ms(dispatcher, cycles,
                                                                           lambda: submit_all(scripts, 1))}
        finally:
            proc.terminate()
            proc.wait()
    with tempfile.TemporaryDirectory() as tmp:
        proc, _port, client, scripts, settings = _fresh(Path(tmp))
        try:
            for node in [f"n{i:03d}" for i in range(100)]:  # one GPU each, slots to spare
                scripts.register(node, "bench", 24 * 3600 * 1000, 1, 81920, 128_000, 1 << 20, 8, {})
            submit_all(scripts, blocked + 100)
            dispatcher = Dispatcher(settings, client=client)
            dispatcher.run_cycle()  # places 100: the cluster is full
            dispatcher.run_cycle()  # its own reservations changed capacity: reads the window once more
            out["blocked"] = _cycle_ms(dispatcher, cycles)
        finally:
            proc.terminate()
            proc.wait()
    return out


def queue_json_seconds(rows: int = 10_000) -> tuple[float, float, int]:
    """(seconds ``gpubroker queue --json`` takes, of which Python start-up, bytes printed) over
    ``rows`` pending tasks."""
    gpubroker = Path(sys.executable).with_name("gpubroker")
    with tempfile.TemporaryDirectory() as tmp:
        proc, port, _client, scripts, _settings = _fresh(Path(tmp))
        try:
            _register(scripts, 1)
            submit_all(scripts, rows)
            base = [str(gpubroker), "queue", "--json", "--redis-url", f"redis://127.0.0.1:{port}/0", "--pool", "bench"]
            t0 = time.perf_counter()
            subprocess.run([str(gpubroker), "--help"], check=True, capture_output=True)
            startup = time.perf_counter() - t0
            t0 = time.perf_counter()
            done = subprocess.run(base, check=True, capture_output=True)
            seconds = time.perf_counter() - t0
        finally:
            proc.terminate()
            proc.wait()
    if len(json.loads(done.stdout)) != rows:
        raise SystemExit("queue --json did not list every pending task")
    return seconds, startup, len(done.stdout)


def memory_per_pending(tasks: int = 10_000) -> dict[str, int]:
    """Redis memory per pending task: the INFO used_memory delta over ``tasks`` submits, and
    MEMORY USAGE of one task's keys and entries."""
    with tempfile.TemporaryDirectory() as tmp:
        proc, _port, client, scripts, _settings = _fresh(Path(tmp))
        try:
            _register(scripts, 1)
            submit_all(scripts, 1)  # the pool's own keys exist before measuring
            before = int(client.info("memory")["used_memory"])
            submit_all(scripts, tasks)
            after = int(client.info("memory")["used_memory"])
            keys = scripts.keys
            task_id = client.zrange(keys.pending, 0, 0)[0].decode()
            task_hash = int(client.memory_usage(keys.task(task_id)) or 0)
            message = len(client.hget(keys.task(task_id), "message") or b"")
            request = len(client.hget(keys.requests, task_id) or b"")
        finally:
            proc.terminate()
            proc.wait()
    return {"per_task": (after - before) // tasks, "task_hash": task_hash, "message": message, "request": request}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-queue", action="store_true", help="only the dispatch matrix")
    opts = parser.parse_args()
    names = [c.strip() for c in opts.cases.split(",") if c.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"--cases: unknown {', '.join(unknown)}; choose from {', '.join(CASES)}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}; medians of {opts.repeats}")
    base: dict[bool, float] = {}
    for name in names:
        tasks, nodes = CASES[name]
        for busy in (False, True):
            runs = [dispatch_case(tasks, nodes, busy) for _ in range(opts.repeats)]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            first = base.setdefault(busy, med["us"])
            phases = ", ".join(f"{k} {med[k]:.1f}" for k in ("reap", "snapshot", "plan", "commit", "record")
                               if k in med)
            print(f"dispatch {tasks:>9,} tasks x {nodes:>6,} nodes, {CADENCE[busy]}: {med['rate']:>8,.0f} placements/s,"
                  " "
                  f"{med['us']:.1f} us/placement ({med['us'] / first:.2f}x the first case; "
                  f"CPU: Python {med['py_us']:.1f} us, redis {med['redis_us']:.1f} us; per phase, us: {phases}; "
                  f"{med['cycles']:.0f} cycles; after the first cycle, which reads every node whole: "
                  f"{med['held']:,.0f}/s)", flush=True)
    if opts.skip_queue:
        return
    costs = [cycle_costs() for _ in range(opts.repeats)]
    idle, one, blocked = (statistics.median(c[k] for c in costs) for k in ("idle", "one", "blocked"))
    print(f"cycle at 10,000 idle nodes: {idle:.1f} ms with nothing changed, {one:.1f} ms placing one new task; "
          f"with 10,000 GPU tasks waiting on a full cluster: {blocked:.1f} ms a cycle")
    runs_q = [queue_json_seconds() for _ in range(opts.repeats)]
    seconds, startup = statistics.median(r[0] for r in runs_q), statistics.median(r[1] for r in runs_q)
    print(f"gpubroker queue --json, 10,000 rows: {seconds:.2f}s ({startup:.2f}s of it the CLI's start-up, "
          f"as `gpubroker --help` takes; {runs_q[0][2]:,} bytes)")
    mem = memory_per_pending()
    print(f"Redis memory per pending task: {mem['per_task']:,} bytes (INFO used_memory delta over 10,000 submits); "
          f"task hash {mem['task_hash']:,} bytes (MEMORY USAGE), of it the Celery message {mem['message']} "
          f"and the request {mem['request']} (also in `P requests`)")


if __name__ == "__main__":
    main()
