"""Warm affinity (issue 14): hit rate and time per task with it and without.

A small cluster of simulated GPU nodes serves ``--models`` "models" (``bench.affinity_tasks``:
each a ``reuse=True`` task name; a pool process loads its model, ``--load-s``, when the one it
holds is another, then answers in ``--serve-s``). Requests come one at a time, each for a model
drawn at random (seeded), and each is waited for: the time per task is submit to result. Both
sides run the same requests on a fresh redis-server, dispatcher and workers: "affinity" with
``GPUBROKER_WARM_AFFINITY=true`` (workers publish their warm GPU sets, the dispatcher sends a
task where its name is warm), "no affinity" with it false (placed on the first free GPUs). Warm
hits and misses are the workers' own counts (``P warmstarts``); loads are the tasks' own word.

    python -m bench.affinity [--nodes 2] [--gpus 2] [--slots 2] [--models 4] [--requests 80]
                             [--load-s 0.5] [--serve-s 0.02] [--repeats 1] [--seed 7]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis

from bench.dispatch import start_redis
from bench.e2e import Side, percentile
from broker import Client, Resources
from broker.settings import Settings
from broker.store import warm_map

POOL = "bench"
SIDES = {"affinity": "true", "no affinity": "false"}


class Cluster(Side):
    """A dispatcher and ``nodes`` workers, warm affinity on or off."""

    def start_cluster(self, opts: argparse.Namespace, affinity: str) -> Client:
        url = f"redis://127.0.0.1:{self.port}/0"
        env = {"GPUBROKER_REDIS_URL": url, "GPUBROKER_POOL": POOL, "GPUBROKER_WARM_AFFINITY": affinity,
               "BENCH_LOAD_S": str(opts.load_s), "BENCH_SERVE_S": str(opts.serve_s)}
        gpubroker = [sys.executable, "-m", "workers"]
        self.spawn("dispatcher", [*gpubroker, "dispatcher"], env)
        for i in range(opts.nodes):
            self.spawn(f"worker-{i}", [*gpubroker, "worker", "--node", f"node-{i}", "--gpus", str(opts.gpus),
                                       "--gpu-memory-mb", "80000", "--slots", str(opts.slots), "--cpus", "2",
                                       "--tasks", "bench.affinity_tasks"], env)
        client = Client(settings=Settings(redis_url=url, pool=POOL))
        deadline = time.monotonic() + 60
        while len([n for n in client.nodes() if n.state == "up"]) < opts.nodes:
            if time.monotonic() > deadline:
                raise SystemExit(f"nodes not up after 60 s (logs in {self.logdir})")
            time.sleep(0.1)
        return client


def run_side(name: str, port: int, logdir: Path, opts: argparse.Namespace, models: list[int],
             figures: dict[str, list[float]]) -> None:
    side = Cluster(name=name.replace(" ", "-"), port=port, logdir=logdir)
    client = side.start_cluster(opts, SIDES[name])
    try:
        times, loads = [], 0
        for model in models:
            sent = time.perf_counter()
            status = client.wait(client.submit(f"bench.affinity.model{model}", resources=Resources(gpus=1)).id, 120)
            times.append(time.perf_counter() - sent)
            if status.result is None:
                raise SystemExit(f"{name}: a task did not succeed ({status.state}, {status.error})")
            loads += bool(status.result["loaded"])
        time.sleep(1.0)  # the agents publish their counts every 0.5 s
        counts = warm_map.read_starts(client.redis, client.keys).values()
        hits, misses = sum(c[0] for c in counts), sum(c[1] for c in counts)
        figures.setdefault(f"{name}:hit", []).append(hits / max(1, hits + misses))
        figures.setdefault(f"{name}:loads", []).append(loads)
        figures.setdefault(f"{name}:mean", []).append(statistics.mean(times))
        figures.setdefault(f"{name}:p50", []).append(percentile(times, 50))
        figures.setdefault(f"{name}:p95", []).append(percentile(times, 95))
        client.close()
    finally:
        side.stop()
        redis.Redis(port=port).flushall()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--models", type=int, default=4, help="task names (at most 8)")
    parser.add_argument("--requests", type=int, default=80)
    parser.add_argument("--load-s", type=float, default=0.5)
    parser.add_argument("--serve-s", type=float, default=0.02)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=7)
    opts = parser.parse_args(argv)
    if not 1 <= opts.models <= 8:
        raise SystemExit("--models: 1 to 8 (bench.affinity_tasks registers 8)")
    rng = random.Random(opts.seed)
    models = [rng.randrange(opts.models) for _ in range(opts.requests)]
    figures: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-affinity-") as tmp:
        proc, port = start_redis(Path(tmp))
        try:
            for _ in range(opts.repeats):
                for name in SIDES:
                    run_side(name, port, Path(tmp), opts, models, figures)
        finally:
            proc.terminate()
            proc.wait()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at the end; "
          f"{opts.nodes} nodes x {opts.gpus} GPUs (simulated), {opts.slots} slots each; {opts.models} models, "
          f"{opts.requests} requests one at a time, load {opts.load_s:g} s, serve {opts.serve_s:g} s; "
          f"{opts.repeats} repeat(s), medians")
    print(f"  {'side':<12} {'warm hits':>10} {'model loads':>12} {'s/task mean':>12} {'p50':>7} {'p95':>7}")
    for name in SIDES:
        med = {k: statistics.median(figures[f"{name}:{k}"]) for k in ("hit", "loads", "mean", "p50", "p95")}
        print(f"  {name:<12} {med['hit']:>9.0%} {med['loads']:>12.0f} {med['mean']:>12.3f} {med['p50']:>7.3f} "
              f"{med['p95']:>7.3f}")


if __name__ == "__main__":
    main()
