"""Dispatch throughput: 100,000 pending 1-GPU tasks onto 1,000 simulated 8-GPU nodes.

No workers run. The dispatcher's real cycle (reap, snapshot, plan, commit through
reserve.lua) places tasks until the cluster is full; then every reserved task is
finished through finish.lua (timed separately: that is the workers' share) and the
next cycle places more, until nothing is pending. Printed beside it, measured in
the same run on the same redis-server: the rate of a trivial script, and of a
minimal placement script doing the same batching — the ceiling a Lua-committed
design can reach here.

    python -m bench.dispatch [--tasks 100000] [--nodes 1000] [--gpus 8]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import redis

from broker.dispatcher import Dispatcher
from broker.message import MessageTemplates, new_task_id
from broker.models import Resources, SubmitRequest
from broker.settings import Settings
from broker.store.keys import PoolKeys
from broker.store.records import StoredRequest
from broker.store.scripts import Scripts, wall_clock_ms

TRIVIAL = "return 1"
# The least a placement must do: check capacity, take it, move the task, push a message.
MINIMAL_PLACEMENT = """
for i = 1, #ARGV do
  if tonumber(redis.call('HGET', KEYS[1], 'free')) > 0 then
    redis.call('HINCRBY', KEYS[1], 'free', -1)
    redis.call('ZREM', KEYS[2], ARGV[i])
    redis.call('LPUSH', KEYS[3], ARGV[i])
  end
end
return #ARGV
"""


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed: apt-get install redis-server")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir)], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            return proc, port
        except redis.ConnectionError:
            time.sleep(0.05)
    raise SystemExit("redis-server did not start")


def submit_all(scripts: Scripts, n_tasks: int) -> float:
    """Submit through submit.lua with Celery-built messages, pipelined; returns seconds. Celery
    builds one message, copied with each task's own id (``MessageTemplates``: the bench's tasks
    are finished, never run): building each took most of a 1M-task case's minutes."""
    req = SubmitRequest(task_name="workers.tasks.probe", resources=Resources(gpus=1))
    stored = StoredRequest.of(req)
    templates = MessageTemplates(1 << 20)
    t0 = time.perf_counter()
    pipe = scripts.redis.pipeline(transaction=False)
    for i in range(n_tasks):
        task_id = new_task_id()
        message = templates(task_id, req.task_name)
        scripts.call("submit", *scripts.submit_call(task_id, req, message, stored), client=pipe)
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()
    return time.perf_counter() - t0


def finish_all_reserved(client: redis.Redis, scripts: Scripts, nodes: list[str]) -> int:
    """What workers would do: finish every reserved task, releasing its capacity."""
    k = scripts.keys
    pipe = client.pipeline(transaction=False)
    for node in nodes:
        pipe.smembers(k.node_tasks(node))
    held = [(node, task.decode()) for node, tasks in zip(nodes, pipe.execute(), strict=True) for task in tasks]
    pipe = client.pipeline(transaction=False)
    for _, task_id in held:
        pipe.hget(k.task(task_id), "tag")
    tags = pipe.execute()
    pipe = client.pipeline(transaction=False)
    for (node, task_id), tag in zip(held, tags, strict=True):
        scripts.call("finish", *scripts.finish_call(task_id, node, tag.decode(), "succeeded", "null"), client=pipe)
    pipe.execute()
    for node in nodes:
        client.delete(k.queue(node))
    return len(held)


def redis_cpu_s(client: redis.Redis) -> float:
    """CPU seconds the redis-server process has used so far."""
    cpu = client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def ceiling(client: redis.Redis, batch: int, seconds: float = 2.0) -> tuple[float, float]:
    """(trivial script calls/s unpipelined, minimal placements/s in batches of ``batch``)."""
    trivial = client.register_script(TRIVIAL)
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        trivial()
        calls += 1
    trivial_rate = calls / (time.perf_counter() - t0)
    place = client.register_script(MINIMAL_PLACEMENT)
    client.hset("ceiling:node", "free", 10**12)
    items, t0 = 0, time.perf_counter()
    ids = [f"task-{i}" for i in range(batch)]
    while time.perf_counter() - t0 < seconds:
        place(keys=["ceiling:node", "ceiling:pending", "ceiling:queue"], args=ids)
        client.delete("ceiling:queue")
        items += batch
    return trivial_rate, items / (time.perf_counter() - t0)


class BusyClock:
    """A dispatcher clock that runs only while a cycle runs (``dispatch_all`` starts and stops
    it). The dispatcher's periodic work (a full pass at most every explain_interval_s and 10x its
    own cost, the queue count every few seconds) then comes at the cadence it has when it cycles
    back to back, as while workers finish tasks as fast as it places them; on the wall clock it
    would come at this bench's pace, whose finishing rounds between cycles take seconds."""

    def __init__(self) -> None:
        self._base, self._banked, self._since = wall_clock_ms(), 0.0, cast(float | None, None)

    def __call__(self) -> int:
        running = time.perf_counter() - self._since if self._since is not None else 0.0
        return self._base + int((self._banked + running) * 1000)

    def start(self) -> None:
        self._since = time.perf_counter()

    def stop(self) -> None:
        if self._since is not None:
            self._banked += time.perf_counter() - self._since
            self._since = None


