"""Planning pass timings at cluster scale: each placement kind and ordering, pure Python, no Redis.

The cluster is ``--nodes`` nodes of 8 GPUs (80 GiB each), 128 CPUs and 1 TiB of memory, with
an eighth of their GPUs partly used by shares; ``--pending`` tasks ask for a mix of shapes
(whole GPUs 1-8, shares 0.1-0.9, CPU only) with random priorities and tenants, or whole GPUs
only with ``--shapes whole``. Each figure is the best of ``--repeat`` passes of
``Planner.plan`` (best effort, preemption off), and of ``best_fit.plan`` (the dispatcher's lazy
path, which always places best fit) for the same queue. Placements are printed with the
seconds so that two versions of the code can be checked to propose as many.

    python -m bench.plan_timing [--nodes 1000] [--pending 10000] [--shapes mixed|whole]
        [--kinds best_fit,spread,first_fit,frag_aware] [--orderings priority,fifo,sjf,fair] [--repeat 1]
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter
from collections.abc import Callable, Sized

from broker.models import MILLI
from broker.scheduling.config import SchedulingConfig
from broker.scheduling.model import NodeFree, Snapshot, TaskRequest
from broker.scheduling.ordering import queue_order
from broker.scheduling.placement.best_fit import plan
from broker.scheduling.planner import Planner

GPU_MEM = 80 * 1024


def cluster(count: int, rng: random.Random) -> list[NodeFree]:
    nodes = []
    for i in range(count):
        milli = [MILLI] * 8
        for g in range(8):
            if rng.random() < 0.125:
                milli[g] = rng.choice([100, 300, 500, 700])
        nodes.append(NodeFree(f"node-{i:04d}", GPU_MEM, milli, [m * GPU_MEM // MILLI for m in milli],
                              128 * MILLI, 1024 * 1024, 64, {}, 128 * MILLI, 1024 * 1024, 64))
    return nodes


def pending(count: int, shapes: str, rng: random.Random) -> list[TaskRequest]:
    tasks = []
    for i in range(count):
        kind = "whole" if shapes == "whole" else rng.choice(["whole", "whole", "share", "share", "cpu"])
        whole = rng.choice([1, 1, 1, 2, 2, 4, 8]) if kind == "whole" else 0
        share = rng.randrange(100, 1000, 100) if kind == "share" else 0
        tasks.append(TaskRequest(f"t{i}", whole, share, 0, rng.choice([1, 2, 4, 8]) * MILLI, rng.choice([0, 8192]),
                                 priority=rng.randint(0, 3), seq=i + 1, tenant=f"tenant-{rng.randint(0, 3)}",
                                 name="train", estimate_s=float(rng.randint(60, 3600)), submitted_at=float(i)))
    return tasks


def timed(run: Callable[[], Sized], repeat: int) -> tuple[float, int]:
    best, placed = float("inf"), 0
    for _ in range(repeat):
        start = time.perf_counter()
        placed = len(run())
        best = min(best, time.perf_counter() - start)
    return best, placed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--pending", type=int, default=10_000)
    parser.add_argument("--shapes", choices=["mixed", "whole"], default="mixed")
    parser.add_argument("--kinds", default="best_fit,spread,first_fit,frag_aware")
    parser.add_argument("--orderings", default="priority,fifo,sjf,fair")
    parser.add_argument("--repeat", type=int, default=1, help="passes per figure; the best is printed")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.nodes < 1 or args.pending < 0 or args.repeat < 1:
        parser.error("--nodes and --repeat must be >= 1, --pending >= 0")

    rng = random.Random(args.seed)
    nodes, tasks = cluster(args.nodes, rng), pending(args.pending, args.shapes, rng)
    mix = dict(Counter(t.gpu_kind for t in tasks))
    print(f"{args.nodes} nodes x 8 GPUs, {args.pending} pending ({args.shapes} shapes), best of {args.repeat}")
    ordered = queue_order(tasks)
    seconds, placed = timed(lambda: plan(ordered, nodes), args.repeat)
    print(f"{'best_fit.plan (lazy path)':<32} {seconds:8.3f} s  {placed:6d} placed")
    for kind in args.kinds.split(","):
        for ordering in args.orderings.split(","):
            planner = Planner(SchedulingConfig.parse({"placement": kind, "ordering": ordering, "preemption": False}))
            snap = Snapshot(0.0, nodes, tasks, mix=mix)
            seconds, placed = timed(lambda: planner.plan(snap).placements, args.repeat)  # noqa: B023
            print(f"{kind + ' / ' + ordering:<32} {seconds:8.3f} s  {placed:6d} placed", flush=True)


if __name__ == "__main__":
    main()
