"""How far off is a waiting task's first estimated start? A simulator replay with known runtimes.

Replays a trace (default: Philly, 16 October 2017, on 16 nodes of 8 GPUs) through the simulator
with the queue view on, records the first estimated start the planner gives each task that
waits, and compares it with when the task really started: the error as a fraction of its wait
(``|first estimate - start| / (start - submit)``), median and p90, and how many first estimates
were already in the past or missing. ``--before`` uses the rule this replaced: a running task
that outlived its estimate counts as ending now.

    python -m bench.estimates [--trace philly-2017-10-16.csv] [--nodes 16] [--policy fifo:backfill]
                              [--estimates learned] [--before]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from broker.cli.sim import parse_policies, read_trace
from broker.scheduling import planner as planner_module
from broker.scheduling.config import SchedulingConfig
from broker.scheduling.model import Plan, Snapshot
from broker.scheduling.planner import Planner
from broker.scheduling.timeline import INF
from broker.sim.engine import Simulator
from broker.sim.localcluster import private_redis
from broker.sim.results import EPOCH_MS
from broker.sim.traces import parse_shape, uniform_cluster

SHAPE = "gpus=8,gpu_memory_mb=24576,cpus=48,memory_mb=393216"


def old_expected_end(started_at: float, estimate: float, now: float) -> float | None:
    """The rule before: an overdue task ends now."""
    return None if estimate == INF else max(now, started_at + estimate)


def errors(trace: Path, nodes: int, policy: str, estimates: str, before: bool) -> dict[str, float]:
    jobs = read_trace(trace, "auto", None, None)
    config = parse_policies([policy], SchedulingConfig(), None, None)[0].config
    first: dict[str, tuple[float | None, float]] = {}  # task id -> (first estimated start, when given)
    if before:
        planner_module.expected_end = old_expected_end  # type: ignore[assignment]

    class Recording(Planner):
        def plan(self, snap: Snapshot) -> Plan:
            out = super().plan(snap)
            for task_id, waiting in out.waiting.items():
                first.setdefault(task_id, (waiting.estimated_start, snap.now))
            return out

    with private_redis() as url:
        sim = Simulator(jobs, uniform_cluster(parse_shape(SHAPE), nodes), url, config, estimates)
        sim.dispatcher.planner = Recording(config)
        sim.dispatcher.lazy = False
        result = sim.run()
        index = dict(sim._task_index)
    ratios, past, missing = [], 0, 0
    for task_id, (estimate, given) in first.items():
        outcome = result.jobs[index[task_id]]
        if outcome.started_s is None:
            continue
        wait = outcome.started_s - outcome.job.submit_s
        if wait <= 0:
            continue
        if estimate is None:
            missing += 1
            continue
        past += estimate < given
        estimate_s = estimate - EPOCH_MS / 1000
        ratios.append(abs(estimate_s - outcome.started_s) / wait)
    ratios.sort()
    return {"waited": len(ratios) + missing, "median": statistics.median(ratios) if ratios else 0.0,
            "p90": ratios[int(0.9 * (len(ratios) - 1))] if ratios else 0.0, "past": past, "missing": missing}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", type=Path, default=Path("philly-2017-10-16.csv"))
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--policy", default="fifo:backfill")
    parser.add_argument("--estimates", default="learned", choices=["true", "learned"])
    parser.add_argument("--before", action="store_true", help="the old rule: an overdue task ends now")
    args = parser.parse_args()
    found = errors(args.trace, args.nodes, args.policy, args.estimates, args.before)
    print(f"{args.policy} estimates={args.estimates} {'before' if args.before else 'after'}: "
          f"{found['waited']} tasks waited; first estimate error / wait: median {found['median']:.2f}, "
          f"p90 {found['p90']:.2f}; first estimates already in the past: {found['past']}; "
          f"none: {found['missing']}")


if __name__ == "__main__":
    main()