@dataclass
class DispatchRun:
    """What the dispatch rounds measured. CPU seconds, unlike wall time, are not inflated by
    other load on the machine, so they compare across busy runs."""

    placed: int = 0
    cycles: int = 0
    dispatch_s: float = 0.0
    finish_s: float = 0.0
    python_cpu_s: float = 0.0
    redis_cpu_s: float = 0.0
    first_cycle: tuple[int, float] = (0, 0.0)
    phases: dict[str, float] = field(default_factory=dict)


def bench_settings(port: int) -> Settings:
    """The benches' dispatcher settings. It makes every placement: with the hand-off (on while tasks
    wait) finish.lua would pass each freed place to the head of the queue, leaving it none to make."""
    return Settings(redis_url=f"redis://127.0.0.1:{port}/0", pool="bench", handoff="never")


def dispatch_all(dispatcher: Dispatcher, client: redis.Redis, scripts: Scripts, nodes: list[str],
                 tasks: int, clock: BusyClock | None = None) -> DispatchRun:
    """Dispatcher cycles until every task was placed, finishing all reserved tasks between them;
    ``clock``: the dispatcher's, when it is a BusyClock (run only during the cycles)."""
    run = DispatchRun()
    while run.placed < tasks:
        c0, r0 = time.process_time(), redis_cpu_s(client)
        t0 = time.perf_counter()
        if clock is not None:
            clock.start()
        report = dispatcher.run_cycle()
        if clock is not None:
            clock.stop()
        elapsed = time.perf_counter() - t0
        run.python_cpu_s += time.process_time() - c0
        run.redis_cpu_s += redis_cpu_s(client) - r0
        run.dispatch_s += elapsed
        run.cycles += 1
        run.placed += report.placed
        for phase, s in report.seconds.items():
            run.phases[phase] = run.phases.get(phase, 0.0) + s
        if run.cycles == 1:
            run.first_cycle = (report.placed, elapsed)
        if report.placed == 0 or report.refused:
            raise SystemExit(f"cycle {run.cycles} placed {report.placed}, refused {dict(report.refused)}")
        t0 = time.perf_counter()
        finish_all_reserved(client, scripts, nodes)
        run.finish_s += time.perf_counter() - t0
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--nodes", type=int, default=1_000)
    parser.add_argument("--gpus", type=int, default=8)
    opts = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_redis(Path(tmp))
        try:
            settings = bench_settings(port)
            client = redis.Redis(port=port)
            scripts = Scripts(client, PoolKeys("bench"))
            nodes = [f"n{i:04d}" for i in range(opts.nodes)]
            for node in nodes:
                scripts.register(node, "bench", 24 * 3600 * 1000, opts.gpus, 81920, 128_000, 1 << 20, opts.gpus, {})
            submit_s = submit_all(scripts, opts.tasks)
            run = dispatch_all(Dispatcher(settings, client=client), client, scripts, nodes, opts.tasks)
            trivial_rate, minimal_rate = ceiling(client, settings.commit_batch)
            version = client.info("server")["redis_version"]
        finally:
            proc.terminate()
            proc.wait()

    rate = run.placed / run.dispatch_s
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, redis-server {version}")
    print(f"cluster: {opts.nodes} nodes x {opts.gpus} GPUs = {opts.nodes * opts.gpus} GPUs; "
          f"{opts.tasks} pending 1-GPU tasks")
    print(f"submit (submit.lua, pipelined, one Celery-built message copied per task id): "
          f"{opts.tasks / submit_s:,.0f} tasks/s")
    print(f"dispatch: {run.placed} placed in {run.cycles} cycles, {run.dispatch_s:.2f}s of cycle time "
          f"-> {rate:,.0f} placements/s")
    first_placed, first_s = run.first_cycle
    print(f"  first cycle (empty cluster): {first_placed} placed in {first_s:.2f}s -> {first_placed / first_s:,.0f}/s")
    print("  time per phase: " + ", ".join(f"{p[2:]} {s:.2f}s" for p, s in sorted(run.phases.items())))
    print(f"  CPU per placement: dispatcher (Python) {run.python_cpu_s / run.placed * 1e6:.1f} us, "
          f"redis-server {run.redis_cpu_s / run.placed * 1e6:.1f} us (on two cores the two overlap)")
    print(f"finishing (workers' share, finish.lua pipelined): {run.placed / run.finish_s:,.0f} tasks/s")
    print(f"ceiling on this redis-server: trivial script {trivial_rate:,.0f} calls/s (one round trip each); "
          f"minimal placement script {minimal_rate:,.0f} placements/s (batches of {settings.commit_batch})")
    print(f"gpubroker dispatch reaches {rate / minimal_rate:.0%} of the minimal placement ceiling")


if __name__ == "__main__":
    main()
