"""How fast the dispatcher reacts to a submit on an idle cluster (issue 14: within a millisecond),
with express placement (broker.express) and without it, in interleaved repeats on one
redis-server.

A dispatcher runs in its own process (``gpubroker dispatcher``) on a pool of ``--nodes`` nodes
(registered by the bench, never run: no worker competes for the CPU). Tasks are submitted one
at a time with ``Client.submit``; the bench takes each task's message off its node queue
and finishes it, then waits, so every submit finds the cluster idle. Figures:

- ``submit.lua -> reserve.lua``: the two scripts' times as Redis itself stamped them (``MONITOR``,
  in microseconds; ``redis-cli monitor`` runs beside it and slows Redis a little; the bench's
  client sends nothing for 5 ms after each submit): the dispatcher's reaction, from the task
  being in the queue to its placement being committed.
- ``submit -> message``: then, without MONITOR, from ``Client.submit`` being called to the
  task's message reaching the bench's BRPOP on the node queue, as a worker would get it (the
  submit's own round trip included).
- ``a bare wake-up``: a PUBLISH reaching a subscriber in another process (the same machine's
  floor for any dispatcher woken by a script).

    python -m bench.react [--tasks 300] [--repeats 3] [--nodes 4]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from bench.dispatch import start_redis
from broker import Client
from broker.models import Resources
from broker.store.keys import PoolKeys
from broker.store.scripts import Scripts

POOL = "react"
TASK = Resources(gpus=1, cpus=1, memory_mb=100)


def reaction(monitor_log: Path, scripts: Scripts) -> list[float]:
    """ms from each submit.lua call to the next reserve.lua call, as MONITOR logged them."""
    submit, reserve = scripts.sha("submit"), scripts.sha("reserve")
    out, last = [], None
    for line in monitor_log.read_text(errors="replace").splitlines():
        parts = line.split(" ", 4)
        if len(parts) < 5 or parts[3] != '"EVALSHA"':
            continue
        script = parts[4].split('"')[1]
        if script == submit:
            last = float(parts[0])
        elif script == reserve and last is not None:
            out.append((float(parts[0]) - last) * 1000)
            last = None
    return out


def finish(server: redis.Redis, scripts: Scripts, keys: PoolKeys, task_id: str, queues: list[str],
           taken: bool = False) -> None:
    """Take the task's message off its node queue (unless ``taken``) and finish it, freeing its place."""
    if not taken and server.brpop(queues, 5) is None:
        raise SystemExit(f"task {task_id} was not placed within 5 s")
    node, tag = server.hmget(keys.task(task_id), "node", "tag")
    scripts.finish(task_id, node.decode(), tag.decode(), "succeeded", "null")


