"""How long ``scheduling.demand.wanted_nodes`` (gpubroker_wanted_nodes) takes on a full cluster.

``--nodes`` busy 8-GPU nodes (every GPU held by a running task) and ``--pending`` tasks of
``--gpus`` whole GPUs each; the dispatcher works the figure out at most every
5 x explain_interval_s, one planner pass per node shape. Prints the figure and the seconds.

    python -m bench.wanted_nodes [--nodes 100] [--pending 1000] [--gpus 1] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time

from broker.scheduling.config import SchedulingConfig
from broker.scheduling.demand import shape_label, templates, wanted_nodes
from broker.scheduling.model import NodeFree, RunningTask, Snapshot, TaskRequest

GPU_MEM = 80 * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--pending", type=int, default=1000)
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    nodes = [NodeFree(f"n{i}", GPU_MEM, [0] * 8, [0] * 8, 64_000, 512 * 1024, 63, {}, 64_000, 512 * 1024, 64)
             for i in range(args.nodes)]
    running = [RunningTask(f"r{i}", f"n{i}", tuple(range(8)), 1000, GPU_MEM, 0, 0) for i in range(args.nodes)]
    pending = [TaskRequest(f"t{i}", whole_gpus=args.gpus, seq=i + 1) for i in range(args.pending)]
    snap = Snapshot(0.0, nodes, pending, running)
    config = SchedulingConfig.parse({})
    best = float("inf")
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        wanted = wanted_nodes(config, snap, templates(nodes))
        best = min(best, time.perf_counter() - t0)
    for shape, count in wanted.items():
        print(f"{args.nodes} busy nodes, {args.pending} pending of {args.gpus} GPU(s): "
              f"wanted {count} of {shape_label(shape)} in {best:.3f} s (best of {args.repeat})")


if __name__ == "__main__":
    main()
