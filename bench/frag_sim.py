"""GPU fragmentation through the simulator: bench/frag_offline.py's experiment (FGD, ATC '23),
run by the real dispatcher and Lua scripts on a private redis-server.

Same cluster (the 1,213 openb GPU nodes), same inflated and shuffled pod lists (the offline
harness's ``inflate``, same seeds), same placers (``placement.make_placer``). Instead of a cycle
per pod, ``Simulator.run_batches``: all pods are submitted (the pool's request mix is then the
whole workload's, as the offline harness gives frag_aware), then one dispatcher cycle places the
pods up to the one where 100 % of capacity has arrived, in submit order, each that fits; the rest
are cancelled (dropped) and the allocation measured; then one cycle for the remaining pods and
the measure at 130 %. With no departures that is exactly one pod at a time, unplaceable ones
dropped. ``--check N`` replays the first N seeds offline with the same placer and requires every
pod's node and GPUs to be the same.

    python -m bench.frag_sim [--seeds 10] [--first-seed 42] [--policies best_fit,frag_aware] [--check 1]
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable

from bench.frag_offline import Placing, gpu_milli, inflate, policies, pool_mix, protocol_parser, read_openb
from broker.models import MILLI
from broker.scheduling.config import Mode, Ordering, PlacementKind, SchedulingConfig
from broker.scheduling.model import NodeFree, TaskRequest
from broker.scheduling.placement import Mix
from broker.sim import traces
from broker.sim.engine import Simulator
from broker.sim.localcluster import private_redis
from broker.sim.results import SimulationError
from broker.sim.traces import ClusterNode, TraceJob

Assignment = dict[str, tuple[str, tuple[int, ...]]]  # pod id -> (node, GPUs); placed pods only


@dataclasses.dataclass
class SimRun:
    allocated: dict[int, float]  # measuring point (pods submitted) -> allocated GPU / capacity
    dropped: int
    seconds: float
    assignment: Assignment


def as_jobs(workload: list[TaskRequest], pods: dict[str, TraceJob]) -> list[TraceJob]:
    """The inflated workload as trace jobs, in its order (a resampled pod is ``<id>-r<n>``)."""
    jobs = []
    for position, task in enumerate(workload):
        job = pods.get(task.id) or pods[task.id.rsplit("-r", 1)[0]]
        jobs.append(dataclasses.replace(job, id=task.id, submit_s=float(position), duration_s=None))
    return jobs


def arrived_by(workload: list[TaskRequest], capacity: int, mark: float) -> int:
    """How many pods have arrived once ``mark`` x ``capacity`` GPU has (the offline harness's measuring point)."""
    arrived = 0
    for count, task in enumerate(workload, 1):
        arrived += gpu_milli(task)
        if arrived >= mark * capacity:
            return count
    return len(workload)


def scheduling(placement: str) -> SchedulingConfig:
    return SchedulingConfig(ordering=Ordering.PRIORITY, mode=Mode.BEST_EFFORT, placement=PlacementKind(placement),
                            preemption=False)


def simulate(jobs: list[TraceJob], nodes: list[ClusterNode], placement: str, marks: list[int], redis_url: str,
             one_cycle: bool = False) -> SimRun:
    """Place ``jobs`` (never ending) through the simulator; the allocation once each prefix in
    ``marks`` has arrived. A cycle per mark (each measured from the simulation's own tally), or
    ``one_cycle`` over all jobs (a mark's allocation is then that of the placed jobs before it:
    they were placed in submit order and never leave)."""
    gpus = sum(n.gpus for n in nodes)
    simulator = Simulator(jobs, nodes, redis_url, scheduling(placement), label=placement)
    result, batches = simulator.run_batches([len(jobs)] if one_cycle else marks)
    assignment = {o.job.id: (o.node, o.gpus) for o in result.jobs if o.node is not None}
    allocated = {mark: sum(j.gpu_milli for j in jobs[:mark] if j.id in assignment) / (gpus * MILLI)
                 for mark in marks}
    if not one_cycle and [round(b.allocated_gpus * MILLI) for b in batches] != \
            [round(allocated[mark] * gpus * MILLI) for mark in marks]:
        raise SimulationError(f"the simulation's tally {[b.allocated_gpus for b in batches]} is not what its "
                              f"placements add up to {[allocated[mark] * gpus for mark in marks]}")
    return SimRun(allocated, sum(b.dropped for b in batches), result.wall_s, assignment)


def place_offline(placer: Placing, workload: list[TaskRequest]) -> Assignment:
    """The offline harness's loop, keeping where each pod went."""
    out = {}
    for task in workload:
        placement = placer.place(task)
        if placement is not None:
            out[task.id] = (placement.node_id, tuple(placement.gpu_indices))
    return out


def offline(make_placer: Callable[[list[NodeFree], Mix], Placing], nodes: list[NodeFree],
            workload: list[TaskRequest]) -> Assignment:
    return place_offline(make_placer(nodes, pool_mix(nodes, workload)), workload)  # as frag_offline.simulate


def differences(sim: Assignment, off: Assignment) -> list[str]:
    return [f"{pod}: simulator {sim.get(pod)}, offline {off.get(pod)}"
            for pod in sorted(set(sim) | set(off)) if sim.get(pod) != off.get(pod)]


def compare(run: SimRun, off: Assignment, workload: list[TaskRequest], marks: list[int], capacity: int) -> str:
    """Where the simulator's placements and the offline harness's part, batch by batch."""
    said, first = [], 0
    for mark in marks:
        batch = workload[first:mark]
        diff = differences({t.id: run.assignment[t.id] for t in batch if t.id in run.assignment},
                           {t.id: off[t.id] for t in batch if t.id in off})
        allocated = sum(gpu_milli(t) for t in workload[:mark] if t.id in off) / capacity
        said.append(f"= offline ({allocated:.2%})" if not diff else
                    f"!= offline ({allocated:.2%}) in {len(diff)} pods, first {diff[0]}")
        first = mark
    return "[" + "; ".join(said) + "]"


def main() -> None:
    parser = protocol_parser(__doc__)
    parser.add_argument("--policies", default="best_fit,spread,first_fit,frag_aware", help="comma-separated")
    parser.add_argument("--check", type=int, default=1, help="seeds (the first ones) compared pod by pod offline")
    parser.add_argument("--one-cycle", action="store_true",
                        help="one cycle over all pods (one placer throughout) instead of a cycle per measuring point")
    args = parser.parse_args()

    chosen = [p for p in args.policies.split(",") if p]
    known = {k.value for k in PlacementKind}
    if not chosen or set(chosen) - known:
        parser.error(f"--policies: unknown {sorted(set(chosen) - known)}; known: {sorted(known)}")
    free, tasks = read_openb(args.trace, args.pods)
    nodes = traces.openb_nodes(args.trace / "openb_node_list_gpu_node.csv")
    pods = {job.id: job for job in traces.openb_pods(args.trace / f"openb_pod_list_{args.pods}.csv", static=True)}
    capacity = sum(len(n.free_milli) for n in free) * MILLI
    placers = policies()
    print(f"{len(nodes)} nodes, {capacity // MILLI} GPUs; {len(tasks)} pods in {args.pods}, inflated to "
          f"{args.tune:.0%}; seeds {args.first_seed}..{args.first_seed + args.seeds - 1}; through the simulator")
    runs: dict[str, list[SimRun]] = {p: [] for p in chosen}
    with private_redis() as url:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            workload = inflate(tasks, capacity, args.tune, seed)
            jobs = as_jobs(workload, pods)
            marks = [arrived_by(workload, capacity, 1.0), len(workload)]
            line = [f"seed {seed} ({len(workload)} pods, {marks[0]} by 100 %):"]
            for name in chosen:
                run = simulate(jobs, nodes, name, marks, url, args.one_cycle)
                runs[name].append(run)
                line.append(f"{name} {run.allocated[marks[0]]:.2%}/{run.allocated[marks[1]]:.2%} "
                            f"({run.seconds:.1f}s)")
                if seed < args.first_seed + args.check:
                    line.append(compare(run, offline(placers[name], free, workload), workload, marks, capacity))
            print("  ".join(line), flush=True)

    print()
    print(f"{'policy':<12} {'alloc@100%':>10} {'min':>7} {'max':>7} {'alloc@130%':>10} {'min':>7} {'max':>7} "
          f"{'dropped':>8} {'s/run':>6}")
    for name, done in runs.items():
        at100 = [next(iter(r.allocated.values())) for r in done]
        at130 = [list(r.allocated.values())[-1] for r in done]
        print(f"{name:<12} {statistics.mean(at100):>10.2%} {min(at100):>7.2%} {max(at100):>7.2%} "
              f"{statistics.mean(at130):>10.2%} {min(at130):>7.2%} {max(at130):>7.2%} "
              f"{statistics.mean(r.dropped for r in done):>8.0f} {statistics.mean(r.seconds for r in done):>6.1f}")


if __name__ == "__main__":
    main()