def one_side(port: int, express: bool, tasks: int, nodes: int, workdir: Path) -> tuple[list[float], list[float]]:
    url = f"redis://127.0.0.1:{port}/0"
    server = redis.Redis(port=port)
    server.flushall()
    env = {**os.environ, "GPUBROKER_REDIS_URL": url, "GPUBROKER_POOL": POOL, "GPUBROKER_EXPRESS": str(express).lower(),
           "GPUBROKER_METRICS_PORT": "0", "GPUBROKER_HANDOFF": "never"}
    dispatcher = subprocess.Popen([sys.executable, "-m", "workers", "dispatcher", "--log-level", "WARNING"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log_path = workdir / f"monitor-{express}.log"
    monitor = None
    keys, scripts = PoolKeys(POOL), Scripts(server, PoolKeys(POOL))
    try:
        for i in range(nodes):
            scripts.register(f"n{i}", "bench", 3_600_000, 2, 80_000, 16_000, 64_000, 8, {})
        client = Client(url, pool=POOL)
        client.submit("bench.react.noop", resources=TASK)  # warm: scripts loaded, the dispatcher's first cycle
        time.sleep(1.0)
        server.delete(*[keys.queue(f"n{i}") for i in range(nodes)])
        with log_path.open("w") as log:
            monitor = subprocess.Popen(["redis-cli", "-p", str(port), "monitor"], stdout=log)
            time.sleep(0.3)
            waits = []
            queues = [keys.queue(f"n{i}") for i in range(nodes)]
            for _ in range(tasks):
                handle = client.submit("bench.react.noop", resources=TASK)
                time.sleep(0.005)  # quiet while the dispatcher reacts: this client sends nothing meanwhile
                finish(server, scripts, keys, handle.id, queues)
                time.sleep(0.005)
            time.sleep(0.2)
        monitor.terminate()
        monitor.wait()
        monitor = None
        for _ in range(tasks):  # no MONITOR: as a worker waits on its node queue
            started = time.perf_counter()
            handle = client.submit("bench.react.noop", resources=TASK)
            got = server.brpop(queues, 5)
            waits.append((time.perf_counter() - started) * 1000)
            if got is None:
                raise SystemExit(f"task {handle.id} was not placed within 5 s")
            finish(server, scripts, keys, handle.id, queues, taken=True)
            time.sleep(0.01)
    finally:
        if monitor is not None:
            monitor.terminate()
            monitor.wait()
        dispatcher.terminate()
        dispatcher.wait()
    return reaction(log_path, scripts), waits


def bare_wake(port: int, samples: int = 300) -> list[float]:
    """ms from PUBLISH to a subscriber in another process having it (both stamp wall time)."""
    code = ("import redis,sys,time\nr=redis.Redis(port=int(sys.argv[1]));p=r.pubsub();p.subscribe('w');"
            "p.get_message(timeout=5)\nprint('ready',flush=True)\nfor _ in range(int(sys.argv[2])):\n"
            " m=p.get_message(timeout=5)\n while m is None: m=p.get_message(timeout=5)\n"
            " print(time.time()-float(m['data']),flush=True)\n")
    sub = subprocess.Popen([sys.executable, "-c", code, str(port), str(samples)], stdout=subprocess.PIPE, text=True)
    assert sub.stdout is not None and sub.stdout.readline().strip() == "ready"
    publisher = redis.Redis(port=port)
    for _ in range(samples):
        publisher.publish("w", repr(time.time()))
        time.sleep(0.005)
    out = [float(sub.stdout.readline()) * 1000 for _ in range(samples)]
    sub.wait()
    return out


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=4)
    opts = parser.parse_args(argv)
    if shutil.which("redis-cli") is None:
        raise SystemExit("redis-cli is not installed (it comes with redis-server: apt-get install redis-server)")
    with tempfile.TemporaryDirectory(prefix="gpubroker-react-") as tmp:
        proc, port = start_redis(Path(tmp))
        try:
            figures: dict[bool, tuple[list[float], list[float]]] = {True: ([], []), False: ([], [])}
            for _ in range(opts.repeats):
                for express in (True, False):
                    react, waits = one_side(port, express, opts.tasks, opts.nodes, Path(tmp))
                    figures[express][0].extend(react)
                    figures[express][1].extend(waits)
            wake = bare_wake(port)
        finally:
            proc.terminate()
            proc.wait()
    print(f"# dispatcher reaction on an idle cluster: {opts.nodes} nodes, {opts.tasks} tasks x {opts.repeats} "
          f"repeats per side, one at a time; {os.cpu_count()} CPUs")
    print("| side | submit.lua -> reserve.lua p50 / p90 / p99 (ms) | submit -> message p50 / p90 / p99 (ms) |")
    print("|---|---|---|")
    for express in (True, False):
        react, waits = figures[express]
        cells = [" / ".join(f"{pct(x, p):.3f}" for p in (0.5, 0.9, 0.99)) for x in (react, waits)]
        print(f"| express {'on' if express else 'off'} | {cells[0]} | {cells[1]} |")
    print(f"a bare wake-up (PUBLISH -> subscriber in another process): p50 {statistics.median(wake):.3f} ms, "
          f"p90 {pct(wake, .9):.3f} ms")
    on = pct(figures[True][0], 0.5)
    print(f"target: the dispatcher reacts to a submit within 1 ms on an idle cluster (p50): "
          f"{'met' if on <= 1.0 else 'NOT met'} ({on:.3f} ms)")


if __name__ == "__main__":
    main()
